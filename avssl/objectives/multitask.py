"""Multi-task: L = w_visual * L_visual + w_audio * L_audio, every weight a config field."""

from __future__ import annotations

from avssl.objectives.audio_attributes import audio_loss
from avssl.objectives.base import Objective
from avssl.objectives.registry import OBJECTIVES
from avssl.objectives.visual import visual_inputs, visual_loss


@OBJECTIVES.register("av")
class AudioVisualObjective(Objective):
    visual = True
    audio = True

    def model_inputs(self, batch, generator):
        return {"wave": batch["wave"], **visual_inputs(batch, self.cfg.visual.frames_per_clip, generator)}

    def loss(self, outputs, batch, inputs, model):
        l_vis = visual_loss(outputs, batch, inputs, self.cfg.visual)
        l_aud, parts = audio_loss(outputs, batch, model, self.cfg.audio)
        total = self.cfg.w_visual * l_vis + self.cfg.w_audio * l_aud
        return total, {"loss/visual": l_vis.detach(), "loss/audio": l_aud.detach(), **parts}
