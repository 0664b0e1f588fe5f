"""Visual self-supervision: animate the still frame from the audio; L1 to the real frames, the
lower half of the face (where speech moves it) weighted more."""

from __future__ import annotations

from typing import Any

import torch

from avssl.config.schema import VisualObjectiveConfig
from avssl.objectives.base import Objective
from avssl.objectives.registry import OBJECTIVES


def to_unit(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] floats (the generator's Tanh range)."""
    return frames_u8.float() / 127.5 - 1.0


def pick_frames(lengths: torch.Tensor, per_clip: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_of, frame_of): `per_clip` random valid frames per clip (0 = all valid frames)."""
    clips, frames = [], []
    for b, n in enumerate(lengths.tolist()):
        if per_clip and per_clip < n:
            idx = torch.randperm(n, generator=generator)[:per_clip].sort().values
        else:
            idx = torch.arange(n)
        clips.append(torch.full_like(idx, b))
        frames.append(idx)
    return torch.cat(clips), torch.cat(frames)


def visual_inputs(batch: dict[str, torch.Tensor], per_clip: int, generator: torch.Generator) -> dict[str, Any]:
    clip_of, frame_of = pick_frames(batch["lengths"].cpu(), per_clip, generator)
    device = batch["wave"].device
    return {
        "still": to_unit(batch["still"]).unsqueeze(1),
        "clip_of": clip_of.to(device),
        "frame_of": frame_of.to(device),
    }


def visual_loss(outputs: dict[str, Any], batch: dict[str, torch.Tensor], inputs: dict[str, Any], cfg: VisualObjectiveConfig) -> torch.Tensor:
    """Weighted pixel loss (L1, L2 or their sum). Weights: `lower_face_weight` on the lower half
    of the frame, times 1 + motion_weight * (|real - still| / 2)^2 per pixel when enabled."""
    gen = outputs["generated"].float()  # [N, 1, H, W]
    real = to_unit(batch["frames"][inputs["clip_of"], inputs["frame_of"]]).unsqueeze(1)
    h = gen.shape[-2]
    w = torch.ones(1, 1, h, 1, device=gen.device)
    w[..., h // 2 :, :] = cfg.lower_face_weight
    if cfg.motion_weight:
        moved = (real - inputs["still"][inputs["clip_of"]]).abs() / 2
        w = w * (1.0 + cfg.motion_weight * moved.pow(2))
    w = w.expand_as(gen)
    err = gen - real
    per_pixel = {"l1": err.abs(), "l2": err.pow(2), "l1+l2": err.abs() + err.pow(2)}[cfg.loss]
    return (per_pixel * w).sum() / w.sum()


@OBJECTIVES.register("visual")
class VisualObjective(Objective):
    visual = True

    def model_inputs(self, batch, generator):
        return {"wave": batch["wave"], **visual_inputs(batch, self.cfg.visual.frames_per_clip, generator)}

    def loss(self, outputs, batch, inputs, model):
        loss = visual_loss(outputs, batch, inputs, self.cfg.visual)
        return loss, {"loss/visual": loss.detach()}
