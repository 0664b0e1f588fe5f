"""Bootstrap intervals for downstream results: one cell, and paired differences between methods.

A cell is one (method, task, corpus, condition) evaluation: a head is trained for S seeds and
predicts every one of N test clips, and the clips belong to test speakers. Two sources of
variation matter for what a reader may conclude from it: which seeds were drawn (head training
noise), and which speakers happen to make up the test set (sampling noise). The interval of a
cell comes from a two-level bootstrap over both.

**Resampling.** One replicate draws S seeds with replacement and G test clusters (speakers when
``groups`` is given, otherwise single clips) with replacement; the replicate value is the mean
over the drawn seeds of the metric computed on the drawn clips (all clips of a drawn speaker, as
many times as the speaker was drawn). The interval is the percentile interval of the replicate
values; the estimate is the mean over all seeds of the metric on all clips.

**Vectorisation.** Drawing clusters with replacement is the same as giving every clip an integer
weight (how often its cluster was drawn), and every metric here is a function of weighted sums
over clips. So a batch of replicates is one matrix product: clip weights ``[B, N]`` times a
per-clip feature matrix ``[N, M]`` (correct-or-not per seed, class one-hots, or the moments CCC
needs), followed by a cheap per-replicate finish. Seeds are handled the same way with integer
seed counts ``[B, S]``.

**Caveat.** With few seeds (S = 5) the seed level of the bootstrap sees only five values, so when
seed-to-seed variation dominates, percentile intervals run somewhat short of their nominal level
(about 91-93 % for a nominal 95 % in simulations with 20 test speakers).

Metrics (higher is better for all):

- ``accuracy``: fraction of clips predicted correctly.
- ``uar``: unweighted average recall, the mean per-class recall over the classes present in the
  (resampled) ground truth; equals scikit-learn's ``balanced_accuracy_score``.
- ``ccc``: Lin's concordance correlation coefficient per output dimension, averaged over the K
  dimensions (population moments, as in :func:`avssl.evaluate.metrics.ccc`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

# Elements of the [chunk, N] weight matrix (and of the [chunk, M] sums) per bootstrap chunk.
_CHUNK_ELEMENTS = 4_000_000


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap interval.

    For a difference between two methods (``a - b``), ``resolved`` says whether the interval
    excludes 0 and ``direction`` which way it points (+1: a is better, -1: b is better,
    0: unresolved). Both are computed from the bounds, so they also apply to a plain value.
    """

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n_boot: int = 0
    method: str = ""

    @property
    def resolved(self) -> bool:
        """True when the interval lies entirely above or entirely below 0."""
        return bool(self.low > 0.0 or self.high < 0.0)

    @property
    def direction(self) -> int:
        """+1 if the interval lies above 0, -1 if below, 0 if it contains 0 (or is undefined)."""
        if self.low > 0.0:
            return 1
        if self.high < 0.0:
            return -1
        return 0

    @property
    def width(self) -> float:
        return float(self.high - self.low)

    def contains(self, value: float) -> bool:
        return bool(self.low <= value <= self.high)

    def as_dict(self) -> dict[str, Any]:
        """Plain fields plus ``resolved`` and ``direction`` (for JSON or MLflow tags)."""
        d = asdict(self)
        d["resolved"] = self.resolved
        d["direction"] = self.direction
        return d


def bootstrap_se(score: Callable[[np.ndarray], float], n: int, seed: int = 0, resamples: int = 200) -> float:
    """Standard error of `score(indices)` over n clips, by bootstrap (clips resampled with
    replacement): a selection metric's resolution, i.e. how far apart two search trials must be
    to be told apart. Intervals in reports come from `cell_interval` / `paired_difference`."""
    rng = np.random.default_rng(seed)
    values = [score(rng.integers(0, n, n)) for _ in range(resamples)]
    return float(np.nanstd(values, ddof=1))


def format_interval(iv: Interval, digits: int = 3) -> str:
    """``"0.412 [0.380, 0.441]"``."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(iv.estimate)} [{f.format(iv.low)}, {f.format(iv.high)}]"


def format_difference(iv: Interval, digits: int = 3) -> str:
    """``"+0.051 [+0.012, +0.090] resolved"`` or ``"... unresolved"`` (signed numbers)."""
    f = f"{{:+.{digits}f}}"
    word = "resolved" if iv.resolved else "unresolved"
    return f"{f.format(iv.estimate)} [{f.format(iv.low)}, {f.format(iv.high)}] {word}"


# ---------------------------------------------------------------------------------------------
# Batched metrics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A metric reduced to weighted sums over clips.

    ``features`` is ``[N, M]``; for clip weights ``w [B, N]`` the metric of every seed in every
    replicate is ``finish(w @ features, w.sum(1))``, an array ``[B, S]``.
    """

    features: np.ndarray
    finish: Callable[[np.ndarray, np.ndarray], np.ndarray]
    n_seeds: int

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(weights, np.float64))
        return self.finish(w @ self.features, w.sum(axis=1))


