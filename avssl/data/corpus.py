"""The one corpus format: `manifest.jsonl` (a row per clip) + `corpus.json` + compressed shards.

Every reader and the synthetic generator write it; every trainer and evaluator reads it.
Shards and the manifest are written to a temporary name and renamed into place, and a corpus is
built in `<out>.partial/` and renamed at the end, so a crash never leaves something that looks
whole but is not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from avssl import storage
from avssl.data.constants import FPS, HOP, SAMPLE_RATE
from avssl.errors import DataError

MANIFEST = "manifest.jsonl"
CORPUS_META = "corpus.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
LABEL_FIELDS = ("emotion", "word", "text", "arousal", "valence", "snr_db", "intensity")
FRAME_LABELS = ("arousal", "valence")


@dataclass
class Clip:
    """One clip in memory: 16 kHz mono audio, optional grayscale frames, labels."""

    clip_id: str
    split: str
    speaker: str
    audio: np.ndarray  # float32 in [-1, 1], length n_frames * HOP
    frames: Optional[np.ndarray] = None  # uint8 [T, H, W]
    labels: dict[str, Any] = field(default_factory=dict)
    frame_labels: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [T]
    audio_path: Optional[str] = None
    video_path: Optional[str] = None
    source: Optional[str] = None

    @property
    def n_frames(self) -> int:
        return len(self.audio) // HOP


def fit_to_frames(audio: np.ndarray, frames: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Make audio a whole number of video frames long (pad the last one), and agree with video."""
    n = -(-len(audio) // HOP)
    if frames is not None:
        n = min(n, len(frames))
        frames = frames[:n]
    out = np.zeros(n * HOP, np.float32)
    m = min(len(audio), n * HOP)
    out[:m] = audio[:m]
    return out, frames


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shard(path: Path, clips: list[Clip]) -> dict[str, Any]:
    """Write clips as one compressed shard, atomically. Returns size and checksum."""
    import io

    audio = [np.clip(np.round(c.audio * 32767.0), -32768, 32767).astype(np.int16) for c in clips]
    frames = [c.frames for c in clips if c.frames is not None]
    if frames and len(frames) != len(clips):
        raise DataError(f"{path}: a shard mixes clips with and without video")
    arrays: dict[str, np.ndarray] = {
        "clip_ids": np.array([c.clip_id for c in clips]),
        "audio": np.concatenate(audio) if audio else np.zeros(0, np.int16),
        "audio_offsets": np.cumsum([0] + [len(a) for a in audio]).astype(np.int64),
        "n_frames": np.array([c.n_frames for c in clips], np.int64),
    }
    if frames:
        arrays["frames"] = np.concatenate(frames).astype(np.uint8)
    for name in FRAME_LABELS:
        if any(name in c.frame_labels for c in clips):
            vals = []
            for c in clips:
                v = c.frame_labels.get(name)
                vals.append(np.full(c.n_frames, np.nan, np.float32) if v is None else np.asarray(v, np.float32)[: c.n_frames])
            arrays[f"frame_{name}"] = np.concatenate(vals)
    buf = io.BytesIO()
    # An .npz (np.load reads it) with fast deflate: level 1 is ~4x quicker than numpy's level 6
    # and within a few percent of its size on drawn frames and int16 audio.
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, value in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "clips": len(clips)}


class ShardReader:
    """A whole shard decoded in memory; clips are slices of its arrays. A shard in an object store
    is fetched whole when first needed, by the process that needs it."""

    def __init__(self, path: "storage.Location"):
        import io

        self.path = path
        try:
            source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
            with np.load(source, allow_pickle=False) as z:
                self.arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise DataError(f"{path}: shard is missing (was the corpus moved or deleted?)") from None
        except Exception as e:  # zipfile.BadZipFile, zlib.error, ValueError, EOFError
            raise DataError(f"{path}: shard is unreadable or truncated ({type(e).__name__}: {e})") from None
        self.index = {str(c): i for i, c in enumerate(self.arrays["clip_ids"])}
        self.frame_offsets = np.concatenate([[0], np.cumsum(self.arrays["n_frames"])])

    def audio(self, i: int) -> np.ndarray:
        a, b = self.arrays["audio_offsets"][i : i + 2]
        return self.arrays["audio"][a:b].astype(np.float32) / 32767.0

    def frames(self, i: int) -> Optional[np.ndarray]:
        if "frames" not in self.arrays:
            return None
        a, b = self.frame_offsets[i : i + 2]
        return self.arrays["frames"][a:b]

    def frame_label(self, i: int, name: str) -> Optional[np.ndarray]:
        key = f"frame_{name}"
        if key not in self.arrays:
            return None
        a, b = self.frame_offsets[i : i + 2]
        return self.arrays[key][a:b]


