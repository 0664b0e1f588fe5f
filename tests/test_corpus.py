"""The corpus format: atomic writes, clear errors on bad manifests and shards, nothing lost."""

import json
import os
import shutil

import numpy as np
import pytest

from avssl.data.corpus import Clip, Corpus, CorpusWriter, write_shard
from avssl.errors import DataError


def _clip(i, split="train", frames=True):
    rng = np.random.default_rng(i)
    return Clip(
        clip_id=f"c{i:03d}",
        split=split,
        speaker=f"s{i % 3}",
        audio=rng.uniform(-0.5, 0.5, 640 * 10).astype(np.float32),
        frames=rng.integers(0, 255, (10, 16, 16), dtype=np.uint8) if frames else None,
        labels={"emotion": "happy", "arousal": 0.5},
        frame_labels={"arousal": np.linspace(0, 1, 10, dtype=np.float32)},
    )


def _corpus(tmp_path, n=5, **kw):
    w = CorpusWriter(tmp_path / "c", "t", shard_size=2)
    for i in range(n):
        w.add(_clip(i, **kw))
    return w.finish()


def test_round_trip(tmp_path):
    root = _corpus(tmp_path)
    c = Corpus(root)
    assert len(c.rows) == 5 and len(list((root / "shards").glob("*.npz"))) == 3
    clip = c.load(c.rows[3])
    ref = _clip(3)
    assert np.allclose(clip.audio, ref.audio, atol=1 / 32767) and np.array_equal(clip.frames, ref.frames)
    assert np.allclose(clip.frame_labels["arousal"], ref.frame_labels["arousal"])
    assert c.has_video and c.frame_size == (16, 16)
    assert not (tmp_path / "c.partial").exists()


def test_audio_only_clips(tmp_path):
    c = Corpus(_corpus(tmp_path, frames=False))
    assert c.load(c.rows[0]).frames is None and not c.has_video


def test_crash_while_writing_a_shard_leaves_no_shard(tmp_path, monkeypatch):
    target = tmp_path / "shards" / "s.npz"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_shard(target, [_clip(0)])
    monkeypatch.undo()
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if not p.name.startswith(".")]
    assert list(target.parent.iterdir()) == []  # the temporary file is removed too


def test_crash_before_finish_keeps_the_old_corpus(tmp_path):
    root = _corpus(tmp_path)
    before = (root / "manifest.jsonl").read_text()
    w = CorpusWriter(root, "t", shard_size=2, overwrite=True)
    w.add(_clip(10))
    w.add(_clip(11))  # writes a shard into c.partial, then the process "dies" here
    assert (root / "manifest.jsonl").read_text() == before
    assert len(Corpus(root).rows) == 5


def test_truncated_shard_is_a_clear_error(tmp_path):
    root = _corpus(tmp_path)
    shard = root / "shards" / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:200])
    c = Corpus(root)
    row = next(r for r in c.rows if r["shard"].endswith("00001.npz"))
    with pytest.raises(DataError, match=r"shard-00001.npz: shard is unreadable or truncated"):
        c.load(row)
    # Found up front too, without decoding: the size differs from the recorded one.
    with pytest.raises(DataError, match=r"^/.*/shard-00001.npz: shard is unreadable or truncated \(200 bytes; the corpus recorded \d+\)$"):
        c.check_shards(c.rows)
    c.check_shards([r for r in c.rows if r["shard"] != row["shard"]])  # the others are fine


def test_shard_check_reads_only_the_zip_directory(tmp_path):
    root = _corpus(tmp_path)
    c = Corpus(root)
    c.check_shards(c.rows)
    # A shard truncated where no size was recorded (e.g. an older corpus): the zip directory is gone.
    meta = json.loads((root / "corpus.json").read_text())
    meta.pop("shards")
    (root / "corpus.json").write_text(json.dumps(meta))
    shard = root / "shards" / "shard-00002.npz"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 30])
    with pytest.raises(DataError, match=r"shard-00002.npz: shard is unreadable or truncated \(BadZipFile"):
        Corpus(root).check_shards(Corpus(root).rows)
    # Damage inside an array leaves the directory intact: the check passes, reading it fails.
    shard.write_bytes(data[:100] + bytes(64) + data[164:])
    c = Corpus(root)
    c.check_shards(c.rows)
    with pytest.raises(DataError, match="shard-00002.npz: shard is unreadable or truncated"):
        c.load(next(r for r in c.rows if r["shard"].endswith("00002.npz")))


def test_missing_shard_is_a_clear_error(tmp_path):
    root = _corpus(tmp_path)
    (root / "shards" / "shard-00000.npz").unlink()
    (root / "shards" / "shard-00001.npz").write_bytes(b"broken")
    c = Corpus(root)
    with pytest.raises(DataError, match="shard is missing"):
        c.load(c.rows[0])
    with pytest.raises(DataError) as e:
        c.check_shards(c.rows)
    assert str(e.value).splitlines() == [
        "2 of 3 shards cannot be read:",
        f"  {root / 'shards' / 'shard-00000.npz'}: shard is missing (was the corpus moved or deleted?)",
        f"  {root / 'shards' / 'shard-00001.npz'}: shard is unreadable or truncated (6 bytes; the corpus recorded "
        f"{json.loads((root / 'corpus.json').read_text())['shards']['shards/shard-00001.npz']['bytes']})",
    ]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(shard="../../etc/passwd"), "escapes the corpus root"),
        (lambda r: r.update(shard="/etc/passwd"), "is absolute"),
        (lambda r: r.update(audio_path="../x.wav"), "audio_path path '../x.wav' escapes"),
        (lambda r: r.update(sample_rate=44100), "sample_rate 44100"),
        (lambda r: r.update(split="dev"), "split 'dev'"),
        (lambda r: r.pop("n_frames"), "row lacks n_frames"),
    ],
)
def test_bad_manifest_rows_are_rejected_with_line_numbers(tmp_path, edit, message):
    root = _corpus(tmp_path)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    edit(row)
    lines[2] = json.dumps(row)
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as e:
        Corpus(root)
    assert "manifest.jsonl:3" in str(e.value)


def test_not_a_corpus(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a prepared corpus"):
        Corpus(tmp_path / "empty")


def test_select_fraction_is_per_speaker_and_seeded(tmp_path):
    w = CorpusWriter(tmp_path / "c", "t", shard_size=8)
    for i in range(40):
        w.add(_clip(i))
    c = Corpus(w.finish())
    half = c.select("train", fraction=0.5, seed=1)
    assert abs(len(half) - 20) <= 1 and half == c.select("train", fraction=0.5, seed=1)
    assert half != c.select("train", fraction=0.5, seed=2)
    assert {r["speaker"] for r in half} == {"s0", "s1", "s2"}
    shutil.rmtree(tmp_path / "c")
