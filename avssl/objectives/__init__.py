"""Pretext objectives: visual, audio, av (registry by name)."""

from avssl.objectives.registry import OBJECTIVES

from avssl.objectives import audio_attributes, multitask, visual  # noqa: E402,F401
from avssl.objectives.base import Objective  # noqa: E402


def build_objective(cfg) -> Objective:
    return OBJECTIVES.get(cfg.name)(cfg)


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
