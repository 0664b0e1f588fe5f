"""Identity encoder and U-Net frame decoder: the visual half of the generator, used only for the
visual pretext task and dropped after pretraining."""

from __future__ import annotations

import torch
from torch import nn

from avssl.config.schema import FrameDecoderConfig, IdentityEncoderConfig
from avssl.models.registry import FRAME_DECODERS, IDENTITY_ENCODERS


@IDENTITY_ENCODERS.register("conv_skip")
class ConvIdentityEncoder(nn.Module):
    """Strided Conv2d + BatchNorm + ReLU on the still frame; channels double from base_channels.
    Returns the identity code and each layer's map for the decoder's skip connections."""

    def __init__(self, cfg: IdentityEncoderConfig, frame_size: tuple[int, int]):
        super().__init__()
        h, w = frame_size
        if h % 2**cfg.layers or w % 2**cfg.layers:
            raise ValueError(f"frame size {h}x{w} must be divisible by 2**identity_encoder.layers = {2**cfg.layers}")
        c = cfg.base_channels
        self.channels = [c * 2**i for i in range(cfg.layers)]
        blocks, cin = [], 1
        for cout in self.channels:
            blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.bottom = (h // 2**cfg.layers, w // 2**cfg.layers)
        self.code = nn.Sequential(nn.Conv2d(cin, cfg.code_dim, self.bottom), nn.Tanh())
        self.code_dim = cfg.code_dim

    def forward(self, still: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[B, 1, H, W] in [-1, 1] -> (code [B, code_dim], skips from fine to coarse)."""
        skips, x = [], still
        for block in self.blocks:
            x = block(x)
            skips.append(x)
        return self.code(x).flatten(1), skips


@FRAME_DECODERS.register("unet")
class UNetFrameDecoder(nn.Module):
    """[audio code, identity code, noise] -> a frame, upsampling with transposed convolutions and
    concatenating the identity encoder's maps at each scale; Tanh output in [-1, 1]."""

    def __init__(self, cfg: FrameDecoderConfig, identity: ConvIdentityEncoder, audio_dim: int):
        super().__init__()
        self.noise_dim = cfg.noise_dim
        ch = identity.channels
        self.bottom = identity.bottom
        in_dim = audio_dim + identity.code_dim + cfg.noise_dim
        self.project = nn.Sequential(nn.Linear(in_dim, ch[-1] * self.bottom[0] * self.bottom[1]), nn.ReLU(inplace=True))
        ups = []
        for i in reversed(range(len(ch))):
            cout = ch[i - 1] if i > 0 else ch[0]
            ups.append(nn.Sequential(nn.ConvTranspose2d(2 * ch[i], cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
        self.ups = nn.ModuleList(ups)
        # With `residual`, the output is the still frame plus a predicted change: identity comes for
        # free and the decoder's capacity goes to what the audio changes.
        self.residual = cfg.residual
        self.out = nn.Conv2d(ch[0], 1, 3, 1, 1)
        if self.residual:  # start from an exact copy of the still frame
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.channels = ch

    def forward(self, audio: torch.Tensor, identity: torch.Tensor, skips: list[torch.Tensor], clip_of: torch.Tensor, still: torch.Tensor) -> torch.Tensor:
        """audio [N, A] (one row per frame to draw), identity [B, I], skips per clip, clip_of [N]
        mapping each frame to its clip, still [B, 1, H, W] -> frames [N, 1, H, W]."""
        parts = [audio, identity[clip_of]]
        if self.noise_dim:
            parts.append(torch.randn(audio.shape[0], self.noise_dim, device=audio.device, dtype=audio.dtype))
        x = self.project(torch.cat(parts, 1)).view(audio.shape[0], self.channels[-1], *self.bottom)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(torch.cat([x, skip[clip_of]], 1))
        delta = self.out(x)
        if self.residual:
            return torch.tanh(torch.atanh(still[clip_of].clamp(-0.999, 0.999)) + delta)
        return torch.tanh(delta)
