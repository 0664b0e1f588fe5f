"""Audio-only self-supervision: regress MFCCs, log-mel energies and prosody (log-F0, voicing,
frame energy) from the per-frame embeddings. Targets come from torchaudio/torch signal
processing on the same waveform, standardised with corpus statistics; never learned."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from avssl.config.schema import AudioObjectiveConfig
from avssl.data.features import VOICED, attribute_targets, frames_of
from avssl.models.heads import length_mask
from avssl.models.heads import masked_mean
from avssl.objectives.base import Objective
from avssl.objectives.registry import OBJECTIVES

UNSTANDARDISED = ("voicing",)  # already in 0..1


def attribute_weights(cfg: AudioObjectiveConfig) -> dict[str, float]:
    return {"mfcc": cfg.w_mfcc, "logmel": cfg.w_logmel, "log_f0": cfg.w_log_f0, "voicing": cfg.w_voicing, "energy": cfg.w_energy}


def frame_masks(batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, voiced) [B, T] booleans: frames inside each clip's length (`lengths` counts video
    frames), and those of them that are voiced (the only frames where log-F0 is a real F0)."""
    wave = batch["wave"]
    valid = length_mask(batch["lengths"].to(wave.device), frames_of(wave))
    voiced = valid & (targets["voicing"].squeeze(-1) > VOICED)
    return valid, voiced


@torch.no_grad()
def fit_target_stats(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], cfg: AudioObjectiveConfig) -> None:
    """Set the model's target mean/std buffers from a sample of training batches (dicts with
    'wave' and 'lengths'). Padding frames are left out; log-F0 counts voiced frames only."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        targets = attribute_targets(batch["wave"].float(), cfg.n_mfcc, cfg.n_mels)
        valid, voiced = frame_masks(batch, targets)
        for name, t in targets.items():
            if name in UNSTANDARDISED:
                continue
            flat = t[voiced if name == "log_f0" else valid]
            if len(flat):
                chunks.setdefault(name, []).append(flat)
    for name, parts in chunks.items():
        x = torch.cat(parts)
        mean, std = model.target_stats(name)
        mean.copy_(x.mean(0))
        std.copy_(x.std(0).clamp_min(1e-3) if len(x) > 1 else torch.ones_like(std))


def add_targets(batch: dict[str, torch.Tensor], cfg: AudioObjectiveConfig) -> dict[str, torch.Tensor]:
    """Compute the pretext targets ahead of the step (the loader calls this in its prefetch thread)."""
    with torch.no_grad():
        targets = attribute_targets(batch["wave"].float(), cfg.n_mfcc, cfg.n_mels)
    return {**batch, **{f"target/{k}": v for k, v in targets.items()}}


def audio_loss(outputs: dict[str, Any], batch: dict[str, torch.Tensor], model: torch.nn.Module, cfg: AudioObjectiveConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    wave = batch["wave"]
    if "target/mfcc" in batch:
        targets = {k[len("target/") :]: v for k, v in batch.items() if k.startswith("target/")}
    else:
        with torch.no_grad(), torch.autocast(wave.device.type, enabled=False):
            targets = attribute_targets(wave.float(), cfg.n_mfcc, cfg.n_mels)
    preds = outputs["attributes"]
    valid, voiced = frame_masks(batch, targets)
    total = wave.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for name, weight in attribute_weights(cfg).items():
        mean, std = model.target_stats(name)
        target = (targets[name] - mean) / std
        err = (preds[name].float() - target).pow(2)
        # Pitch only on voiced frames (a hard mask: elsewhere the target is a placeholder).
        loss = masked_mean(err, voiced if name == "log_f0" else valid)
        parts[f"loss/audio/{name}"] = loss.detach()
        total = total + weight * loss
    return total, parts


@OBJECTIVES.register("audio")
class AudioAttributeObjective(Objective):
    audio = True

    def loss(self, outputs, batch, inputs, model):
        loss, parts = audio_loss(outputs, batch, model, self.cfg.audio)
        return loss, {"loss/audio": loss.detach(), **parts}
