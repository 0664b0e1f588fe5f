"""Isolated word recognition (LRW / Speech Commands style): accuracy."""

from __future__ import annotations

from avssl.evaluate.metrics import accuracy, unweighted_average_recall
from avssl.evaluate.tasks.base import TASKS, Task


@TASKS.register("word")
class WordTask(Task):
    name = "word"
    labels = ("word",)
    primary = "accuracy"

    def score(self, y_true, y_pred, frames=None):
        pred = y_pred.argmax(-1)
        return {"accuracy": accuracy(y_true, pred), "uar": unweighted_average_recall(y_true, pred, len(self.classes))}
