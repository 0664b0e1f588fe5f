"""Figures a person would rather look at than read, as matplotlib figures (logged to MLflow)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def generated_vs_real(real: np.ndarray, generated: np.ndarray, energy: Optional[np.ndarray] = None, title: str = "") -> plt.Figure:
    """Two rows of frames (real above, generated below) and, if given, the audio energy per frame."""
    k = len(real)
    rows = 3 if energy is not None else 2
    fig, axes = plt.subplots(rows, k, figsize=(1.1 * k, 1.2 * rows + 0.3), squeeze=False)
    for i in range(k):
        for r, img in enumerate((real[i], generated[i])):
            ax = axes[r][i]
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][i].set_title(f"t={i}", fontsize=6)
    axes[0][0].set_ylabel("real", fontsize=7)
    axes[1][0].set_ylabel("generated", fontsize=7)
    if energy is not None:
        for i in range(k):
            axes[2][i].remove()
        ax = fig.add_subplot(rows, 1, rows)
        ax.plot(energy, color="k")
        ax.set_xlim(-0.5, k - 0.5)
        ax.set_ylabel("audio energy", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def _line_axes(fig: plt.Figure, ax: Any, xlabel: str, ylabel: str, title: str) -> plt.Figure:
    """Labels, grid and legend shared by the line plots."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def curves(series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str = "", x: Optional[Sequence[float]] = None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, ys in series.items():
        ax.plot(x if x is not None else range(1, len(ys) + 1), ys, marker="o", ms=3, label=name)
    return _line_axes(fig, ax, xlabel, ylabel, title)


def confusion(cm: np.ndarray, classes: Sequence[str], title: str = "") -> plt.Figure:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(0.5 * n + 2, 0.5 * n + 1.6))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def errorbar_lines(x: Sequence, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str = "", xlog: bool = False) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, (mean, std) in series.items():
        ax.errorbar(range(len(x)), mean, yerr=std, marker="o", ms=3, capsize=2, label=name)
    ax.set_xticks(range(len(x)), [str(v) for v in x])
    return _line_axes(fig, ax, xlabel, ylabel, title)


def heatmap(values: np.ndarray, rows: Sequence, cols: Sequence, xlabel: str, ylabel: str, title: str = "",
            errors: Optional[np.ndarray] = None) -> plt.Figure:
    """Cells annotated with their value, and `± error` where `errors` gives one (a half-width)."""
    fig, ax = plt.subplots(figsize=((1.3 if errors is not None else 0.9) * len(cols) + 2, 0.6 * len(rows) + 1.5))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):
                err = errors[i, j] if errors is not None else np.nan
                text = f"{values[i, j]:.3f}" + (f"\n±{err:.3f}" if np.isfinite(err) else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def scatter(x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str, title: str = "") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.scatter(x, y, s=14)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
