"""Streaming evaluation: audio read from the shards when needed, frozen features written once to the
feature store and read back by every seed, head and label fraction."""

import pickle

import numpy as np
import pytest
import torch

from avssl.data.corpus import ClipAudio, Corpus
from avssl.evaluate.downstream import CLEAN, HeadTrainer, fraction_of
from avssl.evaluate.features import FeatureStore
from avssl.evaluate.runner import TaskDataCache, feature_store
from avssl.evaluate.sources import resolve_source
from tests.conftest import tiny_cfg


@pytest.fixture
def setup(workdir, synth_corpus):
    cfg = tiny_cfg(workdir, synth_corpus, "evaluate.seeds=[0]", "evaluate.epochs=2")
    return cfg, TaskDataCache(cfg)


def test_clip_audio_reads_the_corpus_and_pickles_without_audio(synth_corpus):
    corpus = Corpus(synth_corpus)
    rows = corpus.select("train")
    audio = ClipAudio(corpus, rows)
    assert len(audio) == len(rows)
    for i in (0, len(rows) // 2, len(rows) - 1):
        np.testing.assert_array_equal(audio[i], corpus.load(rows[i]).audio)
    wire = pickle.dumps(audio)
    assert len(wire) < sum(a.nbytes for a in audio) / 10, "a lazy split ships its rows, not its audio"
    back = pickle.loads(wire)
    np.testing.assert_array_equal(back[3], audio[3])
    sub = audio.subset([4, 1])
    np.testing.assert_array_equal(sub[0], audio[4])


def test_shard_windows_is_a_permutation_that_reads_each_shard_once(synth_corpus):
    corpus = Corpus(synth_corpus)
    audio = ClipAudio(corpus, corpus.select("train"))
    audio.rows = [dict(r, shard=f"shard-{i // 5}") for i, r in enumerate(audio.rows)]  # (the fixture fits one shard)
    order = audio.shard_windows(np.random.default_rng(0), window=2)
    assert sorted(order.tolist()) == list(range(len(audio)))
    # a cache of two decoded shards (the reader keeps four) decodes each shard once per pass
    cached, decoded = [], 0
    for i in order:
        shard = audio.rows[i]["shard"]
        if shard in cached:
            cached.remove(shard)
        else:
            decoded += 1
        cached = (cached + [shard])[-2:]
    assert decoded == len({r["shard"] for r in audio.rows}) > 1
    assert not np.array_equal(order, audio.shard_windows(np.random.default_rng(1), window=2))


def test_frozen_features_are_computed_once_and_reused_from_the_store(setup):
    cfg, cache = setup
    data = cache.get("emotion")
    source = resolve_source("mfcc", cfg)
    calls = []
    forward = source.module.forward
    source.module.forward = lambda wave: calls.append(len(wave)) or forward(wave)

    trainer = HeadTrainer(source, data, cfg.evaluate)
    first = trainer.fit(0)
    n_calls = len(calls)
    assert n_calls > 0
    # every split's set is on disk under the configured store, data and index
    root = feature_store(cfg).root
    assert len(list(root.glob("*.f32"))) == 3 and len(list(root.glob("*.npz"))) == 3

    # another process's view of the same evaluation: a fresh task cache reads the store, computes nothing
    fresh = TaskDataCache(cfg).get("emotion")
    again = HeadTrainer(source, fresh, cfg.evaluate).fit(0)
    assert len(calls) == n_calls, "features found in the store must not be recomputed"
    assert again.test["clean"] == first.test["clean"]

    # a label fraction reads its clips from the whole split's set, the same frames
    part = fraction_of(fresh.train, 0.5, 0)
    view = HeadTrainer(source, fresh, cfg.evaluate).frozen_features("train", part, CLEAN, 0)
    full = HeadTrainer(source, fresh, cfg.evaluate).frozen_features("train", fresh.train, CLEAN, 0)
    pos = {c: i for i, c in enumerate(fresh.train.clip_ids)}
    for i, cid in enumerate(part.clip_ids[:5]):
        assert torch.equal(view.clip(i), full.clip(pos[cid]))
    assert len(calls) == n_calls


def test_stored_features_match_a_direct_computation_and_a_truncated_set_is_recomputed(setup):
    cfg, cache = setup
    data = cache.get("emotion")
    source = resolve_source("logmel", cfg)
    trainer = HeadTrainer(source, data, cfg.evaluate)
    fs = trainer.frozen_features("val", data.val, CLEAN, 0)
    direct = [x for batch in trainer._features(source.module, data.val, CLEAN, 0) for x in batch]
    assert len(fs) == len(direct)
    for i, x in enumerate(direct):
        assert torch.equal(fs.clip(i), x)
    frames = torch.cat(direct).double()
    np.testing.assert_allclose(fs.mean, frames.mean(0).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fs.std, frames.std(0).numpy(), rtol=1e-4, atol=1e-5)

    with open(fs.path, "r+b") as f:  # a set cut short (a full disk, a killed writer before the rename)
        f.truncate(fs.path.stat().st_size // 2)
    key = trainer._cache_key(data.val, CLEAN, 0)
    assert data.store.get(key) is None
    data.cache.clear()
    again = trainer.frozen_features("val", data.val, CLEAN, 0)
    assert torch.equal(again.clip(len(again) - 1), direct[-1])


def test_the_feature_key_tells_sources_conditions_and_clips_apart(setup, workdir):
    cfg, cache = setup
    data = cache.get("emotion")
    mfcc = HeadTrainer(resolve_source("mfcc", cfg), data, cfg.evaluate)
    logmel = HeadTrainer(resolve_source("logmel", cfg), data, cfg.evaluate)
    keys = {
        mfcc._cache_key(data.test, CLEAN, 0),
        logmel._cache_key(data.test, CLEAN, 0),
        mfcc._cache_key(data.val, CLEAN, 0),
        mfcc._cache_key(data.test, ("white", 10.0), 1),
        mfcc._cache_key(data.test, ("white", 10.0), 2),
        mfcc._cache_key(data.test, ("babble", 10.0), 1),
    }
    assert len(keys) == 6
    # two encoders of one architecture but different weights never share features
    from avssl.models import build_audio_encoder, save_encoder

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_encoder(build_audio_encoder(cfg.model.audio_encoder), cfg.model.audio_encoder, workdir / f"e{seed}.pt"))
    a, b = (HeadTrainer(resolve_source(str(p), cfg), data, cfg.evaluate) for p in paths)
    assert a._cache_key(data.test, CLEAN, 0) != b._cache_key(data.test, CLEAN, 0)


def test_an_unnamed_store_is_private_to_each_process():
    store = FeatureStore()
    back = pickle.loads(pickle.dumps(store))
    assert back.root.is_dir() and store.named is False
    named = pickle.loads(pickle.dumps(FeatureStore("/somewhere/features")))
    assert str(named.root) == "/somewhere/features"


def test_gpu_evaluation_without_a_gpu_is_a_clear_error_before_any_run(workdir, synth_corpus):
    from mlflow.tracking import MlflowClient

    from avssl.errors import ConfigError
    from avssl.evaluate.runner import EvalJob, run_jobs
    from avssl.tracking import Tracker

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tiny_cfg(workdir, synth_corpus, "evaluate.use_gpu=true", "evaluate.parallel=false")
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    with pytest.raises(ConfigError, match="use_gpu"):
        run_jobs([EvalJob(resolve_source("mfcc", cfg), "emotion")], cfg, tracker, TaskDataCache(cfg))
    runs = MlflowClient(tracker.uri).search_runs([tracker.experiment_id])
    assert not runs, "no MLflow run is opened for an evaluation that cannot run"