SHARD_ARRAYS = ("clip_ids.npy", "audio.npy", "audio_offsets.npy", "n_frames.npy")


def _shard_problem(path: "storage.Location", size: Optional[int]) -> Optional[str]:
    """What is wrong with a shard file, found without decoding it (an object store serves only
    the zip directory at its end); None if nothing."""
    try:
        actual = storage.size(path)
    except FileNotFoundError:
        return "shard is missing (was the corpus moved or deleted?)"
    if size is not None and actual != size:
        return f"shard is unreadable or truncated ({actual} bytes; the corpus recorded {size})"
    try:
        with storage.open_input(path) as f, zipfile.ZipFile(f) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return f"shard is unreadable or truncated ({type(e).__name__}: {e})"
    missing = [a for a in SHARD_ARRAYS if a not in names]
    return f"shard is unreadable (it lacks {', '.join(missing)})" if missing else None


class ShardCache:
    """A few decoded shards per process: workers stream shards in order, so a small LRU suffices."""

    def __init__(self, root: "storage.Location", capacity: int = 4):
        self.root = root
        self.capacity = capacity
        self._cache: OrderedDict[str, ShardReader] = OrderedDict()

    def get(self, rel: str) -> ShardReader:
        if rel in self._cache:
            self._cache.move_to_end(rel)
            return self._cache[rel]
        reader = ShardReader(storage.join(self.root, rel))
        self._cache[rel] = reader
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return reader


def _inside(root: "storage.Location", rel: str, what: str, where: str) -> Optional[Path]:
    p = Path(rel)
    if p.is_absolute():
        raise DataError(f"{where}: {what} path '{rel}' is absolute; manifest paths must be relative to the corpus root")
    if storage.is_remote(root):
        import posixpath

        if posixpath.normpath(rel).startswith(".."):
            raise DataError(f"{where}: {what} path '{rel}' escapes the corpus root {root}")
        return None
    resolved = (root / p).resolve()
    if resolved != root and root not in resolved.parents:
        raise DataError(f"{where}: {what} path '{rel}' escapes the corpus root {root}")
    return resolved


REQUIRED_ROW_FIELDS = ("clip_id", "split", "speaker", "shard", "shard_index", "n_frames", "sample_rate", "duration")


