"""The offline protocol: an unlabelled pool apart from labelled downstream corpora whose speakers
appear nowhere else; each task evaluated on its own corpus; what the head reads is selectable."""

import json

import pytest
import torch

from avssl.config import load_config
from avssl.errors import ConfigError


def test_protocol_corpora_have_disjoint_speakers_and_an_unlabelled_pool(tmp_path):
    from avssl.data.corpus import Corpus
    from avssl.data.pipeline import synth_command

    cfg = load_config("tiny", [
        f"synth.out={tmp_path / 'synth'}", "synth.clip_seconds=1.0", "synth.frame_size=32", "synth.workers=1", "synth.baseline=false",
        "synth.corpora.pool.speakers=6", "synth.corpora.pool.clips_per_speaker=3",
        *(f"synth.corpora.{t}.speakers=3" for t in ("emotion", "word", "affect")),
        *(f"synth.corpora.{t}.clips_per_speaker=2" for t in ("emotion", "word", "affect")),
        "synth.corpora.emotion.split=[0.34,0.33,0.33]", "synth.corpora.word.split=[0.34,0.33,0.33]", "synth.corpora.affect.split=[0.34,0.33,0.33]",
    ])
    assert synth_command(cfg) == 0
    corpora = {name: Corpus(tmp_path / "synth" / name) for name in ("pool", "emotion", "word", "affect")}
    voices = {}
    for name, c in corpora.items():
        meta = json.loads((c.root / "corpus.json").read_text())
        voices[name] = {v["voice"] for v in meta["speakers"].values()}
        voices[name + "/ids"] = {r["speaker"] for r in c.rows}
    for a in ("pool", "emotion", "word", "affect"):
        for b in ("pool", "emotion", "word", "affect"):
            if a < b:
                assert not voices[a] & voices[b], f"{a} and {b} share a voice"
                assert not voices[a + "/ids"] & voices[b + "/ids"]
    pool = corpora["pool"]
    assert pool.has_video and not any(r.get("emotion") or r.get("word") for r in pool.rows)
    assert all(r.get("emotion") for r in corpora["emotion"].rows) and not corpora["emotion"].has_video
    assert set(corpora["word"].label_values("word")) <= {"yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"}


def test_each_task_names_its_corpus_and_a_missing_one_is_a_clear_error(tmp_path):
    from avssl.config.schema import probe_corpus, task_corpus

    cfg = load_config("tiny", ["evaluate.corpora.word=/data/speech-commands"])
    assert task_corpus(cfg, "word") == "/data/speech-commands"
    assert task_corpus(cfg, "emotion").endswith("data/synth/emotion")  # the other defaults stay
    assert probe_corpus(cfg) == task_corpus(cfg, "emotion")
    assert load_config("tiny", ["train.probe.corpus=x"]).train.probe.corpus.endswith("/x")
    cfg.evaluate.corpora = {}
    with pytest.raises(ConfigError, match="evaluate.corpora.word"):
        task_corpus(cfg, "word")
    with pytest.raises(ConfigError, match="unknown|not registered|registered"):
        load_config("tiny", ["evaluate.corpora.emotions=x"])
    with pytest.raises(ConfigError, match="layer"):
        load_config("tiny", ["evaluate.layer=middle"])


def test_a_probe_without_labels_is_an_error_before_any_compute(workdir, synth_corpus, tmp_path):
    import shutil

    from avssl.errors import DataError
    from avssl.train.probe import check_probe
    from tests.conftest import tiny_cfg

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(synth_corpus, unlabelled)
    man = unlabelled / "manifest.jsonl"
    rows = [json.loads(line) for line in man.read_text().splitlines() if line.strip()]
    man.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k not in ("emotion", "word")}) for r in rows) + "\n")
    cfg = tiny_cfg(workdir, synth_corpus, f"train.probe.corpus={unlabelled}")
    with pytest.raises(DataError, match="probe"):
        check_probe(cfg)
    check_probe(tiny_cfg(workdir, synth_corpus))  # a labelled probe corpus passes
    with pytest.raises(ConfigError, match="not produced"):
        check_probe(tiny_cfg(workdir, synth_corpus), "probe/val_ccc")


@pytest.mark.parametrize("layer", ["last", "code", "gru1", "gru2", "concat", "weighted"])
def test_the_featurizer_reads_the_requested_layer(layer):
    from avssl.models import build_audio_encoder
    from avssl.models.heads import DownstreamHead, Featurizer

    cfg = load_config("tiny", ["model.audio_encoder.gru_hidden=64", "model.audio_encoder.code_dim=64"])
    enc = build_audio_encoder(cfg.model.audio_encoder).eval()
    wave = torch.randn(2, 16000)
    f = Featurizer(enc, layer)
    out = f(wave)
    assert out.shape[-1] == f.out_dim
    outs = enc.layer_outputs(wave)
    assert torch.allclose(outs[-1], enc(wave), atol=1e-5), "the last layer run one at a time equals the stacked GRU"
    if layer == "code":
        assert torch.allclose(out, enc.frame_codes(wave))
    if layer == "gru1":
        assert not torch.allclose(out, outs[-1])
    head = DownstreamHead("pool", f.out_dim, 3, 8, n_layers=f.n_layers)
    clip, _ = head(out, torch.tensor([25, 20]))
    assert clip.shape == (2, 3)
    if layer == "weighted":
        clip.sum().backward()
        assert head.mix.logits.grad is not None and f.n_layers == 3
