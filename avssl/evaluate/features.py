"""Frozen features, written once and read back by every seed, head and study.

A feature set holds the [T, D] frames of every clip of one split, as one frozen source computed
them under one noise condition: float32 frames back to back in `<key>.f32`, and an index
`<key>.npz` (clip offsets, per-dimension mean and standard deviation over all frames). The key is a
digest of everything that decides the features: the source's weights and layer, the corpus
manifest, the clips, the condition, its noise seed and the babble settings. A set found under its
key is reused, whether this process, another Ray task or an earlier run wrote it.

Reads are positioned reads of the clips a batch needs, so a head trains with a batch of features
in memory whatever the corpus size. The store is a local folder (shared with the other nodes on a
cluster's shared file system) or an object-store prefix, from which each process copies the sets
it reads to its own temporary folder, in chunks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from avssl import storage

FORMAT = "f1"  # part of every key: change it when extraction changes what a key's features are
DTYPE = np.float32


class FrameMoments:
    """Per-dimension mean and standard deviation (unbiased, floored at 1e-5) of [T, D] frames added
    a clip at a time, in float64: nothing of the size of the split is held."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.n, self.s1, self.s2 = self.n + len(x), self.s1 + x.sum(0), self.s2 + (x * x).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s1 / self.n
        std = ((self.s2 / self.n - mean**2).clamp_min(0) * self.n / max(1, self.n - 1)).sqrt()
        return mean.float(), std.float().clamp_min(1e-5)


def feature_set_key(*parts: object) -> str:
    return hashlib.sha256("\n".join([FORMAT, *map(str, parts)]).encode()).hexdigest()[:24]


class FeatureSet:
    """The features of one split: `clip(i)` reads clip i's [T, D] frames from the file."""

    def __init__(self, path: Path, offsets: np.ndarray, dim: int, mean: np.ndarray, std: np.ndarray, positions: Optional[np.ndarray] = None):
        self.path, self.offsets, self.dim = Path(path), offsets, int(dim)
        self.mean, self.std = mean, std
        self.positions = positions  # a view: clip i of this set is clip positions[i] of the file
        self._fd: Optional[int] = None

    def __len__(self) -> int:
        return len(self.positions) if self.positions is not None else len(self.offsets) - 1

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    @property
    def frames(self) -> int:
        return int(self.offsets[-1])

    def clip(self, i: int) -> torch.Tensor:
        j = int(self.positions[i]) if self.positions is not None else int(i)
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        width = self.dim * np.dtype(DTYPE).itemsize
        data = os.pread(self._fd, (b - a) * width, a * width)
        if len(data) != (b - a) * width:
            from avssl.errors import DataError

            raise DataError(f"feature file {self.path} is shorter than its index says (truncated?); delete it to recompute")
        return torch.from_numpy(np.frombuffer(data, DTYPE).reshape(b - a, self.dim).copy())

    def subset(self, positions: Iterable[int]) -> "FeatureSet":
        """A view of some clips (a label fraction), reading the same file."""
        pos = np.asarray(list(positions), np.int64)
        if self.positions is not None:
            pos = self.positions[pos]
        return FeatureSet(self.path, self.offsets, self.dim, self.mean, self.std, pos)


_SCRATCH: dict[tuple[int, str], Path] = {}


def _scratch_dir(tag: str) -> Path:
    """A folder of this process's own, removed when it exits (local copies, an unnamed store)."""
    from avssl import scratch

    key = (os.getpid(), tag)
    if key not in _SCRATCH:
        _SCRATCH[key] = scratch.folder(f"{tag}-")
    return _SCRATCH[key]


class FeatureStore:
    """Feature sets by key under `root` (a local folder or an object-store prefix); without a root,
    a temporary folder of this process."""

    def __init__(self, root: Optional[storage.Location] = None):
        self.named = bool(root)
        self.root: storage.Location = root if root else _scratch_dir("features")

    def __getstate__(self) -> dict:
        return {"root": self.root if self.named else None}  # an unnamed store: each process its own

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def _paths(self, key: str) -> tuple[storage.Location, storage.Location]:
        return storage.join(self.root, f"{key}.f32"), storage.join(self.root, f"{key}.npz")

    def get(self, key: str) -> Optional[FeatureSet]:
        """The set stored under `key`, or None (absent, or its data shorter than its index)."""
        data, index = self._paths(key)
        try:
            with storage.open_input(index) as f:
                z = np.load(f, allow_pickle=False)
                offsets, mean, std = z["offsets"], z["mean"], z["std"]
            expected = int(offsets[-1]) * len(mean) * np.dtype(DTYPE).itemsize
            if storage.size(data) != expected:
                return None
        except (FileNotFoundError, OSError, KeyError, ValueError):
            return None
        local = Path(data) if not storage.is_remote(data) else self._local_copy(key, data)
        return FeatureSet(local, offsets, len(mean), mean, std)

    def _local_copy(self, key: str, location: storage.Location) -> Path:
        path = _scratch_dir("feature-copies") / f"{key}.f32"
        if not path.exists():
            storage.copy_file(location, path)
        return path

    def write(self, key: str, batches: Iterable[list[torch.Tensor]]) -> FeatureSet:
        """Stream clips' [T, D] features (lists per batch) into the set `key`: data first, index last,
        each appearing whole, so a reader never sees half a set."""
        data, index = self._paths(key)
        local_dir = Path(self.root) if not storage.is_remote(self.root) else _scratch_dir("feature-writes")
        local_dir.mkdir(parents=True, exist_ok=True)
        tmp = local_dir / f".{key}.{os.getpid()}.f32.tmp"
        offsets, total, dim, moments = [0], 0, None, FrameMoments()
        try:
            with open(tmp, "wb") as f:
                for feats in batches:
                    for x in feats:
                        x = x.detach()
                        dim = x.shape[1] if dim is None else dim
                        moments.add(x)
                        f.write(np.ascontiguousarray(x.numpy().astype(DTYPE)).tobytes())
                        total += len(x)
                        offsets.append(total)
            if dim is None or total == 0:
                raise ValueError(f"no features to store under {key}")
            mean, std = (t.numpy() for t in moments.mean_std())
            offsets_arr = np.asarray(offsets, np.int64)
            if storage.is_remote(data):
                storage.copy_file(tmp, data)
                local = self._adopt_copy(key, tmp)
            else:
                os.replace(tmp, data)
                local = Path(data)
            import io

            buf = io.BytesIO()
            np.savez(buf, offsets=offsets_arr, mean=mean, std=std)
            storage.write_bytes(index, buf.getvalue())
        finally:
            if tmp.exists():
                tmp.unlink()
        return FeatureSet(local, offsets_arr, dim, mean, std)

    def _adopt_copy(self, key: str, tmp: Path) -> Path:
        path = _scratch_dir("feature-copies") / f"{key}.f32"
        os.replace(tmp, path)
        return path

    def discard(self, key: str) -> None:
        """Remove a one-off set (noisy training features drawn fresh each epoch)."""
        for location in self._paths(key):
            if storage.is_remote(location):
                fs, path = storage.filesystem(str(location))
                try:
                    fs.delete_file(path)
                except OSError:
                    pass
            else:
                Path(location).unlink(missing_ok=True)
        copy = _SCRATCH.get((os.getpid(), "feature-copies"))
        if copy is not None:
            (copy / f"{key}.f32").unlink(missing_ok=True)