class Corpus:
    """A prepared corpus, in a local folder or under an object-store prefix (`s3://bucket/corpus`):
    validated manifest rows + lazy shard access."""

    def __init__(self, root: str | Path):
        self.root: storage.Location = str(root).rstrip("/") if storage.is_remote(root) else Path(root).resolve()
        meta_path = storage.join(self.root, CORPUS_META)
        man_path = storage.join(self.root, MANIFEST)
        if not storage.is_remote(self.root) and not self.root.is_dir():
            raise DataError(f"corpus folder {self.root} does not exist; create one with `avssl synth` or `avssl prepare`")
        try:  # each file read once: on an object store an existence check first is a request more
            meta_bytes, self._manifest_bytes = storage.read_bytes(meta_path), storage.read_bytes(man_path)
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(f"{self.root} is not a prepared corpus (no {CORPUS_META} / {MANIFEST})") from None
        try:
            self.meta = json.loads(meta_bytes)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: not valid JSON ({e})") from None
        self.rows = self._read_manifest(man_path, self._manifest_bytes)
        if not self.rows:
            raise DataError(f"{man_path}: the manifest has no clips")
        self.shards = ShardCache(self.root)

    def _read_manifest(self, path: "storage.Location", data: bytes) -> list[dict[str, Any]]:
        rows, seen = [], set()
        for ln, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            missing = [k for k in REQUIRED_ROW_FIELDS if k not in row]
            if missing:
                raise DataError(f"{where}: row lacks {', '.join(missing)}")
            if row["split"] not in SPLITS:
                raise DataError(f"{where}: split '{row['split']}' is not one of {', '.join(SPLITS)}")
            if row["sample_rate"] != SAMPLE_RATE:
                raise DataError(f"{where}: sample_rate {row['sample_rate']} (corpora are stored at {SAMPLE_RATE} Hz)")
            if row["clip_id"] in seen:
                raise DataError(f"{where}: clip_id '{row['clip_id']}' appears twice")
            seen.add(row["clip_id"])
            _inside(self.root, row["shard"], "shard", where)
            for key in ("audio_path", "video_path"):
                if row.get(key):
                    _inside(self.root, row[key], key, where)
            rows.append(row)
        return rows

    # -- selection -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.folder_name))

    @property
    def folder_name(self) -> str:
        """The last part of the corpus's folder or prefix."""
        return str(self.root).rstrip("/").rsplit("/", 1)[-1]

    @functools.cached_property
    def _digest(self) -> str:
        return hashlib.sha256(self._manifest_bytes).hexdigest()[:12]

    def digest(self) -> str:
        """A short content digest of the manifest: the same clips, labels and splits give the same one."""
        return self._digest

    def profile(self) -> dict[str, Any]:
        """Clip and speaker counts per split (what MLflow shows as the dataset's profile)."""
        splits: dict[str, int] = {}
        for r in self.rows:
            splits[r["split"]] = splits.get(r["split"], 0) + 1
        return {"clips": len(self.rows), "speakers": len({r["speaker"] for r in self.rows}), "splits": splits, "has_video": self.has_video}

    @property
    def has_video(self) -> bool:
        return bool(self.meta.get("has_video", False))

    @property
    def frame_size(self) -> Optional[tuple[int, int]]:
        fs = self.meta.get("frame_size")
        return tuple(fs) if fs else None

    def label_values(self, name: str) -> list[str]:
        """The class list of a discrete label, from the corpus metadata or the rows."""
        declared = self.meta.get("labels", {}).get(name)
        if declared:
            return list(declared)
        return sorted({str(r[name]) for r in self.rows if r.get(name) is not None})

    def select(
        self,
        split: Optional[str] = None,
        fraction: float = 1.0,
        seed: int = 0,
        require: Iterable[str] = (),
        max_clips: int = 0,
    ) -> list[dict[str, Any]]:
        """Rows of a split having every `require`d label; a seeded, stratified-by-speaker fraction."""
        rows = [r for r in self.rows if split is None or r["split"] == split]
        for name in require:
            rows = [r for r in rows if r.get(name) is not None]
        if fraction < 1.0 or max_clips:
            rng = np.random.default_rng(seed)
            by_spk: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                by_spk.setdefault(r["speaker"], []).append(r)
            keep = []
            for spk in sorted(by_spk):
                group = by_spk[spk]
                n = max(1, int(round(len(group) * fraction)))
                idx = rng.permutation(len(group))[:n]
                keep.extend(group[i] for i in sorted(idx))
            rows = keep
            if max_clips and len(rows) > max_clips:
                idx = np.sort(np.random.default_rng(seed + 1).permutation(len(rows))[:max_clips])
                rows = [rows[i] for i in idx]
        return rows

    # -- access ---------------------------------------------------------------------------
    def load(self, row: dict[str, Any]) -> Clip:
        shard = self.shards.get(row["shard"])
        i = int(row["shard_index"])
        if shard.arrays["clip_ids"][i] != row["clip_id"]:
            raise DataError(f"{shard.path}: entry {i} is '{shard.arrays['clip_ids'][i]}', manifest says '{row['clip_id']}'")
        labels = {k: row.get(k) for k in LABEL_FIELDS if row.get(k) is not None}
        frame_labels = {n: v for n in FRAME_LABELS if (v := shard.frame_label(i, n)) is not None}
        return Clip(
            clip_id=row["clip_id"],
            split=row["split"],
            speaker=row["speaker"],
            audio=shard.audio(i),
            frames=shard.frames(i),
            labels=labels,
            frame_labels=frame_labels,
        )

    def check_shards(self, rows: Iterable[dict[str, Any]]) -> None:
        """A cheap check, before any compute, of the shards holding these rows: each exists, has
        the size the corpus recorded, and a readable zip directory listing a shard's arrays. A
        missing or truncated shard is then one clear error up front: data errors are
        deterministic, so retrying a worker cannot help. (Damage inside an array that leaves the
        directory intact still surfaces when the shard is read.)"""
        from concurrent.futures import ThreadPoolExecutor

        recorded = self.meta.get("shards") or {}
        rels = sorted({r["shard"] for r in rows})
        with ThreadPoolExecutor(8) as pool:  # stat + directory read: latency-bound on network storage
            problems = list(pool.map(lambda rel: _shard_problem(storage.join(self.root, rel), (recorded.get(rel) or {}).get("bytes")), rels))
        bad = [f"{storage.join(self.root, rel)}: {p}" for rel, p in zip(rels, problems) if p]
        if len(bad) == 1:
            raise DataError(bad[0])
        if bad:
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DataError(f"{len(bad)} of {len(rels)} shards cannot be read:\n  " + "\n  ".join(bad[:10]) + more)

    def summary(self) -> dict[str, Any]:
        per_split = {s: sum(1 for r in self.rows if r["split"] == s) for s in SPLITS}
        speakers = {s: len({r["speaker"] for r in self.rows if r["split"] == s}) for s in SPLITS}
        if storage.is_remote(self.root):  # what the corpus recorded: listing a bucket is slow
            shards = self.meta.get("shards") or {}
            size, n_shards = sum(int(v.get("bytes", 0)) for v in shards.values()), len(shards)
        else:
            files = list((self.root / "shards").glob("*.npz"))
            size, n_shards = sum(p.stat().st_size for p in files), len(files)
        return {
            "name": self.name,
            "clips": len(self.rows),
            "clips_per_split": per_split,
            "speakers_per_split": speakers,
            "hours": sum(r["duration"] for r in self.rows) / 3600.0,
            "has_video": self.has_video,
            "frame_size": self.frame_size,
            "shards": n_shards,
            "bytes_on_disk": size,
            "labels": {k: self.label_values(k) for k in ("emotion", "word") if any(r.get(k) for r in self.rows)},
        }


