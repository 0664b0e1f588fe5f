"""The one typed config tree. Every command reads a `Config`; every field can be set in YAML or
from the command line as `a.b.c=value`. Unknown fields are errors, not silently ignored."""

from __future__ import annotations

import os
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMOTIONS = ("anger", "disgust", "fear", "happy", "neutral", "sad")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


VOCABULARY_NAMES = Literal["minimal_pairs", "digits", "commands", "broad"]
SPLIT3 = tuple[float, float, float]


def _check_split(v: SPLIT3) -> SPLIT3:
    if abs(sum(v) - 1.0) > 1e-6 or min(v) <= 0:
        raise ValueError("train/val/test fractions must be positive and sum to 1")
    return v


class SynthCorpusSpec(Section):
    """One corpus of the offline protocol: its speakers are its own (voice, prosody and face are drawn
    from a global speaker index no other corpus of the protocol uses)."""

    enabled: bool = True
    speakers: int = Field(12, ge=3)
    clips_per_speaker: int = Field(48, ge=1)
    vocabulary: VOCABULARY_NAMES = "minimal_pairs"
    labelled: bool = Field(True, description="false: store no task labels (an unlabelled pretraining pool)")
    video: bool = Field(False, description="draw the talking face (the pool needs it for visual self-supervision; downstream tasks read audio)")
    split: SPLIT3 = (0.6, 0.2, 0.2)

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: SPLIT3) -> SPLIT3:
        return _check_split(v)


class SynthCorporaConfig(Section):
    """The offline form of the protocol: an unlabelled pool to pretrain on and one labelled corpus per
    downstream task (CREMA-D-, Speech-Commands- and SEWA-like), with speakers that appear nowhere else."""

    pool: SynthCorpusSpec = SynthCorpusSpec(
        speakers=40, clips_per_speaker=100, vocabulary="broad", labelled=False, video=True, split=(0.9, 0.05, 0.05)
    )
    emotion: SynthCorpusSpec = SynthCorpusSpec(speakers=12, clips_per_speaker=48, vocabulary="minimal_pairs")
    word: SynthCorpusSpec = SynthCorpusSpec(speakers=12, clips_per_speaker=48, vocabulary="commands")
    affect: SynthCorpusSpec = SynthCorpusSpec(speakers=12, clips_per_speaker=32, vocabulary="minimal_pairs")

    def items(self) -> list[tuple[str, SynthCorpusSpec]]:
        return [(name, getattr(self, name)) for name in type(self).model_fields]


class SynthConfig(Section):
    """The built-in synthetic talking-face corpus (the offline default).

    With `protocol` on (the default) `avssl synth` writes the protocol's corpora under `out`
    (`out/pool`, `out/emotion`, `out/word`, `out/affect`, sized by `corpora.*`); off, it writes one
    corpus to `out` sized by the fields below."""

    out: str = "data/synth"
    protocol: bool = Field(True, description="write the pool + downstream corpora under `out` (false: one corpus at `out`)")
    corpora: SynthCorporaConfig = SynthCorporaConfig()
    name: str = Field("synthetic", description="corpus name in tables and MLflow (single-corpus mode)")
    speakers: int = Field(20, ge=3, description="voices; split speaker-independently (single-corpus mode)")
    clips_per_speaker: int = Field(48, ge=1)
    speaker_offset: int = Field(0, ge=0, description="first global speaker index; corpora with disjoint ranges share no speaker")
    labelled: bool = Field(True, description="false: store no task labels")
    video: bool = Field(True, description="draw the talking face (false: an audio-only corpus)")
    clip_seconds: float = Field(1.6, gt=0.4, le=10.0)
    frame_size: int = Field(64, ge=32, le=256, description="square grayscale frames")
    emotion_strength: float = Field(1.0, ge=0.0, le=2.0, description="scales emotion prosody and face offsets")
    jitter: float = Field(1.0, ge=0.0, le=3.0, description="per-clip random prosody variation")
    loudness_norm: bool = True
    loudness_range_db: float = Field(6.0, ge=0.0, le=30.0, description="random level around -26 dBFS when normalising")
    snr_db: Optional[float] = Field(20.0, description="additive noise at this SNR; null for clean audio")
    noise: Literal["white", "pink"] = "pink"
    vocabulary: VOCABULARY_NAMES = "minimal_pairs"
    head_motion: float = Field(
        1.0, ge=0.0, le=4.0, description="scale of head drift and offset within a clip (0 = perfectly aligned faces)"
    )
    split: SPLIT3 = (0.6, 0.2, 0.2)
    shard_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="processes; 0 = all CPUs")
    export_media: bool = Field(False, description="also write wav/mp4 files next to the shards")
    baseline: bool = Field(True, description="print MFCC + logistic regression baselines in the summary")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: SPLIT3) -> SPLIT3:
        return _check_split(v)


