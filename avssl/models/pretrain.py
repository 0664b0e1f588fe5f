"""The pretraining model: the audio encoder plus whatever the objective needs around it
(identity encoder + frame decoder for the visual task, attribute heads for the audio task).
Only the audio encoder is kept after pretraining (`save_encoder` / `load_encoder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from avssl.config.schema import AudioEncoderConfig, ModelConfig, ObjectiveConfig
from avssl.data.features import attribute_dims
from avssl.errors import DataError
from avssl.models.registry import ATTRIBUTE_HEADS, AUDIO_ENCODERS, FRAME_DECODERS, IDENTITY_ENCODERS

ENCODER_FORMAT = 1


def build_audio_encoder(cfg: AudioEncoderConfig) -> nn.Module:
    encoder = AUDIO_ENCODERS.get(cfg.name)(cfg)
    encoder.config = cfg  # the architecture travels with the module (scratch baselines copy it)
    return encoder


class AVSSLModel(nn.Module):
    def __init__(
        self,
        model_cfg: ModelConfig,
        objective_cfg: ObjectiveConfig,
        frame_size: Optional[tuple[int, int]],
        visual: bool,
        audio: bool,
    ):
        super().__init__()
        self.audio_encoder = build_audio_encoder(model_cfg.audio_encoder)
        emb = self.audio_encoder.out_dim
        self.identity_encoder: Optional[nn.Module] = None
        self.frame_decoder: Optional[nn.Module] = None
        self.attribute_heads: Optional[nn.Module] = None
        if visual:
            if frame_size is None:
                raise DataError("the visual objective needs a corpus with video frames; this corpus is audio-only")
            ident = IDENTITY_ENCODERS.get(model_cfg.identity_encoder.name)(model_cfg.identity_encoder, frame_size)
            self.identity_encoder = ident
            self.frame_decoder = FRAME_DECODERS.get(model_cfg.frame_decoder.name)(model_cfg.frame_decoder, ident, emb)
            # Image convolutions run about 1.5x faster channels-last on CPU (and suit GPU tensor cores).
            self.identity_encoder.to(memory_format=torch.channels_last)
            self.frame_decoder.to(memory_format=torch.channels_last)
        if audio:
            a = objective_cfg.audio
            dims = attribute_dims(a.n_mfcc, a.n_mels)
            self.attribute_heads = ATTRIBUTE_HEADS.get(model_cfg.attribute_heads.name)(model_cfg.attribute_heads, emb, dims)
            for name, d in dims.items():
                self.register_buffer(f"target_mean_{name}", torch.zeros(d))
                self.register_buffer(f"target_std_{name}", torch.ones(d))

    def target_stats(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"target_mean_{name}"), getattr(self, f"target_std_{name}")

    def forward(
        self,
        wave: torch.Tensor,
        still: Optional[torch.Tensor] = None,
        clip_of: Optional[torch.Tensor] = None,
        frame_of: Optional[torch.Tensor] = None,
    ) -> dict[str, Any]:
        """Everything the objectives need, in one forward (so DDP sees every parameter's use).

        wave [B, S]; still [B, 1, H, W] in [-1, 1]; clip_of / frame_of [N] pick the frames to draw.
        """
        emb = self.audio_encoder(wave)
        out: dict[str, Any] = {"emb": emb}
        if self.frame_decoder is not None and still is not None:
            still = still.contiguous(memory_format=torch.channels_last)
            code, skips = self.identity_encoder(still)
            out["generated"] = self.frame_decoder(emb[clip_of, frame_of], code, skips, clip_of, still)
        if self.attribute_heads is not None:
            out["attributes"] = self.attribute_heads(emb)
        return out


def save_encoder(encoder: nn.Module, cfg: AudioEncoderConfig, path: Path, extra: Optional[dict[str, Any]] = None) -> Path:
    """Only tensors and plain values, so `torch.load(..., weights_only=True)` can read it."""
    payload = {
        "format": ENCODER_FORMAT,
        "config": cfg.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_encoder(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such encoder file") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable encoder checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise DataError(f"{path}: not an avssl encoder file (no config/state_dict)")
    cfg = AudioEncoderConfig.model_validate(payload["config"])
    encoder = build_audio_encoder(cfg)
    encoder.load_state_dict(payload["state_dict"])
    return encoder, payload.get("extra", {})


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, waves: "list[torch.Tensor]", device: Optional[torch.device] = None) -> int:
    """Recompute BatchNorm running statistics with the current weights ("precise BN").

    Running averages lag the weights while they change fast; an encoder used frozen after a short
    pretraining would otherwise see statistics from earlier weights. Returns the layers updated.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not waves:
        return 0
    from torch.optim.swa_utils import update_bn

    # Reset, then a cumulative average over these passes in train mode; momenta and mode restored.
    update_bn(waves, module, device=device)
    return len(bns)
