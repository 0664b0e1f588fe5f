"""What an objective is: it picks the model inputs it needs from a batch and turns the model's
outputs into a scalar loss plus named components for logging."""

from __future__ import annotations

from typing import Any

import torch

from avssl.config.schema import ObjectiveConfig


class Objective:
    visual = False  # needs the identity encoder + frame decoder and video frames
    audio = False  # needs the attribute heads

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def model_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, Any]:
        return {"wave": batch["wave"]}

    def loss(self, outputs: dict[str, Any], batch: dict[str, torch.Tensor], inputs: dict[str, Any], model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError
