"""What a downstream task is: which labels it reads, what the head outputs, how it is scored."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from avssl.registry import Registry


class Task:
    name = "base"
    kind = "classification"  # or "regression"
    labels: tuple[str, ...] = ()  # manifest columns every clip must have
    primary = "uar"  # the metric early stopping and tables use (higher is better)

    def __init__(self, classes: Optional[list[str]] = None):
        self.classes = classes or []

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.kind == "classification" else len(self.labels)

    def target(self, row: dict[str, Any]) -> Any:
        if self.kind == "classification":
            return self.classes.index(str(row[self.labels[0]]))
        return [float(row[k]) for k in self.labels]

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, frames: Optional[tuple[list[np.ndarray], list[np.ndarray]]] = None) -> dict[str, float]:
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("downstream task")
