"""Evaluation results read back from MLflow: one `Record` per finished evaluation run, keyed by
everything that makes two evaluations different experiments (method, task, corpus, head, layer,
frozen/fine-tuned, label fraction, study), with the test predictions every interval is computed from.

`Results` groups them: the latest record per key, the cell of one (method or objective) on one
task/condition, and paired differences between two cells over the same test clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from avssl.evaluate.stats import Interval, cell_interval, paired_difference
from avssl.evaluate.tasks import TASKS
from avssl.tracking import Tracker

KIND_ORDER = {"pretrained": 0, "scratch": 1, "mfcc": 2, "logmel": 3}
OBJECTIVE_ORDER = {"av": 0, "audio": 1, "visual": 2}


@dataclass
class Record:
    run: Any
    tags: dict[str, str]
    _arrays: Optional[dict[str, np.ndarray]] = None
    _tracker: Optional[Tracker] = None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def method(self) -> str:
        return self.tags.get("avssl.method", "?")

    @property
    def kind(self) -> str:
        return self.tags.get("avssl.method_kind", "pretrained")

    @property
    def objective(self) -> str:
        return self.tags.get("avssl.objective", "") if self.kind == "pretrained" else ""

    @property
    def task(self) -> str:
        return self.tags.get("avssl.task", "?")

    @property
    def corpus(self) -> str:
        return self.tags.get("avssl.corpus", "?")

    @property
    def fraction(self) -> float:
        return float(self.tags.get("avssl.label_fraction", "1"))

    @property
    def setting(self) -> tuple[str, str, str]:
        """What the head reads and how: (head, layer, frozen | fine-tuned)."""
        return (self.tags.get("avssl.head", "?"), self.tags.get("avssl.layer", "-"), "fine-tuned" if self.tags.get("avssl.finetune") == "true" else "frozen")

    def in_setting(self, setting: Optional[tuple[str, str, str]]) -> bool:
        """Hand features have no layer: they belong to every layer setting of their head and mode."""
        if setting is None:
            return True
        head, layer, mode = self.setting
        return head == setting[0] and mode == setting[2] and (layer == setting[1] or layer == "-")

    @property
    def primary(self) -> str:
        return TASKS.get(self.task).primary

    def arrays(self) -> Optional[dict[str, np.ndarray]]:
        """The run's predictions.npz (None for runs logged before predictions were kept)."""
        if self._arrays is None and self._tracker is not None:
            try:
                path = self._tracker.download(self.run_id, "predictions.npz")
                with np.load(path, allow_pickle=False) as z:
                    self._arrays = {k: z[k] for k in z.files}
            except Exception:
                self._arrays = {}
        return self._arrays or None

    def predictions(self, condition: str = "clean") -> Optional[np.ndarray]:
        a = self.arrays()
        return None if a is None else a.get(f"pred/{condition}")

    def conditions(self) -> list[str]:
        a = self.arrays() or {}
        return [k[len("pred/"):] for k in a if k.startswith("pred/")]


def method_sort_key(r: Record) -> tuple:
    return (KIND_ORDER.get(r.kind, 9), OBJECTIVE_ORDER.get(r.objective, 9), r.method)