@functools.lru_cache(maxsize=8)
def open_corpus(root: str, digest: str) -> "Corpus":
    """This process's handle on a corpus (its manifest parsed once, its shard cache kept): what a
    lazy clip sequence shipped to a Ray task reads through. `digest` is the manifest digest the
    sequence was made from: a corpus rewritten in place since then is an error, not other clips."""
    corpus = Corpus(root)
    if corpus.digest() != digest:
        raise DataError(f"corpus {root} changed while it was being read (manifest digest {corpus.digest()}, expected {digest})")
    return corpus


class ClipAudio:
    """The audio of some rows of a corpus, read when indexed: a sequence of float32 waves that
    pickles as the corpus location and its rows, so a split of any size costs a few shards of memory
    in each process that reads it. Reading in row order decodes each shard once; for shuffled
    passes use `shard_windows` (shuffle shards, then clips within a few shards)."""

    def __init__(self, corpus: "Corpus", rows: list[dict[str, Any]]):
        self.root, self.digest, self.rows = str(corpus.root), corpus.digest(), rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return open_corpus(self.root, self.digest).load(self.rows[int(i)]).audio

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def subset(self, idx: "Iterable[int]") -> "ClipAudio":
        out = ClipAudio.__new__(ClipAudio)
        out.root, out.digest, out.rows = self.root, self.digest, [self.rows[int(i)] for i in idx]
        return out

    def shard_windows(self, rng: np.random.Generator, window: int = 2) -> np.ndarray:
        """A shuffled order of all positions that decodes each shard once per pass: the shards in a
        random order, cut into windows of `window` shards, the clips of each window shuffled."""
        by_shard: dict[str, list[int]] = {}
        for i, r in enumerate(self.rows):
            by_shard.setdefault(r["shard"], []).append(i)
        names = sorted(by_shard)
        names = [names[j] for j in rng.permutation(len(names))]
        order: list[np.ndarray] = []
        for j in range(0, len(names), window):
            block = np.array([i for n in names[j : j + window] for i in by_shard[n]], np.int64)
            order.append(block[rng.permutation(len(block))])
        return np.concatenate(order) if order else np.zeros(0, np.int64)


