"""What a downstream head listens to: a pretrained encoder (MLflow run id or encoder file), the same
encoder from random init (`scratch`), or hand features (`mfcc`, `logmel`) with the same head."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from avssl.config.schema import AudioEncoderConfig, Config
from avssl.data.features import log_mel, mfcc
from avssl.errors import AvsslError, ConfigError
from avssl.models import build_audio_encoder, load_encoder
from avssl.models.heads import Featurizer

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
    module: nn.Module  # waveform -> [B, T, dim] (a Featurizer around an encoder, or hand features)
    trainable: bool  # trained with the head (scratch always; pretrained if evaluate.finetune)
    encoder_run_id: Optional[str] = None
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    factory: Optional[Callable[[int], nn.Module]] = None  # a fresh module per seed, if trainable
    encoder_config: Optional[AudioEncoderConfig] = None  # the encoder's architecture (pretrained, scratch)
    layer: str = "-"
    _digest: Optional[str] = field(default=None, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.module.out_dim)

    @property
    def n_layers(self) -> int:
        return int(getattr(self.module, "n_layers", 1))

    def digest(self) -> str:
        """What decides a frozen source's features: kind, layer, module type and weights (hand
        features: their name). The feature store's keys start from it."""
        if self._digest is None:
            import hashlib

            h = hashlib.sha256(f"{self.kind}:{self.layer}:{type(self.module).__name__}:{getattr(self.module, 'kind', '')}".encode())
            for name, value in sorted(self.module.state_dict().items()):
                h.update(name.encode())
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def architecture(self) -> dict[str, str]:
        """Params describing the encoder (empty for hand features)."""
        if self.encoder_config is None:
            return {}
        return {f"encoder.{k}": str(v) for k, v in self.encoder_config.model_dump(mode="json").items()}

    def for_seed(self, seed: int) -> nn.Module:
        """The module one seed trains: a fresh copy when it learns, so seeds do not leak."""
        if not self.trainable:
            return self.module
        if self.factory is not None:
            return self.factory(seed)
        return copy.deepcopy(self.module)


def encoder_signature(cfg: AudioEncoderConfig) -> str:
    return f"{cfg.name}(base {cfg.base_channels}, layers {cfg.layers}, code {cfg.code_dim}, gru {cfg.gru_layers}x{cfg.gru_hidden})"


def resolve_source(spec: str, cfg: Config, tracker=None, seed: int = 0, like: Optional[AudioEncoderConfig] = None) -> FeatureSource:
    """An encoder spec -> a feature source. Specs: a baseline name, an MLflow run id, an encoder file,
    or a pretraining run name (looked up in MLflow). `scratch` builds the architecture `like` (the
    compared pretrained encoder's stored config), else the config's own `model.audio_encoder`."""
    layer = cfg.evaluate.layer
    if spec in ("mfcc", "logmel"):
        return FeatureSource(spec, spec, HandFeatures(spec), False, description=f"{spec} features (torchaudio)")
    if spec == "scratch":
        enc_cfg = like or cfg.model.audio_encoder

        def fresh(s: int) -> nn.Module:
            torch.manual_seed(s)
            return Featurizer(build_audio_encoder(enc_cfg), layer)

        return FeatureSource("scratch", "scratch", fresh(seed), True, description=f"same encoder, random init, trained end to end: {encoder_signature(enc_cfg)}",
                             factory=fresh, encoder_config=enc_cfg, layer=layer)
    from avssl import storage

    path = storage.fetch(spec)  # an encoder file, here or in an object store (then a local copy)
    if path is not None:
        enc, extra = load_encoder(path)
        shown = spec if storage.is_remote(spec) else str(path.resolve())
        name = str(extra.get("run_name") or path.parent.name or path.stem)
        return FeatureSource(name, "pretrained", Featurizer(enc, layer), cfg.evaluate.finetune, description=f"encoder file {shown}",
                             tags={"avssl.encoder_path": shown, "avssl.objective": str(extra.get("objective", ""))},
                             encoder_config=enc.config, layer=layer)
    if tracker is None:
        raise AvsslError(f"encoder '{spec}': not a baseline ({', '.join(BASELINES)}) nor an existing file")
    if spec.startswith("models:/"):
        # A registered encoder: its weights-only encoder file (never the pickled model), linked
        # to the run that trained it so evaluations still nest under that run.
        local, version = tracker.registered_encoder(spec)
        enc, extra = load_encoder(local)
        run_id = version.run_id or None
        name = str(extra.get("run_name") or f"{version.name}-v{version.version}")
        return FeatureSource(
            name, "pretrained", Featurizer(enc, layer), cfg.evaluate.finetune, encoder_run_id=run_id,
            description=f"registered encoder {spec} (version {version.version}, {extra.get('objective', '?')} objective)",
            tags={"avssl.objective": str(extra.get("objective", "")), "avssl.registered_model": f"models:/{version.name}/{version.version}"},
            encoder_config=enc.config, layer=layer,
        )
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
        name, "pretrained", Featurizer(enc, layer), cfg.evaluate.finetune, encoder_run_id=run_id,
        description=f"pretrained ({run.data.tags.get('avssl.objective', '?')} objective), run {run_id}",
        tags={"avssl.objective": run.data.tags.get("avssl.objective", "")}, encoder_config=enc.config, layer=layer,
    )


def resolve_sources(specs: list[str], cfg: Config, tracker=None, seed: int = 0) -> list[FeatureSource]:
    """Several methods compared in one table: `scratch` takes the architecture of the pretrained
    encoders it is compared with; pretrained encoders of different architectures cannot share one
    scratch baseline (a clear error, not a silent mismatch)."""
    pretrained = {spec: resolve_source(spec, cfg, tracker, seed) for spec in specs if spec not in BASELINES}
    archs = {encoder_signature(s.encoder_config): s for s in pretrained.values() if s.encoder_config is not None}
    if "scratch" in specs and len(archs) > 1:
        raise ConfigError(
            "scratch is compared with pretrained encoders of different architectures: "
            + "; ".join(f"{s.name}: {sig}" for sig, s in archs.items())
            + ". Compare encoders of one architecture per study, or leave scratch out."
        )
    like = next(iter(archs.values())).encoder_config if archs else None
    if like is not None and "scratch" in specs and encoder_signature(like) != encoder_signature(cfg.model.audio_encoder):
        print(f"scratch baseline: using the compared encoder's architecture {encoder_signature(like)} "
              f"(this config's model.audio_encoder is {encoder_signature(cfg.model.audio_encoder)})", flush=True)
    return [pretrained[spec] if spec in pretrained else resolve_source(spec, cfg, tracker, seed, like=like) for spec in specs]