@dataclass
class Cell:
    """One method (or several encoders of one objective, stacked as more seeds) on one test set."""

    label: str
    records: list[Record]
    condition: str = "clean"

    def stacked(self) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(y_true, preds [S, N(, K)], speakers, clip_ids) over every record; None if any lacks predictions
        or the records do not share one test set."""
        preds, base = [], None
        for r in self.records:
            a, p = r.arrays(), r.predictions(self.condition)
            if a is None or p is None:
                return None
            if base is None:
                base = a
            elif not np.array_equal(base["clip_ids"], a["clip_ids"]):
                return None
            preds.append(p)
        if base is None:
            return None
        return base["y_true"], np.concatenate(preds), base["speakers"], base["clip_ids"]


@dataclass
class Results:
    records: list[Record]
    n_boot: int = 2000
    unit: str = "auto"  # speaker | clip | auto (speakers when the test set has at least min_speakers)
    min_speakers: int = 8
    _cache: dict[Any, Interval] = field(default_factory=dict)

    @classmethod
    def load(cls, tracker: Tracker, parent_tag: Optional[tuple[str, str]] = None, n_boot: int = 2000, unit: str = "auto") -> "Results":
        query = {"avssl.kind": "evaluate"}
        if parent_tag:
            query[parent_tag[0]] = parent_tag[1]
        runs = [r for r in tracker.find_runs(query) if r.info.status == "FINISHED"]
        runs.sort(key=lambda r: r.info.start_time or 0)
        return cls([Record(r, dict(r.data.tags), _tracker=tracker) for r in runs], n_boot, unit)

    # -- selection ----------------------------------------------------------------------------
    def latest(self, **where: Any) -> list[Record]:
        """The most recent record per (method, task, corpus, setting, fraction, study) among those matching."""
        out: dict[tuple, Record] = {}
        for r in self.records:
            if all(getattr(r, k) == v if not callable(v) else v(r) for k, v in where.items()):
                out[(r.method, r.task, r.corpus, r.setting, r.fraction, r.tags.get("avssl.study", ""))] = r
        return sorted(out.values(), key=method_sort_key)

    def main_records(self) -> list[Record]:
        """Heads trained on clean audio with all labels: plain evaluations and noise-study heads."""
        def clean_full(r: Record) -> bool:
            study = r.tags.get("avssl.study")
            return r.fraction == 1.0 and (study is None or (study == "noise" and r.tags.get("avssl.train_with_noise") == "false"))

        latest: dict[tuple, Record] = {}
        for r in self.records:  # in start-time order: the latest evaluation of a cell wins
            if clean_full(r):
                latest[(r.method, r.task, r.corpus, r.setting)] = r
        return sorted(latest.values(), key=method_sort_key)

    # -- statistics ---------------------------------------------------------------------------
    def _groups(self, speakers: np.ndarray) -> Optional[np.ndarray]:
        if self.unit == "clip":
            return None
        if self.unit == "speaker" or len(set(speakers.tolist())) >= self.min_speakers:
            return speakers
        return None

    def unit_of(self, speakers: np.ndarray) -> str:
        return "test clips" if self._groups(speakers) is None else "test speakers"

    def interval(self, cell: Cell, metric: str) -> Optional[Interval]:
        key = ("cell", tuple(r.run_id for r in cell.records), cell.condition, metric)
        if key not in self._cache:
            s = cell.stacked()
            if s is None:
                return None
            y, p, spk, _ = s
            self._cache[key] = cell_interval(y, p, metric, self._groups(spk), n_boot=self.n_boot)
        return self._cache[key]

    def difference(self, a: Cell, b: Cell, metric: str) -> Optional[Interval]:
        key = ("diff", tuple(r.run_id for r in a.records), tuple(r.run_id for r in b.records), a.condition, b.condition, metric)
        if key not in self._cache:
            sa, sb = a.stacked(), b.stacked()
            if sa is None or sb is None or not np.array_equal(sa[3], sb[3]):
                return None
            self._cache[key] = paired_difference(sa[0], sa[1], sb[1], metric, self._groups(sa[2]), n_boot=self.n_boot)
        return self._cache[key]

    def pooled_difference(self, a: list[Cell], b: list[Cell], metric: str) -> Optional[Interval]:
        """The difference of the metric averaged over several conditions (e.g. every noisy one), as one
        paired bootstrap: the conditions' test sets are stacked, speakers shared across them."""
        sa = [c.stacked() for c in a]
        sb = [c.stacked() for c in b]
        if not sa or any(x is None for x in sa + sb) or any(not np.array_equal(x[3], sa[0][3]) for x in sa + sb):
            return None
        s_min_a, s_min_b = min(x[1].shape[0] for x in sa), min(x[1].shape[0] for x in sb)
        y = np.concatenate([x[0] for x in sa])
        pa = np.concatenate([x[1][:s_min_a] for x in sa], axis=1)
        pb = np.concatenate([x[1][:s_min_b] for x in sb], axis=1)
        spk = np.concatenate([x[2] for x in sa])
        groups = self._groups(sa[0][2])
        if groups is None:  # a clip and its noisy copies stay together
            groups = np.concatenate([x[3] for x in sa])
        else:
            groups = spk
        return paired_difference(y, pa, pb, metric, groups, n_boot=self.n_boot)


def objective_cells(records: list[Record], condition: str = "clean") -> dict[str, Cell]:
    """Pretrained records grouped by objective (several encoders of one objective = more seeds), and
    the baselines by kind."""
    out: dict[str, list[Record]] = {}
    for r in records:
        key = r.objective if r.kind == "pretrained" else r.kind
        if key:
            out.setdefault(key, []).append(r)
    return {k: Cell(k, v, condition) for k, v in out.items()}
