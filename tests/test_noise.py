"""Noise for the robustness study: per-clip SNR over the true length, identical noise whatever the
batch, babble from other speakers' training clips only."""

import numpy as np
import pytest
import torch

from avssl.evaluate.noise import BabblePool, measured_snr, mix


def _tone(n: int, f: float, amp: float) -> torch.Tensor:
    t = torch.arange(n) / 16000
    return amp * torch.sin(2 * np.pi * f * t)


def _pool(speakers: int = 6, per: int = 3) -> BabblePool:
    g = np.random.default_rng(0)
    waves = [g.normal(0, 0.05, int(g.integers(8000, 24000))).astype(np.float32) for _ in range(speakers * per)]
    spk = [f"s{i // per}" for i in range(speakers * per)]
    return BabblePool(waves, spk, [f"c{i}" for i in range(len(waves))])


@pytest.mark.parametrize("kind", ["white", "babble"])
@pytest.mark.parametrize("snr", [20.0, 5.0, 0.0])
def test_a_short_clip_next_to_a_long_one_gets_the_requested_snr(kind, snr):
    short, long_ = 6400, 32000
    wave = torch.zeros(2, long_)
    wave[0, :short] = _tone(short, 220, 0.02)  # quiet and short
    wave[1] = _tone(long_, 330, 0.3)  # loud and long: dominates a batch-wide SNR
    lengths = torch.tensor([short, long_])
    noisy = mix(wave, lengths, (kind, snr), 7, ["a", "b"], ["x", "y"], _pool(), talkers=3)
    for i, n in enumerate((short, long_)):
        assert measured_snr(wave[i], noisy[i], n) == pytest.approx(snr, abs=0.1)
    assert (noisy[0, short:] == 0).all(), "padding stays silent"


@pytest.mark.parametrize("kind", ["white", "babble"])
def test_every_method_hears_the_same_noise_whatever_the_batch(kind):
    n = 16000
    waves = torch.stack([_tone(n, 200 + 50 * i, 0.1) for i in range(4)])
    ids, spk = ["a", "b", "c", "d"], ["x", "x", "y", "z"]
    lengths = torch.full((4,), n)
    whole = mix(waves, lengths, (kind, 10.0), 3, ids, spk, _pool(), talkers=2)
    for i in range(4):  # one clip alone, as batch size 1 (or a different batch order) would see it
        alone = mix(waves[i : i + 1], lengths[i : i + 1], (kind, 10.0), 3, ids[i : i + 1], spk[i : i + 1], _pool(), talkers=2)
        assert torch.allclose(alone[0], whole[i], atol=1e-6)
    other_seed = mix(waves, lengths, (kind, 10.0), 4, ids, spk, _pool(), talkers=2)
    assert not torch.allclose(other_seed, whole)


def test_babble_never_uses_the_clips_own_speaker():
    # Each speaker talks at its own frequency (whole cycles in 1000 samples: a circular shift keeps it).
    t = np.arange(1000)
    tone = {"a": 50, "b": 100, "c": 150}
    waves = [np.cos(2 * np.pi * tone[s] * t / 1000).astype(np.float32) for s in "aabbcc"]
    pool = BabblePool(waves, list("aabbcc"), [str(i) for i in range(6)])
    for seed in range(20):
        spectrum = np.abs(np.fft.rfft(pool.babble(1000, "a", 2, torch.Generator().manual_seed(seed)).numpy()))
        assert spectrum[50] < 1e-3 * spectrum.max(), "the clip's own speaker is in its babble"
        assert spectrum[100] > 100 and spectrum[150] > 100
    with pytest.raises(ValueError, match="speakers other than"):
        pool.babble(1000, "a", 3, torch.Generator().manual_seed(0))


def test_babble_of_an_evaluation_comes_from_training_speakers_never_test_clips(synth_corpus):
    from avssl.data.corpus import Corpus
    from avssl.evaluate.downstream import load_task_data
    from avssl.evaluate.runner import make_task

    corpus = Corpus(synth_corpus)
    data = load_task_data(corpus, make_task("emotion", corpus))
    test_ids, test_speakers = set(data.test.clip_ids), set(data.test.speakers)
    assert data.babble_pool.clip_ids and not set(data.babble_pool.clip_ids) & test_ids
    assert not set(data.babble_pool.speakers) & test_speakers
    assert set(data.babble_pool.speakers) >= set(data.train.speakers)
    test_waves = {w.tobytes() for w in data.test.waves}
    assert not any(w.tobytes() in test_waves for w in data.babble_pool.waves)


def test_noise_study_on_a_crema_d_layout_corpus_applies_each_snr_per_clip(workdir, tmp_path, capsys):
    """Clips of 0.6, 1.0 and 2.0 s (and different levels) in CREMA-D's layout: every test clip gets
    the requested SNR over its own length, and the study records what it applied."""
    import soundfile as sf
    from mlflow.tracking import MlflowClient

    from avssl.config import load_config
    from avssl.data.prepare import prepare
    from avssl.evaluate.runner import TaskDataCache
    from avssl.evaluate.studies import noise_study
    from avssl.tracking import Tracker
    from tests.conftest import tiny_cfg

    root = tmp_path / "CREMA-D" / "AudioWAV"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for a, actor in enumerate(range(1001, 1009)):
        for k, (emo, seconds) in enumerate((("ANG", 0.6), ("HAP", 1.0), ("SAD", 2.0), ("NEU", 1.0))):
            t = np.arange(int(seconds * 16000)) / 16000
            amp = 0.05 + 0.1 * ((a + k) % 3)
            sf.write(root / f"{actor}_DFA_{emo}_XX.wav", (amp * np.sin(2 * np.pi * (120 + 20 * a) * t) + rng.normal(0, 0.001, len(t))).astype(np.float32), 16000)
    prep = load_config("tiny", ["prepare.workers=1", "prepare.engine=processes"]).prepare
    corpus = prepare("crema-d", tmp_path / "CREMA-D", tmp_path / "crema", prep, strict=False, quiet=True)["out"]
    cfg = tiny_cfg(workdir, corpus, f"evaluate.corpora.emotion={corpus}", "study.methods=[mfcc]", "study.noise.snrs=[clean,20.0,5.0,0.0]",
                   "evaluate.epochs=2", "evaluate.seeds=[0]", "evaluate.parallel=false")
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    out = noise_study(cfg, tracker, TaskDataCache(cfg))
    child = MlflowClient(tracker.uri).search_runs([tracker.experiment_id], f"tags.`avssl.study_run_id` = '{out['run_id']}'")[0]
    with np.load(tracker.download(child.info.run_id, "predictions.npz")) as z:
        conds = [k for k in z.files if k.startswith("snr/")]
        assert len(conds) == 6  # white and babble at 20, 5, 0 dB
        from avssl.data.corpus import Corpus

        seconds = {r["clip_id"]: r["n_frames"] / 25 for r in Corpus(corpus).rows}
        assert len({seconds[c] for c in z["clip_ids"]}) >= 3, "the test clips differ in length"
        for k in conds:
            target = float(k.split("_")[-1][:-2])
            assert np.all(np.abs(z[k] - target) < 0.1), (k, z[k])
        with capsys.disabled():
            print(f"\nper-clip SNR applied on {len(z['clip_ids'])} test clips ({', '.join(f'{c} {seconds[c]:.1f} s' for c in z['clip_ids'])}):")
            for k in conds:
                print(f"  {k[4:]}: " + " ".join(f"{v:.3f}" for v in z[k]))
