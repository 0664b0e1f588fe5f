import math

import numpy as np
import pytest
import torch

from avssl.config import load_config
from avssl.data.corpus import Corpus
from avssl.data.constants import HOP
from avssl.data.features import attribute_targets, mfcc, prosody
from avssl.data.loader import iterate_rows
from avssl.models import AVSSLModel
from avssl.objectives import build_objective
from avssl.models.heads import length_mask
from avssl.objectives.audio_attributes import audio_loss, fit_target_stats
from tests.conftest import TINY_TRAIN


def test_prosody_finds_f0_of_a_tone_and_no_voicing_in_noise():
    t = torch.arange(16000 * 1) / 16000
    tone = 0.3 * torch.sin(2 * math.pi * 180 * t) + 0.1 * torch.sin(2 * math.pi * 360 * t)
    log_f0, voicing = prosody(tone[None])
    assert torch.exp(log_f0[0, 5:-5]).median().item() == pytest.approx(180, rel=0.03)
    assert voicing[0, 5:-5].mean() > 0.8
    noise = torch.randn(1, 16000) * 0.3
    _, v_noise = prosody(noise)
    assert v_noise.mean() < 0.4


def test_attribute_targets_are_per_video_frame():
    targets = attribute_targets(torch.randn(2, 25 * 640) * 0.1, 13, 40)
    assert {k: tuple(v.shape) for k, v in targets.items()} == {
        "mfcc": (2, 25, 13), "logmel": (2, 25, 40), "log_f0": (2, 25, 1), "voicing": (2, 25, 1), "energy": (2, 25, 1)
    }


@pytest.mark.parametrize("name", ["visual", "audio", "av"])
def test_objectives_give_finite_losses_and_gradients(synth_corpus, name):
    cfg = load_config("tiny", TINY_TRAIN + [f"objective.name={name}", f"data.corpus={synth_corpus}"])
    corpus = Corpus(synth_corpus)
    objective = build_objective(cfg.objective)
    model = AVSSLModel(cfg.model, cfg.objective, corpus.frame_size, objective.visual, objective.audio)
    rows = corpus.select("train")[:6]
    batch = next(b for _, b in iterate_rows(corpus, rows, 6, with_video=True))
    if objective.audio:
        fit_target_stats(model, [batch], cfg.objective.audio)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the residual decoder's zero-initialised output opens after one step
        opt.zero_grad()
        inputs = objective.model_inputs(batch, torch.Generator().manual_seed(0))
        loss, parts = objective.loss(model(**inputs), batch, inputs, model)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.audio_encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reaches the audio encoder"
    expected = {"visual": {"loss/visual"}, "audio": {"loss/audio"}, "av": {"loss/visual", "loss/audio"}}[name]
    assert expected <= set(parts)


