import pytest
import torch

from avssl.data.corpus import Corpus
from avssl.data.loader import RankStream


def _ids(stream, epoch, start=0):
    return [tuple(b["wave"][:, 1000:1004].flatten().tolist()) for b in stream.epoch(epoch, start)]


def test_ranks_disjoint_equal_length_and_deterministic(synth_corpus):
    corpus = Corpus(synth_corpus)
    rows = corpus.select("train")
    streams = [RankStream(corpus, rows, 4, rank=r, world=2, seed=3, prefetch=0) for r in range(2)]
    assert streams[0].batches_in_epoch(0) == streams[1].batches_in_epoch(0) > 0
    orders = [[r["clip_id"] for r in s._order(0)] for s in streams]
    n = streams[0].batches_in_epoch(0) * 4
    assert not set(orders[0][:n]) & set(orders[1][:n])
    assert orders[0] == [r["clip_id"] for r in RankStream(corpus, rows, 4, 0, 2, seed=3)._order(0)]
    assert orders[0] != [r["clip_id"] for r in streams[0]._order(1)]  # reshuffled each epoch


def test_resume_mid_epoch_yields_the_remaining_batches(synth_corpus):
    corpus = Corpus(synth_corpus)
    stream = RankStream(corpus, corpus.select("train"), 4, seed=1, prefetch=2)
    full = _ids(stream, 0)
    assert len(full) >= 3
    assert _ids(stream, 0, start=2) == full[2:]


def test_batch_layout(synth_corpus):
    corpus = Corpus(synth_corpus)
    stream = RankStream(corpus, corpus.select("train"), 4, crop_frames=10, prefetch=0)
    batch = next(iter(stream.epoch(0)))
    assert batch["wave"].shape == (4, 10 * 640) and batch["frames"].shape == (4, 10, 32, 32)
    assert batch["still"].shape == (4, 32, 32) and batch["frames"].dtype == torch.uint8
    assert batch["lengths"].tolist() == [10] * 4


def test_too_few_clips_for_a_batch_is_a_clear_error(synth_corpus):
    corpus = Corpus(synth_corpus)
    with pytest.raises(ValueError, match="cannot fill one batch of 64"):
        RankStream(corpus, corpus.select("train"), 64, world=2)


def test_loader_errors_surface_in_the_consumer(synth_corpus, tmp_path):
    import shutil

    from avssl.errors import DataError

    copy = tmp_path / "c"
    shutil.copytree(synth_corpus, copy)
    corpus = Corpus(copy)
    for shard in (copy / "shards").glob("*.npz"):
        shard.write_bytes(b"broken")
    with pytest.raises(DataError, match="unreadable or truncated"):
        list(RankStream(corpus, corpus.select("train"), 4, prefetch=2).epoch(0))
