"""Discrete emotion recognition: accuracy and unweighted average recall (UAR)."""

from __future__ import annotations

from avssl.evaluate.metrics import accuracy, unweighted_average_recall
from avssl.evaluate.tasks.base import TASKS, Task


@TASKS.register("emotion")
class EmotionTask(Task):
    name = "emotion"
    labels = ("emotion",)
    primary = "uar"

    def score(self, y_true, y_pred, frames=None):
        pred = y_pred.argmax(-1)
        return {"accuracy": accuracy(y_true, pred), "uar": unweighted_average_recall(y_true, pred, len(self.classes))}