class CorpusWriter:
    """Build a corpus in `<out>.partial/`; `finish()` writes the manifest and renames into place."""

    def __init__(self, out: str | Path, name: str, shard_size: int = 64, overwrite: bool = False):
        self.out = Path(out).resolve()
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise DataError(f"{self.out} already exists; choose another --out or pass --overwrite")
        self.partial = self.out.with_name(self.out.name + ".partial")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        (self.partial / "shards").mkdir(parents=True)
        self.name = name
        self.shard_size = shard_size
        self.rows: list[dict[str, Any]] = []
        self.shard_info: dict[str, dict[str, Any]] = {}
        self._pending: list[Clip] = []
        self._n_shards = 0
        self.frame_size: Optional[tuple[int, int]] = None
        self.has_video = False

    def next_shard_name(self) -> str:
        name = f"shards/shard-{self._n_shards:05d}.npz"
        self._n_shards += 1
        return name

    def add(self, clip: Clip) -> None:
        self._pending.append(clip)
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        # Keep audio-only and audio-visual clips in separate shards.
        groups = [[c for c in self._pending if c.frames is not None], [c for c in self._pending if c.frames is None]]
        self._pending = []
        for group in groups:
            if group:
                rel = self.next_shard_name()
                info = write_shard(self.partial / rel, group)
                self.add_written_shard(rel, info, [clip_row(c, rel, i) for i, c in enumerate(group)])

    def add_written_shard(self, rel: str, info: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Register a shard written elsewhere (e.g. by a worker process)."""
        self.shard_info[rel] = info
        self.rows.extend(rows)
        for r in rows:
            if r.get("frame_size"):
                self.has_video = True
                self.frame_size = tuple(r["frame_size"])

    def finish(self, meta: Optional[dict[str, Any]] = None) -> Path:
        self.flush()
        if not self.rows:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise DataError(f"no usable clips were found; nothing written to {self.out}")
        self.rows.sort(key=lambda r: r["clip_id"])
        dupes = sorted({a["clip_id"] for a, b in zip(self.rows, self.rows[1:]) if a["clip_id"] == b["clip_id"]})
        if dupes:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise DataError(f"clip ids must be unique; repeated: {', '.join(dupes[:5])}")
        lines = "\n".join(json.dumps(r, sort_keys=True) for r in self.rows) + "\n"
        atomic_write_bytes(self.partial / MANIFEST, lines.encode())
        full_meta = {
            "name": self.name,
            "format_version": FORMAT_VERSION,
            "sample_rate": SAMPLE_RATE,
            "fps": FPS,
            "has_video": self.has_video,
            "frame_size": list(self.frame_size) if self.frame_size else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "shards": self.shard_info,
            **(meta or {}),
        }
        atomic_write_bytes(self.partial / CORPUS_META, json.dumps(full_meta, indent=2, sort_keys=True).encode())
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.out)
        return self.out


def clip_row(clip: Clip, shard: str, index: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "clip_id": clip.clip_id,
        "split": clip.split,
        "speaker": clip.speaker,
        "shard": shard,
        "shard_index": index,
        "n_frames": clip.n_frames,
        "sample_rate": SAMPLE_RATE,
        "duration": round(len(clip.audio) / SAMPLE_RATE, 4),
        "has_video": clip.frames is not None,
    }
    if clip.frames is not None:
        row["frame_size"] = [int(clip.frames.shape[1]), int(clip.frames.shape[2])]
    for k in LABEL_FIELDS:
        if clip.labels.get(k) is not None:
            v = clip.labels[k]
            row[k] = float(v) if isinstance(v, (np.floating, float)) else v
    for k in ("audio_path", "video_path", "source"):
        if getattr(clip, k):
            row[k] = getattr(clip, k)
    if clip.frame_labels:
        row["frame_labels"] = sorted(clip.frame_labels)
    return row