def test_av_is_the_weighted_sum(synth_corpus):
    base = TINY_TRAIN + [f"data.corpus={synth_corpus}"]
    corpus = Corpus(synth_corpus)
    batch = next(b for _, b in iterate_rows(corpus, corpus.select("train")[:4], 4, with_video=True))

    def total(ws):
        cfg = load_config("tiny", base + ["objective.name=av", f"objective.w_visual={ws[0]}", f"objective.w_audio={ws[1]}"])
        torch.manual_seed(0)
        obj = build_objective(cfg.objective)
        model = AVSSLModel(cfg.model, cfg.objective, corpus.frame_size, True, True).eval()
        fit_target_stats(model, [batch], cfg.objective.audio)
        inputs = obj.model_inputs(batch, torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        loss, parts = obj.loss(model(**inputs), batch, inputs, model)
        return float(loss.detach()), float(parts["loss/visual"]), float(parts["loss/audio"])

    l, v, a = total((0.3, 2.0))
    assert l == pytest.approx(0.3 * v + 2.0 * a, rel=1e-5)
    l0, _, a0 = total((0.0, 1.0))
    assert l0 == pytest.approx(a0, rel=1e-5)


def test_target_standardisation_uses_corpus_statistics(synth_corpus):
    cfg = load_config("tiny", TINY_TRAIN)
    corpus = Corpus(synth_corpus)
    model = AVSSLModel(cfg.model, cfg.objective, None, visual=False, audio=True)
    batches = [b for _, b in iterate_rows(corpus, corpus.select("train"), 16)]
    fit_target_stats(model, batches, cfg.objective.audio)
    mean, std = model.target_stats("mfcc")
    t = torch.cat([attribute_targets(b["wave"], 13, 40)["mfcc"][length_mask(b["lengths"], b["lengths"].max())] for b in batches])
    assert np.allclose(((t - mean) / std).mean(0).numpy(), 0, atol=1e-3)


def _tone(seconds: float, f0: float, amplitude: float, seed: int = 0) -> torch.Tensor:
    """A voiced-like clip: harmonics of f0 with a slow loudness contour, a pause and some noise."""
    n = int(seconds * 25) * HOP
    t = torch.arange(n) / 16000
    g = torch.Generator().manual_seed(seed)
    env = 0.5 + 0.5 * torch.sin(2 * math.pi * 1.3 * t) ** 2
    env[n // 3 : n // 3 + 4 * HOP] = 0.0
    x = sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in (1, 2, 3)) * env + 1e-4 * torch.randn(n, generator=g)
    return amplitude * x / x.abs().max()


def _batch(*clips: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clips zero-padded to the longest, as the loader pads them; lengths in video frames."""
    s = max(len(c) for c in clips)
    wave = torch.zeros(len(clips), s)
    for i, c in enumerate(clips):
        wave[i, : len(c)] = c
    return {"wave": wave, "lengths": torch.tensor([len(c) // HOP for c in clips])}


def test_mfcc_is_per_clip_whatever_its_batch_mates():
    quiet = _tone(1.0, 150, 1e-3)
    loud_same_length = 0.9 * torch.sin(2 * math.pi * 440 * torch.arange(len(quiet)) / 16000)
    alone = mfcc(quiet[None])[0]
    assert torch.allclose(mfcc(torch.stack([quiet, loud_same_length]))[0], alone, atol=1e-5)
    # Next to a longer, loud clip the quiet one is zero-padded too: every target, on every one
    # of its frames, is the same as computed alone.
    loud_longer = _tone(1.6, 220, 0.9, seed=1)
    batched = attribute_targets(_batch(quiet, loud_longer)["wave"], 13, 40)
    single = attribute_targets(quiet[None], 13, 40)
    n = len(quiet) // HOP
    for name, value in single.items():
        assert torch.allclose(batched[name][0, :n], value[0], atol=1e-4), name


def test_target_statistics_ignore_padding():
    cfg = load_config("tiny", TINY_TRAIN)
    short, long_ = _tone(0.6, 140, 0.3), _tone(1.6, 230, 0.6, seed=1)

    def stats(batches):
        model = AVSSLModel(cfg.model, cfg.objective, None, visual=False, audio=True)
        fit_target_stats(model, batches, cfg.objective.audio)
        return {name: [x.clone() for x in model.target_stats(name)] for name in ("mfcc", "logmel", "log_f0", "energy")}

    padded = stats([_batch(short, long_)])
    unpadded = stats([_batch(short), _batch(long_)])
    for name in padded:
        for got, want in zip(padded[name], unpadded[name]):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), name
    # Padding frames (log-mel of silence, -13.8) would drag the log-mel mean down.
    assert padded["logmel"][0].min() > -13.0


def test_log_f0_counts_voiced_frames_only():
    """Frames with voicing at or below 0.5 carry a placeholder log-F0 (log 70 Hz); they must not
    pull the prediction there, and voiced frames count in full, not weighted by confidence."""
    cfg = load_config("tiny", TINY_TRAIN + ["objective.name=audio"])
    acfg = cfg.objective.audio
    model = AVSSLModel(cfg.model, cfg.objective, None, visual=False, audio=True)  # mean 0, std 1
    t = 5
    wave = torch.zeros(1, t * HOP)
    voicing = torch.tensor([0.9, 0.6, 0.45, 0.3, 0.0]).reshape(1, t, 1)
    log_f0 = torch.tensor([math.log(200), math.log(180), math.log(70), math.log(70), math.log(70)]).reshape(1, t, 1)
    targets = {"mfcc": torch.zeros(1, t, 13), "logmel": torch.zeros(1, t, 40), "energy": torch.zeros(1, t, 1),
               "voicing": voicing, "log_f0": log_f0}
    batch = {"wave": wave, "lengths": torch.tensor([4]), **{f"target/{k}": v for k, v in targets.items()}}
    pred = torch.full((1, t, 1), math.log(150.0))
    preds = {k: (pred if k == "log_f0" else v.clone()) for k, v in targets.items()}
    _, parts = audio_loss({"attributes": preds}, batch, model, acfg)
    want = ((math.log(150) - math.log(200)) ** 2 + (math.log(150) - math.log(180)) ** 2) / 2
    assert float(parts["loss/audio/log_f0"]) == pytest.approx(want, rel=1e-5)
    # Whatever is predicted on unvoiced or padded frames changes nothing.
    preds["log_f0"] = pred.clone()
    preds["log_f0"][0, 2:] = 100.0
    _, parts2 = audio_loss({"attributes": preds}, batch, model, acfg)
    assert float(parts2["loss/audio/log_f0"]) == pytest.approx(want, rel=1e-5)

    # The statistics use the same frames: log-F0 of voiced frames only.
    short = _tone(1.0, 160, 0.5)
    fit_target_stats(model, [_batch(short)], acfg)
    mean, _ = model.target_stats("log_f0")
    lf0, v = prosody(short[None])
    assert float(mean) == pytest.approx(float(lf0[v > 0.5].mean()), rel=1e-5)
    assert float(torch.exp(mean)) == pytest.approx(160, rel=0.05)
