import json

import numpy as np
import pytest

from avssl.config import load_config
from avssl.data.corpus import Corpus
from avssl.data.synthetic.generator import VOCABULARIES, generate, make_clip, make_speakers
from avssl.errors import DataError
from tests.conftest import TINY_SYNTH


def test_corpus_layout_labels_and_speaker_independent_splits(synth_corpus):
    corpus = Corpus(synth_corpus)
    assert len(corpus.rows) == 72
    spk_split = {}
    for r in corpus.rows:
        assert spk_split.setdefault(r["speaker"], r["split"]) == r["split"], "a speaker spans two splits"
        for k in ("emotion", "word", "text", "arousal", "valence", "snr_db"):
            assert k in r
        assert r["word"] in r["text"]
        assert r["n_frames"] == 30 and r["sample_rate"] == 16000
    assert set(spk_split.values()) == {"train", "val", "test"}
    clip = corpus.load(corpus.rows[0])
    assert clip.frames.shape == (30, 32, 32) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (30 * 640,)
    assert clip.frame_labels["arousal"].shape == (30,)
    assert not synth_corpus.with_name("synth.partial").exists()


def test_vocabulary_has_30_words_with_minimal_pairs():
    words = VOCABULARIES["minimal_pairs"]
    assert len(set(words)) >= 30
    assert {"bat", "pat"} <= set(words) and {"coat", "goat"} <= set(words)


def test_deterministic_for_a_seed_whatever_the_order():
    cfg = load_config("tiny", TINY_SYNTH).synth
    speakers = make_speakers(cfg, 3)
    jobs = [(s, i) for s in speakers for i in range(3)]
    first = {(s.index, i): make_clip(cfg, s, i, 3) for s, i in jobs}
    for s, i in reversed(jobs):  # another order: espeak-ng state must not leak between clips
        again = make_clip(cfg, s, i, 3)
        ref = first[(s.index, i)]
        assert np.array_equal(again.audio, ref.audio), f"{again.clip_id} audio differs"
        assert np.array_equal(again.frames, ref.frames) and again.labels == ref.labels
    a = first[(speakers[1].index, 2)]
    c = make_clip(cfg, make_speakers(cfg, 4)[1], 2, 4)
    assert not np.array_equal(a.audio, c.audio)


def test_mouth_moves_with_the_audio():
    cfg = load_config("tiny", TINY_SYNTH + ["synth.snr_db=null"]).synth
    clip = make_clip(cfg, make_speakers(cfg, 0)[0], 0, 0)
    energy = np.sqrt((clip.audio.reshape(-1, 640) ** 2).mean(1))
    mouth = clip.frames[:, 20:28, 10:22].astype(float)  # lower face
    motion = np.abs(mouth - mouth[0]).mean((1, 2))
    silent, loud = energy < energy.max() * 0.05, energy > energy.max() * 0.3
    assert silent.any() and loud.any()
    assert motion[loud].mean() > motion[silent].mean() + 1.0


def test_loudness_normalisation_and_noise_knobs():
    base = TINY_SYNTH + ["synth.snr_db=null"]
    cfg = load_config("tiny", base).synth
    spk = make_speakers(cfg, 0)
    levels = [20 * np.log10(np.sqrt((make_clip(cfg, s, i, 0, render=False).audio ** 2).mean())) for i, s in enumerate(spk)]
    assert max(levels) - min(levels) <= cfg.loudness_range_db + 0.5
    assert abs(np.mean(levels) + 26) < 4
    noisy = load_config("tiny", TINY_SYNTH + ["synth.snr_db=0"]).synth
    clean_clip = make_clip(cfg, spk[0], 0, 0, render=False)
    noisy_clip = make_clip(noisy, spk[0], 0, 0, render=False)
    silent = np.abs(clean_clip.audio[:1600]).max()
    assert np.abs(noisy_clip.audio[:1600]).std() > 10 * max(silent, 1e-4)


def test_refuses_to_overwrite_and_keeps_existing(tmp_path):
    out = tmp_path / "c"
    cfg = load_config("tiny", TINY_SYNTH + [f"synth.out={out}", "synth.speakers=3", "synth.clips_per_speaker=2"])
    generate(cfg.synth, 0, quiet=True)
    before = (out / "manifest.jsonl").read_text()
    with pytest.raises(DataError, match="already exists"):
        generate(cfg.synth, 1, quiet=True)
    assert (out / "manifest.jsonl").read_text() == before
    generate(cfg.synth, 1, overwrite=True, quiet=True)
    assert (out / "manifest.jsonl").read_text() != before
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["generator"]["seed"] == 1 and meta["labels"]["emotion"][0] == "anger"


def test_export_media_writes_readable_wav_and_mp4(tmp_path):
    from avssl.data.media import read_audio, read_video

    out = tmp_path / "m"
    cfg = load_config("tiny", TINY_SYNTH + [f"synth.out={out}", "synth.speakers=3", "synth.clips_per_speaker=1", "synth.export_media=true"])
    generate(cfg.synth, 0, quiet=True)
    row = Corpus(out).rows[0]
    audio = read_audio(out / row["audio_path"])
    frames, mp4_audio = read_video(out / row["video_path"], (32, 32))
    assert abs(len(audio) - row["n_frames"] * 640) < 640
    assert abs(len(frames) - row["n_frames"]) <= 1 and abs(len(mp4_audio) - len(audio)) < 3000