def _class_inputs(y_true: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(preds)
    if y.ndim != 1:
        raise ValueError(f"classification y_true must be [N], got shape {y.shape}")
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != len(y):
        raise ValueError(f"classification preds must be [S, N] with N={len(y)}, got shape {p.shape}")
    return y, p


def _regression_inputs(y_true: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, np.float64)
    p = np.asarray(preds, np.float64)
    if y.ndim == 1:
        y = y[:, None]
        if p.ndim == 1:
            p = p[None, :]
        if p.ndim == 2:
            p = p[:, :, None]
    elif y.ndim == 2 and p.shape == y.shape:
        p = p[None]
    if y.ndim != 2 or p.ndim != 3 or p.shape[1:] != y.shape:
        raise ValueError(f"regression preds must be [S, N, K] matching y_true [N, K]; got {p.shape} and {y.shape}")
    if not (np.isfinite(y).all() and np.isfinite(p).all()):
        raise ValueError("regression y_true and preds must be finite")
    return y, p


def _prepare_accuracy(y_true: np.ndarray, preds: np.ndarray) -> Prepared:
    y, p = _class_inputs(y_true, preds)
    correct = (p == y[None, :]).T.astype(np.float64)  # [N, S]

    def finish(sums: np.ndarray, total: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / total[:, None]

    return Prepared(correct, finish, p.shape[0])


def _prepare_uar(y_true: np.ndarray, preds: np.ndarray) -> Prepared:
    y, p = _class_inputs(y_true, preds)
    classes, y_codes = np.unique(y, return_inverse=True)
    n_classes, n_seeds = len(classes), p.shape[0]
    onehot = np.zeros((len(y), n_classes))
    onehot[np.arange(len(y)), y_codes] = 1.0
    correct = (p == y[None, :]).astype(np.float64)  # [S, N]
    # columns: per-class support, then per-seed per-class hits
    hits = (correct[:, :, None] * onehot[None]).transpose(1, 0, 2).reshape(len(y), n_seeds * n_classes)
    features = np.concatenate([onehot, hits], axis=1)

    def finish(sums: np.ndarray, total: np.ndarray) -> np.ndarray:
        support = sums[:, :n_classes]  # [B, C]
        hit = sums[:, n_classes:].reshape(len(sums), n_seeds, n_classes)
        present = support > 0
        recall = hit / np.where(present, support, 1.0)[:, None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (recall * present[:, None, :]).sum(-1) / present.sum(-1)[:, None]

    return Prepared(features, finish, n_seeds)


def _prepare_ccc(y_true: np.ndarray, preds: np.ndarray) -> Prepared:
    y, p = _regression_inputs(y_true, preds)
    n_seeds, n, k = p.shape
    # CCC is unchanged when truth and prediction shift together; centring on the truth's mean
    # keeps the raw-moment formulas below free of cancellation.
    centre = y.mean(axis=0)
    x = y - centre  # [N, K]
    q = (p - centre).transpose(1, 0, 2).reshape(n, n_seeds * k)  # [N, S*K]
    xs = np.tile(x, (1, n_seeds))  # [N, S*K]
    features = np.concatenate([x, x * x, q, q * q, xs * q], axis=1)

    def finish(sums: np.ndarray, total: np.ndarray) -> np.ndarray:
        b = len(sums)
        sk = n_seeds * k
        with np.errstate(invalid="ignore", divide="ignore"):
            m = sums / total[:, None]
            mx = np.tile(m[:, :k], (1, n_seeds))
            vx = np.tile(m[:, k : 2 * k], (1, n_seeds)) - mx**2
            my = m[:, 2 * k : 2 * k + sk]
            vy = m[:, 2 * k + sk : 2 * k + 2 * sk] - my**2
            cov = m[:, 2 * k + 2 * sk :] - mx * my
            denom = vx + vy + (mx - my) ** 2
            c = np.where(denom > 0, 2.0 * cov / np.where(denom > 0, denom, 1.0), np.nan)
        return c.reshape(b, n_seeds, k).mean(axis=-1)

    return Prepared(features, finish, n_seeds)


@dataclass(frozen=True)
class BatchedMetric:
    """A metric evaluated for many resamples at once.

    Calling it with ``(y_true, preds, weights)`` where ``weights`` is ``[B, N]`` (how often each
    clip occurs in each resample; a ``[N]`` vector is one resample) returns ``[B, S]``: the
    metric of every seed on every resample. Integer weights give exactly the metric of the
    resampled arrays with the repeated clips written out.
    """

    name: str
    task: str  # "classification" or "regression"
    prepare: Callable[[np.ndarray, np.ndarray], Prepared]

    def __call__(self, y_true: np.ndarray, preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.prepare(y_true, preds)(weights)


METRICS: dict[str, BatchedMetric] = {
    "accuracy": BatchedMetric("accuracy", "classification", _prepare_accuracy),
    "uar": BatchedMetric("uar", "classification", _prepare_uar),
    "ccc": BatchedMetric("ccc", "regression", _prepare_ccc),
}


def get_metric(metric: str | BatchedMetric) -> BatchedMetric:
    if isinstance(metric, BatchedMetric):
        return metric
    try:
        return METRICS[metric.lower()]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}") from None


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def _clusters(groups: Optional[Sequence[Any] | np.ndarray], n: int) -> tuple[np.ndarray, int]:
    """Cluster id per clip (0..G-1) and G; every clip is its own cluster without groups."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must be [N] with N={n}, got shape {g.shape}")
    _, ids = np.unique(g, return_inverse=True)
    return ids.ravel(), int(ids.max()) + 1 if n else 0


def _draw_counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``[rows, n]`` counts of n draws with replacement from n items, per row."""
    idx = rng.integers(0, n, size=(rows, n))
    idx += n * np.arange(rows)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _seed_mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean over drawn seeds: ``sum_s counts[b, s] * values[b, s] / S``; undrawn seeds ignored."""
    contrib = np.where(counts > 0, counts * values, 0.0)
    return contrib.sum(axis=1) / counts.shape[1]


def bootstrap_replicates(
    prepared: Sequence[Prepared],
    groups: Optional[Sequence[Any] | np.ndarray],
    n_clips: int,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Replicate values ``[len(prepared), n_boot]`` with test clusters shared by all entries.

    Every replicate draws one set of test clusters used for every prepared metric (the pairing),
    and an independent draw of seeds for each of them.
    """
    cluster_of_clip, n_clusters = _clusters(groups, n_clips)
    if n_clusters == 0:
        raise ValueError("no test clips")
    width = max(n_clips, n_clusters, *(p.features.shape[1] for p in prepared))
    chunk = max(1, _CHUNK_ELEMENTS // width)
    out = np.empty((len(prepared), n_boot))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        w = _draw_counts(rng, rows, n_clusters)  # [rows, G]
        if groups is not None:
            w = w[:, cluster_of_clip]  # [rows, N]
        for j, prep in enumerate(prepared):
            seed_counts = _draw_counts(rng, rows, prep.n_seeds)
            out[j, start : start + rows] = _seed_mean(prep(w), seed_counts)
    return out


def _bounds(reps: np.ndarray, level: float) -> tuple[float, float]:
    finite = reps[np.isfinite(reps)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _unit(groups: Optional[Sequence[Any] | np.ndarray]) -> str:
    return "test clips" if groups is None else "test speakers"


def cell_interval(
    y_true: np.ndarray,
    preds: np.ndarray,
    metric: str | BatchedMetric,
    groups: Optional[Sequence[Any] | np.ndarray] = None,
    n_boot: int = 2000,
    level: float = 0.95,
    rng_seed: int = 0,
) -> Interval:
    """Estimate and percentile interval of one cell.

    ``preds`` is ``[S, N]`` predicted class ids (accuracy, UAR) or ``[S, N, K]`` continuous
    values (CCC); ``y_true`` is ``[N]`` or ``[N, K]``. The estimate is the mean over seeds of the
    metric on all clips; the interval resamples seeds and test clusters (``groups``: one id per
    clip, typically the speaker; without it, single clips) with replacement, see the module
    docstring.
    """
    _check(n_boot, level)
    prep = get_metric(metric).prepare(y_true, preds)
    n = prep.features.shape[0]
    estimate = float(prep(np.ones(n)).mean())
    reps = bootstrap_replicates([prep], groups, n, n_boot, np.random.default_rng(rng_seed))[0]
    lo, hi = _bounds(reps, level)
    method = f"percentile bootstrap over seeds x {_unit(groups)}, {n_boot} resamples"
    return Interval(estimate, lo, hi, level, n_boot, method)


def paired_difference(
    y_true: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    metric: str | BatchedMetric,
    groups: Optional[Sequence[Any] | np.ndarray] = None,
    n_boot: int = 2000,
    level: float = 0.95,
    rng_seed: int = 0,
) -> Interval:
    """Estimate and percentile interval of ``metric(a) - metric(b)`` on the same test clips.

    Pairing is over the test set: every replicate draws one set of test clusters and evaluates
    both methods on exactly those clips, so the difficulty of the drawn speakers cancels in the
    difference. Seeds are resampled independently for a and b: the seeds of two methods are
    separate head trainings on different features, and seed ``s`` of one has no closer relation
    to seed ``s`` of the other than to any other seed, so pairing them by index would claim a
    correlation that does not exist (and would require equal seed counts, which this does not).
    If the two did share something through the seed index, ignoring it only widens the interval.
    """
    _check(n_boot, level)
    m = get_metric(metric)
    prep_a, prep_b = m.prepare(y_true, preds_a), m.prepare(y_true, preds_b)
    n = prep_a.features.shape[0]
    estimate = float(prep_a(np.ones(n)).mean() - prep_b(np.ones(n)).mean())
    reps = bootstrap_replicates([prep_a, prep_b], groups, n, n_boot, np.random.default_rng(rng_seed))
    lo, hi = _bounds(reps[0] - reps[1], level)
    method = f"paired percentile bootstrap over {_unit(groups)} (shared) x seeds (independent per method), {n_boot} resamples"
    return Interval(estimate, lo, hi, level, n_boot, method)
