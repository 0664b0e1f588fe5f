"""Visual self-supervision: animate the still frame from the audio; L1 to the real frames, the
lower half of the face (where speech moves it) weighted more."""

from __future__ import annotations

from typing import Any

import torch

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


def visual_loss(outputs: dict[str, Any], batch: dict[str, torch.Tensor], inputs: dict[str, Any], lower_face_weight: float) -> torch.Tensor:
    gen = outputs["generated"].float()  # [N, 1, H, W]
    real = to_unit(batch["frames"][inputs["clip_of"], inputs["frame_of"]]).unsqueeze(1)
    h = gen.shape[-2]
    w = torch.ones(h, 1, device=gen.device)
    w[h // 2 :] = lower_face_weight
    return ((gen - real).abs() * w).mean() / w.mean()


@OBJECTIVES.register("visual")
class VisualObjective(Objective):
    visual = True

    def model_inputs(self, batch, generator):
        return {"wave": batch["wave"], **visual_inputs(batch, self.cfg.visual.frames_per_clip, generator)}

    def loss(self, outputs, batch, inputs, model):
        loss = visual_loss(outputs, batch, inputs, self.cfg.visual.lower_face_weight)
        return loss, {"loss/visual": loss.detach()}
