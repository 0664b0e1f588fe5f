"""What a corpus reader is: enumerate candidate clips cheaply, then decode one into a `Clip`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from avssl.config.schema import PrepareConfig
from avssl.data.corpus import Clip
from avssl.errors import DataError
from avssl.registry import Registry


@dataclass
class Item:
    """A clip found on disk, not decoded yet."""

    clip_id: str
    path: Path
    speaker: str
    split: Optional[str]  # None: decided by the speaker split
    labels: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skip:
    """A file the layout names but that cannot become a clip (e.g. an unknown label in its name)."""

    path: Path
    reason: str
    message: str


class Reader:
    name = "base"
    layout = ""  # one line shown when the folder does not match
    has_video = False
    labels: dict[str, list[str]] = {}

    def __init__(self, root: Path, cfg: PrepareConfig):
        self.root = Path(root)
        self.cfg = cfg
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder")

    def items(self) -> Iterator[Union[Item, Skip]]:
        raise NotImplementedError

    def load(self, item: Item) -> Clip:
        raise NotImplementedError

    def load_many(self, item: Item) -> list[Clip]:
        """Most files are one clip; long recordings override this to cut several."""
        return [self.load(item)]

    def empty_error(self) -> DataError:
        return DataError(f"no clips found under {self.root} in the '{self.name}' layout (expected {self.layout})")

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))


def speaker_splits(speakers: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Speaker-independent train/val/test: a seeded permutation cut by the fractions."""
    uniq = sorted(set(speakers))
    order = [uniq[i] for i in np.random.default_rng([seed, 11]).permutation(len(uniq))]
    n = len(order)
    n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
    out = {}
    for i, spk in enumerate(order):
        out[spk] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


READERS: Registry[type[Reader]] = Registry("dataset")
