"""SEWA-style continuous affect: audio/<Split>_<ID>.wav + annotations/<Split>_<ID>.csv.

The CSV has a header with `time` (seconds), `arousal` and `valence` columns (comma or
semicolon separated). Recordings are cut into clips of prepare.segment_seconds; per-frame labels
are the annotations interpolated at each 25 fps frame, clip labels their mean. <Split> is Train,
Devel or Test (as in AVEC/SEWA); each recording is one subject.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from avssl.data.constants import FPS, HOP
from avssl.data.corpus import Clip, fit_to_frames
from avssl.data.media import read_audio
from avssl.data.readers.base import READERS, Item, Reader, Skip
from avssl.errors import BadClipError

SPLITS = {"train": "train", "devel": "val", "dev": "val", "test": "test"}


def read_annotations(path: Path) -> dict[str, np.ndarray]:
    text = path.read_text(errors="replace")
    dialect = csv.Sniffer().sniff(text.splitlines()[0]) if text.strip() else csv.excel
    rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
    if not rows:
        raise BadClipError("missing_labels", f"{path}: no annotation rows")
    cols = {k.strip().lower(): k for k in rows[0]}
    missing = [c for c in ("time", "arousal", "valence") if c not in cols]
    if missing:
        raise BadClipError("missing_labels", f"{path}: no column(s) {', '.join(missing)} (have {', '.join(cols)})")
    try:
        return {c: np.array([float(r[cols[c]]) for r in rows]) for c in ("time", "arousal", "valence")}
    except (TypeError, ValueError) as e:
        raise BadClipError("missing_labels", f"{path}: non-numeric annotation ({e})") from None


@READERS.register("sewa")
class Sewa(Reader):
    name = "sewa"
    layout = "audio/<Split>_<ID>.wav + annotations/<Split>_<ID>.csv (time, arousal, valence)"

    def items(self) -> Iterator[Union[Item, Skip]]:
        for wav in sorted((self.root / "audio").glob("*.wav")):
            split = SPLITS.get(wav.stem.split("_")[0].lower())
            ann = self.root / "annotations" / f"{wav.stem}.csv"
            if split is None:
                yield Skip(wav, "bad_filename", f"{wav.name}: expected Train_/Devel_/Test_ prefix")
                continue
            if not ann.is_file():
                yield Skip(wav, "missing_labels", f"{wav.name}: no annotation file {ann.name}")
                continue
            yield Item(wav.stem, wav, wav.stem, split, extra={"annotations": ann})

    def load_many(self, item: Item) -> list[Clip]:
        ann = read_annotations(item.extra["annotations"])
        audio, _ = fit_to_frames(read_audio(item.path))
        n_frames = len(audio) // HOP
        t = (np.arange(n_frames) + 0.5) / FPS
        if ann["time"].max() < t[-1] * 0.5:
            raise BadClipError("missing_labels", f"{item.path.name}: annotations cover {ann['time'].max():.1f} s of {t[-1]:.1f} s")
        arousal = np.interp(t, ann["time"], ann["arousal"]).astype(np.float32)
        valence = np.interp(t, ann["time"], ann["valence"]).astype(np.float32)
        covered = t <= ann["time"].max() + 1.0 / FPS
        seg = int(self.cfg.segment_seconds * FPS)
        clips = []
        for k, start in enumerate(range(0, n_frames - seg // 2, seg)):
            stop = min(start + seg, n_frames)
            if not covered[start:stop].all():
                break
            a, v = arousal[start:stop], valence[start:stop]
            clips.append(
                Clip(
                    f"{item.clip_id}_{k:03d}",
                    item.split or "train",
                    item.speaker,
                    audio[start * HOP : stop * HOP],
                    labels={"arousal": float(a.mean()), "valence": float(v.mean())},
                    frame_labels={"arousal": a, "valence": v},
                    source=f"{self.rel(item.path)}@{start / FPS:.2f}s",
                )
            )
        return clips
