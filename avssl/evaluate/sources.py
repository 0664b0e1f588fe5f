"""What a downstream head listens to: a pretrained encoder (MLflow run id or encoder file), the same
encoder from random init (`scratch`), or hand features (`mfcc`, `logmel`) with the same head."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from avssl.config.schema import Config
from avssl.data.features import log_mel, mfcc
from avssl.errors import AvsslError
from avssl.models import build_audio_encoder, load_encoder

BASELINES = ("scratch", "mfcc", "logmel")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class HandFeatures(nn.Module):
    """MFCC (+ deltas) or log-mel per video frame; nothing to learn."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.out_dim = 26 if kind == "mfcc" else 40

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if self.kind == "mfcc":
            m = mfcc(wave)
            delta = torch.cat([torch.zeros_like(m[:, :1]), m[:, 1:] - m[:, :-1]], 1)
            return torch.cat([m, delta], -1)
        return log_mel(wave)


@dataclass
class FeatureSource:
    name: str  # the method's name in tables
    kind: str  # pretrained | scratch | mfcc | logmel
    module: nn.Module
    trainable: bool  # trained with the head (scratch always; pretrained if evaluate.finetune)
    encoder_run_id: Optional[str] = None
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    factory: Optional[Callable[[int], nn.Module]] = None  # a fresh module per seed, if trainable

    @property
    def dim(self) -> int:
        return int(self.module.out_dim)

    def for_seed(self, seed: int) -> nn.Module:
        """The module one seed trains: a fresh copy when it learns, so seeds do not leak."""
        if not self.trainable:
            return self.module
        if self.factory is not None:
            return self.factory(seed)
        return copy.deepcopy(self.module)


def resolve_source(spec: str, cfg: Config, tracker=None, seed: int = 0) -> FeatureSource:
    """An encoder spec -> a feature source. Specs: a baseline name, an MLflow run id, an encoder file,
    or a pretraining run name (looked up in MLflow)."""
    if spec in ("mfcc", "logmel"):
        return FeatureSource(spec, spec, HandFeatures(spec), False, description=f"{spec} features (torchaudio)")
    if spec == "scratch":
        enc_cfg = cfg.model.audio_encoder

        def fresh(s: int) -> nn.Module:
            torch.manual_seed(s)
            return build_audio_encoder(enc_cfg)

        return FeatureSource("scratch", "scratch", fresh(seed), True, description="same encoder, random init, trained end to end", factory=fresh)
    path = Path(spec)
    if path.is_file():
        enc, extra = load_encoder(path)
        name = str(extra.get("run_name") or path.parent.name or path.stem)
        return FeatureSource(name, "pretrained", enc, cfg.evaluate.finetune, description=f"encoder file {path}", tags={"avssl.encoder_path": str(path.resolve())})
    if tracker is None:
        raise AvsslError(f"encoder '{spec}': not a baseline ({', '.join(BASELINES)}) nor an existing file")
    run = None
    if RUN_ID.match(spec):
        run = tracker.get_run(spec)
    else:
        runs = tracker.find_runs({"avssl.kind": "pretrain", "avssl.run_name": spec})
        if not runs:
            raise AvsslError(
                f"encoder '{spec}' is not a baseline ({', '.join(BASELINES)}), a file, an MLflow run id, "
                f"or the name of a pretraining run in experiment '{tracker.experiment_name}'"
            )
        run = runs[-1]
    run_id = run.info.run_id
    if run.data.tags.get("avssl.kind") != "pretrain":
        raise AvsslError(f"MLflow run {run_id} is not a pretraining run (kind: {run.data.tags.get('avssl.kind')})")
    local = tracker.download(run_id, "encoder/encoder.pt")
    enc, extra = load_encoder(local)
    name = run.data.tags.get("avssl.run_name") or run.info.run_name or run_id[:8]
    return FeatureSource(
        name, "pretrained", enc, cfg.evaluate.finetune, encoder_run_id=run_id,
        description=f"pretrained ({run.data.tags.get('avssl.objective', '?')} objective), run {run_id}",
        tags={"avssl.objective": run.data.tags.get("avssl.objective", "")},
    )
