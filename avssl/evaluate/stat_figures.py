"""Figures for bootstrap intervals: a forest plot of differences and metric curves with bands."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from avssl.evaluate.stats import Interval
from avssl.figures import plt  # Agg backend is selected there

_POSITIVE = "tab:blue"
_NEGATIVE = "tab:red"
_UNRESOLVED = "0.55"


def forest_plot(rows: Sequence[tuple[str, Interval]], title: str = "", xlabel: str = "difference (a - b)", zero_line: bool = True) -> plt.Figure:
    """One row per (label, interval), top to bottom: the estimate with its interval as a bar.

    Resolved intervals (excluding 0) are drawn solid, blue when above 0 and red when below;
    unresolved ones are grey with a hollow marker. A dashed vertical line marks 0.
    """
    n = len(rows)
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(n, 1) + 1.2))
    for i, (_, iv) in enumerate(rows):
        y = n - 1 - i
        if iv.resolved:
            color = _POSITIVE if iv.direction > 0 else _NEGATIVE
            face = color
        else:
            color, face = _UNRESOLVED, "white"
        ax.hlines(y, iv.low, iv.high, color=color, lw=1.8)
        ax.plot([iv.estimate], [y], marker="o", ms=6, color=color, markerfacecolor=face, markeredgewidth=1.4, linestyle="none")
    if zero_line:
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(n), [label for label, _ in reversed(rows)], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.xaxis.set_major_locator(plt.MaxNLocator(6))
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def band_plot(
    x_labels: Sequence,
    series: dict[str, Sequence[Optional[Interval]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    x: Optional[Sequence[float]] = None,
    xlog: bool = False,
) -> plt.Figure:
    """One line per method through its estimates, with its interval as a shaded band.

    The points sit at evenly spaced positions labelled ``x_labels`` (e.g. SNR conditions or
    label fractions), or at the numeric positions ``x`` if given. A ``None`` entry leaves a gap;
    each interval is also drawn as a thin vertical bar so a point between gaps keeps its interval.
    """
    pos = np.arange(len(x_labels), dtype=float) if x is None else np.asarray(x, dtype=float)
    if len(pos) != len(x_labels):
        raise ValueError("x must have one position per label")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (name, ivs) in enumerate(series.items()):
        if len(ivs) != len(pos):
            raise ValueError(f"series {name!r} has {len(ivs)} intervals for {len(pos)} x positions")
        est = np.array([np.nan if iv is None else iv.estimate for iv in ivs], dtype=float)
        lo = np.array([np.nan if iv is None else iv.low for iv in ivs], dtype=float)
        hi = np.array([np.nan if iv is None else iv.high for iv in ivs], dtype=float)
        color = f"C{i % 10}"
        ax.plot(pos, est, marker="o", ms=3, color=color, label=name)
        ax.fill_between(pos, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.vlines(pos, lo, hi, color=color, alpha=0.6, lw=1)  # still visible next to a gap
    if xlog:
        ax.set_xscale("log")
    ax.set_xticks(pos, [str(v) for v in x_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