class PrepareConfig(Section):
    """`avssl prepare`: turning a real corpus into the corpus format."""

    frame_size: tuple[int, int] = Field((64, 64), description="(height, width) of the face crops")
    face_crop: tuple[float, float, float, float] = Field(
        (0.15, 0.1, 0.85, 0.9), description="face box as fractions (left, top, right, bottom) of the video frame"
    )
    split: tuple[float, float, float] = Field((0.7, 0.15, 0.15), description="speaker split where the corpus has none")
    segment_seconds: float = Field(4.0, gt=0.5, description="clip length when cutting long recordings (sewa)")
    max_clips: int = Field(0, ge=0, description="stop after this many clips; 0 = all")
    shard_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="decoding workers; 0 = every CPU (of the Ray cluster with engine=ray)")
    engine: Literal["ray", "processes"] = Field(
        "ray", description="ray: decode on Ray Data across the cluster's nodes (or the local runtime); "
        "processes: a process pool on this machine, no Ray")
    batch_files: int = Field(8, ge=1, description="files per decoding task")

    @model_validator(mode="after")
    def _valid_crop(self) -> "PrepareConfig":
        l, t, r, b = self.face_crop
        if not (0 <= l < r <= 1 and 0 <= t < b <= 1):
            raise ValueError("face_crop must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1")
        return self


class DataConfig(Section):
    corpus: str = Field("data/synth/pool", description="the pretraining corpus, a folder or s3://bucket/prefix (its labels are never used to pretrain)")
    batch_size: int = Field(16, ge=1)
    clip_frames: int = Field(0, ge=0, description="random crop length in video frames for pretraining; 0 = whole clip")
    still_frame: Literal["random", "first"] = "random"
    pretrain_fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of training speakers' clips used")
    prefetch_batches: int = Field(2, ge=0)


class AudioEncoderConfig(Section):
    name: str = "conv_gru"
    window_seconds: float = Field(0.2, gt=0.0)
    first_kernel_ms: float = Field(5.0, gt=0.0)
    first_stride_ms: float = Field(1.0, gt=0.0)
    base_channels: int = Field(8, ge=1)
    layers: int = Field(4, ge=1, le=8, description="kernel 4 / stride 2 layers after the first")
    code_dim: int = Field(64, ge=1)
    gru_hidden: int = Field(64, ge=1)
    gru_layers: int = Field(2, ge=1)


class IdentityEncoderConfig(Section):
    name: str = "conv_skip"
    base_channels: int = Field(8, ge=1)
    layers: int = Field(4, ge=1, le=6)
    code_dim: int = Field(32, ge=1)


class FrameDecoderConfig(Section):
    name: str = "unet"
    noise_dim: int = Field(8, ge=0)
    residual: bool = Field(
        True, description="predict the change from the still frame (training starts at 'copy the still'); false = a plain Tanh frame, as the reference"
    )


class AttributeHeadsConfig(Section):
    name: str = "linear"
    hidden: int = Field(0, ge=0, description="0 = linear heads")


class ModelConfig(Section):
    audio_encoder: AudioEncoderConfig = AudioEncoderConfig()
    identity_encoder: IdentityEncoderConfig = IdentityEncoderConfig()
    frame_decoder: FrameDecoderConfig = FrameDecoderConfig()
    attribute_heads: AttributeHeadsConfig = AttributeHeadsConfig()


class VisualObjectiveConfig(Section):
    loss: Literal["l1", "l2", "l1+l2"] = Field(
        "l2",
        description="pixel loss; l1 is the reference's. L1 pushes every wrong pixel equally hard, so on small data the "
        "mouth is drowned by small unpredictable changes (blinks, sub-pixel head motion); an L2 term lets big errors lead",
    )
    lower_face_weight: float = Field(2.0, ge=1.0, description="weight of the lower half of the face")
    frames_per_clip: int = Field(8, ge=0, description="frames decoded per clip for the loss; 0 = all")
    motion_weight: float = Field(
        0.0, ge=0.0, description="extra weight on pixels that differ from the still frame, by the square of the change; 0 = off"
    )


class AudioObjectiveConfig(Section):
    n_mfcc: int = Field(13, ge=1)
    n_mels: int = Field(40, ge=4)
    w_mfcc: float = Field(1.0, ge=0.0)
    w_logmel: float = Field(1.0, ge=0.0)
    w_log_f0: float = Field(1.0, ge=0.0)
    w_voicing: float = Field(1.0, ge=0.0)
    w_energy: float = Field(1.0, ge=0.0)


class ObjectiveConfig(Section):
    name: str = "av"
    w_visual: float = Field(1.0, ge=0.0)
    w_audio: float = Field(1.0, ge=0.0)
    visual: VisualObjectiveConfig = VisualObjectiveConfig()
    audio: AudioObjectiveConfig = AudioObjectiveConfig()


class ProbeConfig(Section):
    """A quick frozen-encoder probe run during pretraining: the downstream signal Tune optimises."""

    enabled: bool = True
    task: str = "emotion"
    corpus: Optional[str] = Field(None, description="labelled corpus the probe fits and scores on; null = evaluate.corpora[task]")
    max_clips: int = Field(400, ge=10, description="training-split clips the probe uses")
    val_max_clips: int = Field(0, ge=0, description="validation-split clips it uses; 0 = the whole validation split")
    folds: int = Field(4, ge=0, description="0: fit on training speakers, score on validation speakers; k >= 2: speaker-grouped "
                       "k-fold over training and validation speakers, every clip scored held out (a search metric needs the "
                       "resolution: UAR on n clips moves in steps of about 1/n)")


class TrainConfig(Section):
    epochs: int = Field(4, ge=1)
    max_steps: int = Field(0, ge=0, description="stop after this many steps; 0 = no limit")
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(5.0, ge=0.0)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    elastic_min_workers: int = Field(0, ge=0, description="if >0, keep training with as few as this many workers")
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = "auto"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_off(cls, v: object) -> object:
        return "off" if v is False else v  # YAML reads a bare `off` (train.mixed_precision=off) as false

    checkpoint_every_steps: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every_steps: int = Field(10, ge=1)
    figure_every_epochs: int = Field(1, ge=0, description="generated-vs-real frames figure every N epochs; 0 = last epoch only")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts; -1 = unlimited")
    storage_path: str = Field(default_factory=lambda: os.environ.get("AVSSL_STORAGE_PATH") or "avssl_runs",
                              description="checkpoints and encoders: a folder (shared storage on multi-node clusters) or an object-store "
                              "prefix, s3://bucket/runs (default: AVSSL_STORAGE_PATH or ./avssl_runs)")
    ray_address: Optional[str] = Field(None, description="Ray cluster address; null = start or join a local runtime")
    threads_per_worker: int = Field(0, ge=0, description="torch intra-op threads per worker; 0 = cpus_per_worker")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Ray Train's own log level")
    probe: ProbeConfig = ProbeConfig()

    @model_validator(mode="after")
    def _elastic_bounds(self) -> "TrainConfig":
        if self.elastic_min_workers > self.num_workers:
            raise ValueError("elastic_min_workers must not exceed num_workers")
        return self


class TrackingConfig(Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; null = MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = "avssl"
    artifact_root: Optional[str] = Field(None, description="artifact folder or object-store prefix (s3://bucket/mlflow) for new experiments; null = ./mlruns next to the store")
    connect_timeout_s: float = Field(10.0, gt=0.0)
    register_models: bool = Field(True, description="register each pretrained encoder in the MLflow Model Registry")
    model_name: str = Field("avssl-encoder-{objective}", description="registered model name; {objective} is filled in")
    system_metrics: bool = Field(True, description="log CPU, memory (and GPU) utilisation of pretraining runs")
    system_metrics_interval_s: float = Field(10.0, gt=0.0)


class EvaluateConfig(Section):
    encoder: Optional[str] = Field(None, description="MLflow run id, checkpoint path, or baseline: scratch, mfcc, logmel")
    tasks: list[str] = ["emotion"]
    corpora: dict[str, str] = Field(
        {"emotion": "data/synth/emotion", "word": "data/synth/word", "affect": "data/synth/affect"},
        description="the labelled corpus of each downstream task (task name -> prepared corpus folder)",
    )
    head: Literal["gru", "pool"] = "gru"
    layer: str = Field(
        "last",
        description="what the head reads from a pretrained or scratch encoder: last (top GRU layer), code (the conv "
        "code), gru1..gruN (one GRU layer), concat (all layers side by side), weighted (a learned softmax-weighted sum "
        "of the layers, as s3prl's featurizer)",
    )
    finetune: bool = False
    epochs: int = Field(30, ge=1)
    patience: int = Field(6, ge=1)
    lr: float = Field(3e-3, gt=0.0, description="head learning rate (and the scratch encoder's, which starts from random)")
    encoder_lr: float = Field(1e-4, gt=0.0, description="learning rate of a fine-tuned pretrained encoder")
    min_steps: int = Field(
        100, ge=0, description="at least this many optimiser steps whatever the label fraction (a small fraction takes several passes "
        "per epoch); early stopping waits for them"
    )

    @field_validator("layer")
    @classmethod
    def _known_layer(cls, v: str) -> str:
        import re

        if v not in ("last", "code", "concat", "weighted") and not re.fullmatch(r"gru[1-9]\d*", v):
            raise ValueError("layer must be one of last, code, gru1..gruN, concat, weighted")
        return v
    frozen_warmup_epochs: int = Field(0, ge=0, description="fine-tuning: epochs that train the head alone before the encoder joins")
    batch_size: int = Field(32, ge=1)
    hidden: int = Field(64, ge=1)
    seeds: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    parallel: bool = Field(True, description="run evaluation jobs as Ray tasks (all cores; any node of a cluster)")
    use_gpu: bool = Field(False, description="extract features and train heads on a GPU (each Ray task asks for gpus_per_task)")
    gpus_per_task: float = Field(0.25, gt=0.0, le=1.0, description="with use_gpu: the GPU share of one evaluation task (heads are small: several share a GPU)")
    feature_store: str = Field(
        "", description="where frozen features are written once and reused by every seed, head and study (empty: <train.storage_path>/features)"
    )


class NoiseStudyConfig(Section):
    snrs: list[Union[float, Literal["clean"]]] = ["clean", 20.0, 10.0, 5.0, 0.0]
    types: list[Literal["white", "babble"]] = ["white", "babble"]
    babble_talkers: int = Field(4, ge=1)
    train_with_noise: bool = False


class DatasizeStudyConfig(Section):
    fractions: list[float] = [0.1, 0.25, 0.5, 1.0]

    @field_validator("fractions")
    @classmethod
    def _in_unit(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("fractions must be in (0, 1]")
        return sorted(v)


class StudyConfig(Section):
    methods: list[str] = Field(["scratch", "mfcc"], description="encoders compared: run ids, checkpoints or baselines")
    task: str = "emotion"
    noise: NoiseStudyConfig = NoiseStudyConfig()
    datasize: DatasizeStudyConfig = DatasizeStudyConfig()


class ReportConfig(Section):
    out: str = "report"
    search_run: Optional[str] = Field(None, description="a Tune search's MLflow parent run id to include")
    run: Optional[str] = Field(None, description="a recipe's MLflow parent run id: report only its evaluations (null = every finished one)")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples per interval")
    bootstrap_unit: Literal["auto", "speaker", "clip"] = Field(
        "auto", description="what the bootstrap resamples in the test set: speakers, clips, or auto (speakers when there are at least 8)"
    )
    claims_task: str = Field("emotion", description="the task the paper's claims are judged on")


class Config(Section):
    preset: str = "tiny"
    seed: int = 0
    run_name: Optional[str] = Field(None, description="names the pretraining; rerunning the same name resumes")
    synth: SynthConfig = SynthConfig()
    prepare: PrepareConfig = PrepareConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    study: StudyConfig = StudyConfig()
    report: ReportConfig = ReportConfig()


def task_corpus(cfg: Config, task: str) -> str:
    """The labelled corpus a downstream task is evaluated on (`evaluate.corpora[task]`)."""
    from avssl.errors import ConfigError

    path = cfg.evaluate.corpora.get(task)
    if not path:
        known = ", ".join(f"{k}={v}" for k, v in cfg.evaluate.corpora.items()) or "none"
        raise ConfigError(f"evaluate.corpora has no corpus for task '{task}' (set evaluate.corpora.{task}=PATH; configured: {known})")
    return path


def probe_corpus(cfg: Config) -> str:
    """The labelled corpus of the pretraining probe: `train.probe.corpus`, else the probe task's corpus."""
    return cfg.train.probe.corpus or task_corpus(cfg, cfg.train.probe.task)
