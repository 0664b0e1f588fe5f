import math

import numpy as np
import pytest
import torch

from avssl.config import load_config
from avssl.data.corpus import Corpus
from avssl.data.features import attribute_targets, prosody
from avssl.data.loader import iterate_rows
from avssl.models import AVSSLModel
from avssl.objectives import build_objective
from avssl.objectives.audio_attributes import fit_target_stats
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
        fit_target_stats(model, [batch["wave"]], cfg.objective.audio)
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
        fit_target_stats(model, [batch["wave"]], cfg.objective.audio)
        inputs = obj.model_inputs(batch, torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        loss, parts = obj.loss(model(**inputs), batch, inputs, model)
        return float(loss), float(parts["loss/visual"]), float(parts["loss/audio"])

    l, v, a = total((0.3, 2.0))
    assert l == pytest.approx(0.3 * v + 2.0 * a, rel=1e-5)
    l0, _, a0 = total((0.0, 1.0))
    assert l0 == pytest.approx(a0, rel=1e-5)


def test_target_standardisation_uses_corpus_statistics(synth_corpus):
    cfg = load_config("tiny", TINY_TRAIN)
    corpus = Corpus(synth_corpus)
    model = AVSSLModel(cfg.model, cfg.objective, None, visual=False, audio=True)
    waves = [b["wave"] for _, b in iterate_rows(corpus, corpus.select("train"), 16)]
    fit_target_stats(model, waves, cfg.objective.audio)
    mean, std = model.target_stats("mfcc")
    t = torch.cat([attribute_targets(w, 13, 40)["mfcc"].reshape(-1, 13) for w in waves])
    assert np.allclose(((t - mean) / std).mean(0).numpy(), 0, atol=1e-3)
