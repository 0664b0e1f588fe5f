"""Downstream metrics: accuracy, unweighted average recall, confusion matrix, and the
concordance correlation coefficient for continuous affect."""

from __future__ import annotations

import warnings

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def unweighted_average_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean of per-class recalls over the classes present in y_true (scikit-learn's balanced accuracy)."""
    from sklearn.metrics import recall_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = [c for c in range(n_classes) if (y_true == c).any()]
    if not present:
        return float("nan")
    with warnings.catch_warnings():  # predictions of classes absent from y_true are expected (small test sets)
        warnings.simplefilter("ignore", UserWarning)
        return float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(np.asarray(y_true, int), np.asarray(y_pred, int), labels=list(range(n_classes))).astype(np.int64)


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient: 2 cov / (var_x + var_y + (mean_x - mean_y)^2)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return float("nan")
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    denom = x.var() + y.var() + (mx - my) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")
