"""Downstream tasks by name: emotion, affect, word."""

from avssl.evaluate.tasks.base import TASKS, Task

from avssl.evaluate.tasks import affect, emotion, word  # noqa: E402,F401

__all__ = ["TASKS", "Task"]
