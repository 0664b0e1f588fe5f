"""Small heads on per-frame embeddings: audio-attribute regressors (pretext) and downstream
classifiers/regressors (GRU over frames as in the reference work, or mean-pool + linear)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from avssl.config.schema import AttributeHeadsConfig
from avssl.models.registry import ATTRIBUTE_HEADS
from avssl.models.rnn import gru


@ATTRIBUTE_HEADS.register("linear")
class AttributeHeads(nn.Module):
    """One regressor per audio attribute, applied frame by frame."""

    def __init__(self, cfg: AttributeHeadsConfig, in_dim: int, dims: dict[str, int]):
        super().__init__()

        def head(d: int) -> nn.Module:
            if cfg.hidden:
                return nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.ReLU(inplace=True), nn.Linear(cfg.hidden, d))
            return nn.Linear(in_dim, d)

        self.heads = nn.ModuleDict({name: head(d) for name, d in dims.items()})

    def forward(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: h(emb) for name, h in self.heads.items()}


def length_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A scalar: the mean of x [B, T, D] over valid frames (mask [B, T]) and features (masked losses)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum() / (m.sum() * x.shape[-1]).clamp_min(1.0)


def masked_time_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, D]: the mean over each clip's valid frames (padding left out)."""
    mask = length_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class DownstreamHead(nn.Module):
    """Per-clip output (classes or regression targets) from [B, T, D] frame features; with
    `per_frame`, also one output per frame (continuous affect sequences)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, hidden: int, dropout: float = 0.2, n_layers: int = 1):
        super().__init__()
        self.kind = kind
        self.mix = LayerWeights(n_layers) if n_layers > 1 else None
        in_dim = in_dim // n_layers
        self.norm = nn.LayerNorm(in_dim)
        if kind == "gru":
            self.rnn = nn.GRU(in_dim, hidden, batch_first=True, bidirectional=True)
            feat = 2 * hidden
        elif kind == "pool":
            self.rnn = None
            feat = in_dim
        else:
            raise ValueError(f"unknown head kind '{kind}'")
        self.drop = nn.Dropout(dropout)
        self.clip_out = nn.Linear(feat, out_dim)
        self.frame_out = nn.Linear(feat, out_dim)

    def frame_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            x = self.mix(x)
        x = self.norm(x)
        if self.rnn is not None:
            x = gru(self.rnn, x, lengths)  # nn.GRU on the packed clips (its cheaper CPU training pass)
        return x

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, per_frame: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = self.frame_features(x, lengths)
        pooled = masked_time_mean(h, lengths)
        clip = self.clip_out(self.drop(pooled))
        frames = self.frame_out(self.drop(h)) if per_frame else None
        return clip, frames


class Featurizer(nn.Module):
    """What a downstream head reads from an audio encoder (s3prl's "featurizer"): the top layer
    (`last`), one named layer (`code`, `gru1`, ...), all layers side by side (`concat`), or all
    layers stacked for a learned weighted sum in the head (`weighted`: [B, T, L * D], n_layers = L)."""

    def __init__(self, encoder: nn.Module, layer: str = "last"):
        super().__init__()
        self.encoder, self.layer = encoder, layer
        names = list(getattr(encoder, "layer_names", []))
        dims = list(getattr(encoder, "layer_dims", []))
        self.n_layers = 1
        if layer == "last":
            self.out_dim = int(encoder.out_dim)
        elif layer == "concat":
            self.out_dim = sum(dims)
        elif layer == "weighted":
            if len(set(dims)) != 1:
                raise ValueError(f"layer=weighted needs layers of one width; this encoder's are {dict(zip(names, dims))} (use concat)")
            self.out_dim, self.n_layers = dims[0] * len(dims), len(dims)
        elif layer in names:
            self.out_dim = dims[names.index(layer)]
        else:
            raise ValueError(f"layer '{layer}' is not one of last, concat, weighted, {', '.join(names)}")

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if self.layer == "last":
            return self.encoder(wave)
        outs = self.encoder.layer_outputs(wave)
        if self.layer in ("concat", "weighted"):
            return torch.cat(outs, -1)
        return outs[self.encoder.layer_names.index(self.layer)]


class LayerWeights(nn.Module):
    """A softmax-weighted sum of L stacked layers: [B, T, L * D] -> [B, T, D]."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = n_layers
        self.logits = nn.Parameter(torch.zeros(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, ld = x.shape
        x = x.reshape(b, t, self.n_layers, ld // self.n_layers)
        return (x * torch.softmax(self.logits, 0)[:, None]).sum(2)
