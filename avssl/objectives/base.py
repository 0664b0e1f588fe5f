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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, D] over valid frames (mask [B, T]) and features."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum() / (m.sum() * x.shape[-1]).clamp_min(1.0)
