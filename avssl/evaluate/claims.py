"""The four claims of the visual self-supervision paper, each judged on this run's numbers as
supported, contradicted or unresolved, from paired differences with 95 % intervals.

1. Visual self-supervision improves audio representations for emotion recognition
   (visual-pretrained encoder vs the same encoder trained from scratch, emotion, clean).
2. Audio-only self-supervision does too (audio-pretrained vs scratch).
3. The multi-task combination is better than either alone and more robust in noise
   (av vs audio and av vs visual: clean, and averaged over every noisy condition of the noise study).
4. Pretraining beats training from scratch and overfits less on small labelled sets
   (at the smallest label fraction of the dataset-size study: pretrained vs scratch on the test
   metric, and scratch's overfitting gap minus the pretrained one's).

A difference is *resolved* when its interval excludes 0. A claim is supported when every one of its
primary differences is resolved in its favour, contradicted when any is resolved against it, and
unresolved otherwise. Differences against hand features (MFCC, log-mel) are shown as context.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from avssl.evaluate.results import Cell, Record, Results, objective_cells
from avssl.evaluate.stats import Interval

SUPPORTED, CONTRADICTED, UNRESOLVED, NOT_RUN = "supported", "contradicted", "unresolved", "not run"

CLAIM_TEXT = {
    1: "Visual self-supervision improves audio representations for emotion recognition",
    2: "Audio-only self-supervision improves audio representations for emotion recognition",
    3: "The multi-task (audio-visual) combination is better than either alone, and more robust in noise",
    4: "Pretraining beats training from scratch, and overfits less, on small labelled sets",
}


@dataclass
class Claim:
    number: int
    text: str
    verdict: str
    primary: list[tuple[str, Interval]] = field(default_factory=list)
    context: list[tuple[str, Interval]] = field(default_factory=list)
    note: str = ""


def verdict_of(primary: list[tuple[str, Interval]], required: int) -> str:
    if not primary or len(primary) < required:
        return NOT_RUN if not primary else (CONTRADICTED if any(iv.resolved and iv.direction < 0 for _, iv in primary) else UNRESOLVED)
    if any(iv.resolved and iv.direction < 0 for _, iv in primary):
        return CONTRADICTED
    if all(iv.resolved and iv.direction > 0 for _, iv in primary):
        return SUPPORTED
    return UNRESOLVED


def main_setting(records: list[Record], task: str = "emotion") -> Optional[tuple[str, str, str]]:
    """The head setting most of the task's encoder evaluations used (hand features fit any layer)."""
    counts = Counter(r.setting for r in records if r.task == task and r.setting[1] != "-")
    counts = counts or Counter(r.setting for r in records if r.task == task)
    return counts.most_common(1)[0][0] if counts else None


def _diff(res: Results, cells: dict[str, Cell], a: str, b: str, metric: str, label: str) -> Optional[tuple[str, Interval]]:
    if a not in cells or b not in cells:
        return None
    iv = res.difference(cells[a], cells[b], metric)
    return (label, iv) if iv is not None else None


def gap_difference(a_gaps: np.ndarray, b_gaps: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """mean(a) - mean(b) of per-seed overfitting gaps, seeds resampled independently per method."""
    rng = np.random.default_rng(seed)
    a_gaps, b_gaps = np.asarray(a_gaps, float), np.asarray(b_gaps, float)
    ra = a_gaps[rng.integers(0, len(a_gaps), (n_boot, len(a_gaps)))].mean(1)
    rb = b_gaps[rng.integers(0, len(b_gaps), (n_boot, len(b_gaps)))].mean(1)
    d = ra - rb
    lo, hi = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(a_gaps.mean() - b_gaps.mean()), float(lo), float(hi), level, n_boot, f"bootstrap over seeds, {n_boot} resamples")


def judge(res: Results, task: str = "emotion") -> list[Claim]:
    """The four claims on the records in `res` (the emotion task by default)."""
    from avssl.evaluate.tasks import TASKS

    metric = TASKS.get(task).primary
    main = [r for r in res.main_records() if r.task == task]
    setting = main_setting(main, task)
    main = [r for r in main if r.in_setting(setting)]
    cells = objective_cells(main)
    claims = []
    for n, obj in ((1, "visual"), (2, "audio")):
        primary = [d for d in [_diff(res, cells, obj, "scratch", metric, f"{obj} - scratch")] if d]
        context = [d for d in (_diff(res, cells, obj, "mfcc", metric, f"{obj} - MFCC"), _diff(res, cells, obj, "logmel", metric, f"{obj} - log-mel")) if d]
        claims.append(Claim(n, CLAIM_TEXT[n], verdict_of(primary, 1), primary, context))

    primary = [d for d in (_diff(res, cells, "av", "audio", metric, "av - audio (clean)"), _diff(res, cells, "av", "visual", metric, "av - visual (clean)")) if d]
    noise_records = [r for r in res.latest(task=task) if r.tags.get("avssl.study") == "noise" and r.tags.get("avssl.train_with_noise") == "false" and r.in_setting(setting)]
    noisy = sorted({c for r in noise_records for c in r.conditions() if c != "clean"})
    note = ""
    if noisy:
        by_obj: dict[str, list[Record]] = {}
        for r in noise_records:
            by_obj.setdefault(r.objective or r.kind, []).append(r)
        for other in ("audio", "visual"):
            if "av" in by_obj and other in by_obj:
                iv = res.pooled_difference([Cell("av", by_obj["av"], c) for c in noisy], [Cell(other, by_obj[other], c) for c in noisy], metric)
                if iv is not None:
                    primary.append((f"av - {other} (mean over {len(noisy)} noisy conditions)", iv))
    else:
        note = "no noise study on this task: the robustness half is not tested"
    claims.append(Claim(3, CLAIM_TEXT[3], verdict_of(primary, 4), primary, note=note))

    claims.append(_claim4(res, task, metric, setting))
    return claims


def _claim4(res: Results, task: str, metric: str, setting) -> Claim:
    size = [r for r in res.latest(task=task) if r.tags.get("avssl.study") == "datasize" and r.in_setting(setting)]
    fractions = sorted({r.fraction for r in size})
    if not fractions:
        return Claim(4, CLAIM_TEXT[4], NOT_RUN, note="no dataset-size study on this task")
    smallest = fractions[0]
    at = [r for r in size if r.fraction == smallest]
    cells = objective_cells(at)
    pretrained = next((o for o in ("av", "audio", "visual") if o in cells), None)
    primary, context, note = [], [], ""
    if pretrained and "scratch" in cells:
        d = res.difference(cells[pretrained], cells["scratch"], metric)
        if d is not None:
            primary.append((f"{pretrained} - scratch at {100 * smallest:g}% labels", d))
        gaps = [np.concatenate([r.arrays()["gap"] for r in cells[k].records]) for k in ("scratch", pretrained) if all(r.arrays() is not None and "gap" in r.arrays() for r in cells[k].records)]
        if len(gaps) == 2:
            unfit = [k for k in ("scratch", pretrained) if not fits_training_data(cells[k].records, metric)]
            label = f"overfitting gap: scratch - {pretrained} at {100 * smallest:g}% labels"
            if unfit:  # a model that never fits its training data has no gap to speak of: not evidence either way
                note = (f"the overfitting comparison is not informative: {', '.join(unfit)} never rose above chance on its own "
                        f"training clips at {100 * smallest:g}% labels")
                context.append((label, gap_difference(gaps[0], gaps[1], res.n_boot)))
            else:
                primary.append((label, gap_difference(gaps[0], gaps[1], res.n_boot)))
        for other in ("mfcc", "logmel"):
            if other in cells:
                d = res.difference(cells[pretrained], cells[other], metric)
                if d is not None:
                    context.append((f"{pretrained} - {other} at {100 * smallest:g}% labels", d))
    return Claim(4, CLAIM_TEXT[4], verdict_of(primary, 2), primary, context, note)


def fits_training_data(records: list[Record], metric: str, margin: float = 0.05) -> bool:
    """Whether a method's best training score (best validation + gap, per seed) clears chance by `margin`
    on average: chance is 1/K for classification metrics over K classes, 0 for CCC."""
    scores, chance = [], 0.0
    for r in records:
        a = r.arrays()
        if a is None or "gap" not in a or "best_val" not in a:
            return True
        scores.append(a["gap"] + a["best_val"])
        if metric != "ccc":
            chance = 1.0 / max(1, len(np.unique(a["y_true"])))
    return float(np.mean(np.concatenate(scores))) > chance + margin
