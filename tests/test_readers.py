"""Each real-corpus reader on a tiny fixture built in that corpus's published layout."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from avssl.config import load_config
from avssl.data.corpus import Corpus
from avssl.data.media import write_mp4
from avssl.data.prepare import prepare
from avssl.errors import DataError

# The readers are tested in this process; the Ray engine is compared with it below.
CFG = load_config("tiny", ["prepare.workers=1", "prepare.engine=processes", "prepare.frame_size=[32,32]"]).prepare


def wav(path: Path, seconds=0.6, sr=16000, f0=180.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.2 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def truncated(path: Path):
    wav(path, seconds=1.0)
    path.write_bytes(path.read_bytes()[:20000])  # header says 1 s, file holds less
    return path


def garbage(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF\x00\x00not a wave file at all" * 10)
    return path


def run(dataset, root, tmp_path, **kw):
    return prepare(dataset, root, tmp_path / "out", CFG, strict=kw.pop("strict", False), quiet=True, **kw)


def test_crema_d(tmp_path):
    root = tmp_path / "CREMA-D"
    for actor in (1001, 1002, 1003, 1004):
        for emo in ("ANG", "HAP", "SAD"):
            wav(root / "AudioWAV" / f"{actor}_DFA_{emo}_XX.wav")
    wav(root / "AudioWAV" / "1005_DFA_XYZ_XX.wav")  # unknown emotion code
    truncated(root / "AudioWAV" / "1005_IEO_ANG_HI.wav")
    garbage(root / "AudioWAV" / "1005_TIE_NEU_LO.wav")
    wav(root / "AudioWAV" / "1005_ITS_SAD_MD.wav", sr=4000)  # too low a rate for speech
    r = run("crema-d", root, tmp_path)
    assert r["clips"] == 12
    assert r["skipped"] == {"unknown_label": 1, "truncated": 1, "unreadable_audio": 1, "unexpected_sample_rate": 1}
    c = Corpus(r["out"])
    row = c.rows[0]
    assert row["emotion"] in {"anger", "happy", "sad"} and row["text"] == "Don't forget a jacket"
    splits = {}
    for x in c.rows:
        assert splits.setdefault(x["speaker"], x["split"]) == x["split"]
    assert set(splits.values()) == {"train", "val", "test"}
    assert c.load(row).audio.shape[0] == row["n_frames"] * 640


def test_ravdess_resamples_48k_and_skips_song(tmp_path):
    root = tmp_path / "RAVDESS"
    for actor in range(1, 5):
        for emo in ("01", "05", "08"):
            wav(root / f"Actor_{actor:02d}" / f"03-01-{emo}-01-01-01-{actor:02d}.wav", sr=48000)
    wav(root / "Actor_01" / "03-02-03-01-01-01-01.wav", sr=48000)  # song
    wav(root / "Actor_01" / "03-01-09-01-01-01-01.wav", sr=48000)  # emotion 09 does not exist
    r = run("ravdess", root, tmp_path)
    assert r["clips"] == 12 and r["skipped"] == {"not_speech": 1, "unknown_label": 1}
    c = Corpus(r["out"])
    assert {x["emotion"] for x in c.rows} == {"neutral", "anger", "surprise"}
    clip = c.load(c.rows[0])
    assert abs(len(clip.audio) - 0.6 * 16000) <= 640  # 48 kHz -> 16 kHz


def test_iemocap_four_classes_and_dimensions(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    lines = []
    for s in (1, 4, 5):
        ev = root / f"Session{s}" / "dialog" / "EmoEvaluation" / f"Ses0{s}F_impro01.txt"
        ev.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for k, cat in enumerate(["neu", "exc", "ang", "sad", "fru"]):
            utt = f"Ses0{s}F_impro01_{'FM'[k % 2]}00{k}"
            rows.append(f"[1.0 - 2.0]\t{utt}\t{cat}\t[2.5000, 4.0000, 3.0000]")
            wav(root / f"Session{s}" / "sentences" / "wav" / f"Ses0{s}F_impro01" / f"{utt}.wav")
        ev.write_text("% header\n\n" + "\n\n".join(rows) + "\n")
        lines += rows
    (root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M003.wav").unlink()  # labelled, missing media
    r = run("iemocap", root, tmp_path)
    assert r["skipped"] == {"label_not_in_task": 3, "missing_media": 1}
    c = Corpus(r["out"])
    assert {x["emotion"] for x in c.rows} == {"neutral", "happy", "anger", "sad"}
    assert {x["split"] for x in c.rows} == {"train", "val", "test"}
    row = next(x for x in c.rows if x["clip_id"].endswith("F000"))
    assert row["arousal"] == pytest.approx(0.5) and row["valence"] == pytest.approx(-0.25)


def test_speech_commands_lists_define_splits(tmp_path):
    root = tmp_path / "speech_commands"
    for word in ("yes", "no"):
        for spk in ("aaaa1111", "bbbb2222", "cccc3333"):
            wav(root / word / f"{spk}_nohash_0.wav", seconds=1.0)
    wav(root / "_background_noise_" / "white.wav", seconds=2.0)
    wav(root / "yes" / "weird.wav")
    (root / "validation_list.txt").write_text("yes/bbbb2222_nohash_0.wav\nno/bbbb2222_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/cccc3333_nohash_0.wav\nno/cccc3333_nohash_0.wav\n")
    r = run("speech-commands", root, tmp_path)
    assert r["clips"] == 6 and r["skipped"] == {"bad_filename": 1}
    c = Corpus(r["out"])
    by = {x["clip_id"]: x for x in c.rows}
    assert by["sc_yes_cccc3333_nohash_0"]["split"] == "test" and by["sc_no_bbbb2222_nohash_0"]["split"] == "val"
    assert c.label_values("word") == ["no", "yes"]


def test_lrw_decodes_video_and_audio(tmp_path):
    root = tmp_path / "lrw"
    rng = np.random.default_rng(0)
    t = np.arange(int(29 / 25 * 16000)) / 16000
    for word in ("ABOUT", "BLACK"):
        for split in ("train", "val", "test"):
            p = root / word / split / f"{word}_00001.mp4"
            p.parent.mkdir(parents=True, exist_ok=True)
            frames = rng.integers(0, 255, (29, 96, 96), dtype=np.uint8)
            write_mp4(p, frames, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    garbage(root / "ABOUT" / "train" / "ABOUT_00002.mp4")
    r = run("lrw", root, tmp_path)
    assert r["clips"] == 6 and r["skipped"] == {"unreadable_video": 1}
    c = Corpus(r["out"])
    clip = c.load(c.rows[0])
    assert clip.frames.shape[1:] == (32, 32) and 27 <= clip.frames.shape[0] <= 29
    assert len(clip.audio) == clip.frames.shape[0] * 640
    assert c.has_video and {x["split"] for x in c.rows} == {"train", "val", "test"}
    # The fast grayscale path gives exactly the pixels of PyAV's own to_ndarray(format="gray").
    import av

    from avssl.data.media import _crop_resize

    row = next(x for x in c.rows if x["clip_id"] == "lrw_train_ABOUT_00001")
    with av.open(str(root / "ABOUT" / "train" / "ABOUT_00001.mp4")) as container:
        reference = np.stack([_crop_resize(f.to_ndarray(format="gray"), CFG.frame_size, CFG.face_crop) for f in container.decode(video=0)])
    got = c.load(row).frames
    assert np.array_equal(got, reference[: len(got)])


def lrw_fixture(root: Path, words=("ABOUT", "BLACK"), per_split=1, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(29 / 25 * 16000)) / 16000
    for word in words:
        for split in ("train", "val", "test"):
            for k in range(1, per_split + 1):
                p = root / word / split / f"{word}_{k:05d}.mp4"
                p.parent.mkdir(parents=True, exist_ok=True)
                frames = rng.integers(0, 255, (29, 96, 96), dtype=np.uint8)
                write_mp4(p, frames, (0.2 * np.sin(2 * np.pi * rng.uniform(120, 260) * t)).astype(np.float32))
    return root


def test_prepare_on_ray_data_writes_the_same_corpus_as_the_local_path(tmp_path, ray_local):
    """Two Ray Data workers, small decoding batches: the manifest is byte for byte the one the
    in-process path writes, every clip's audio and frames are equal, bad clips are counted the
    same way, and --strict stops at the first bad file in listing order."""
    root = lrw_fixture(tmp_path / "lrw", words=("ABOUT", "BLACK", "CHILD"), per_split=3)
    garbage(root / "ABOUT" / "train" / "ABOUT_00009.mp4")
    garbage(root / "CHILD" / "val" / "CHILD_00009.mp4")
    local = prepare("lrw", root, tmp_path / "local", CFG, quiet=True)
    on_ray = prepare("lrw", root, tmp_path / "ray", CFG.model_copy(update={"engine": "ray", "workers": 2, "batch_files": 2, "shard_size": 4}),
                     quiet=True)
    assert local["skipped"] == on_ray["skipped"] == {"unreadable_video": 2}
    assert local["clips"] == on_ray["clips"] == 27
    a, b = Corpus(local["out"]), Corpus(on_ray["out"])
    # That run cut smaller shards (the manifest names them, so it differs there): the clips agree.
    for ra, rb in zip(a.rows, b.rows):
        ca, cb = a.load(ra), b.load(rb)
        assert ca.clip_id == cb.clip_id and np.array_equal(ca.audio, cb.audio) and np.array_equal(ca.frames, cb.frames)
    same = prepare("lrw", root, tmp_path / "ray-same", CFG.model_copy(update={"engine": "ray", "workers": 2, "batch_files": 2}), quiet=True)
    assert (Path(same["out"]) / "manifest.jsonl").read_bytes() == (Path(local["out"]) / "manifest.jsonl").read_bytes()
    with pytest.raises(DataError, match=r"--strict: .*ABOUT_00009.mp4.*\[unreadable_video\]"):
        prepare("lrw", root, tmp_path / "strict", CFG.model_copy(update={"engine": "ray", "workers": 2, "batch_files": 1}), strict=True, quiet=True)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.partial").exists()


def test_sewa_cuts_recordings_and_interpolates_frame_labels(tmp_path):
    root = tmp_path / "sewa"
    for name in ("Train_01", "Train_02", "Devel_01", "Test_01"):
        wav(root / "audio" / f"{name}.wav", seconds=9.0)
        t = np.arange(0, 9.0, 0.1)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        rows = "\n".join(f"{x:.1f};{np.sin(x):.3f};{np.cos(x):.3f}" for x in t)
        (root / "annotations" / f"{name}.csv").write_text("time;arousal;valence\n" + rows + "\n")
    wav(root / "audio" / "Train_03.wav", seconds=3.0)  # no annotation file
    (root / "annotations" / "Test_02.csv").write_text("time,arousal\n0,1\n")
    wav(root / "audio" / "Test_02.wav", seconds=3.0)  # annotation lacks valence
    r = run("sewa", root, tmp_path)
    assert r["skipped"] == {"missing_labels": 2}
    c = Corpus(r["out"])
    assert len(c.rows) == 4 * 2  # 9 s at 4 s segments -> 2 whole segments each (the last 1 s is dropped)
    clip = c.load(c.rows[0])
    assert clip.frame_labels["arousal"].shape == (100,)
    t = (np.arange(100) + 0.5) / 25
    assert np.allclose(clip.frame_labels["arousal"], np.sin(t), atol=0.02)
    assert clip.labels["arousal"] == pytest.approx(float(np.sin(t).mean()), abs=0.02)


def test_strict_stops_at_first_bad_clip_with_path_and_reason(tmp_path):
    root = tmp_path / "CREMA-D"
    wav(root / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    truncated(root / "AudioWAV" / "1002_DFA_ANG_XX.wav")
    with pytest.raises(DataError, match=r"--strict: .*1002_DFA_ANG_XX.wav: header says 32000 bytes of audio, file holds 19956 \[truncated\]"):
        run("crema-d", root, tmp_path, strict=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_empty_folder_and_unknown_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no clips found .* 'crema-d' layout \(expected AudioWAV/"):
        run("crema-d", tmp_path / "empty", tmp_path)
    from avssl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown dataset 'cremad'; did you mean 'crema-d'"):
        run("cremad", tmp_path / "empty", tmp_path)


def test_prepare_never_replaces_an_existing_corpus_by_accident(tmp_path):
    root = tmp_path / "CREMA-D"
    for a in (1001, 1002, 1003):
        wav(root / "AudioWAV" / f"{a}_DFA_ANG_XX.wav")
    run("crema-d", root, tmp_path)
    before = (tmp_path / "out" / "manifest.jsonl").read_text()
    with pytest.raises(DataError, match="already exists"):
        run("crema-d", root, tmp_path)
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == before
