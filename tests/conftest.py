"""Shared fixtures: tiny configs and one small synthetic corpus per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("PYTHONUNBUFFERED", "1")


TINY_SYNTH = [
    "synth.speakers=6",
    "synth.clips_per_speaker=12",
    "synth.frame_size=32",
    "synth.clip_seconds=1.2",
    "synth.workers=1",
    "synth.baseline=false",
    "synth.split=[0.5,0.25,0.25]",
]

# Model and schedule small enough for seconds-long CPU runs on the tiny corpus.
TINY_TRAIN = [
    "model.audio_encoder.base_channels=4",
    "model.audio_encoder.layers=3",
    "model.audio_encoder.code_dim=16",
    "model.audio_encoder.gru_hidden=16",
    "model.identity_encoder.base_channels=4",
    "model.identity_encoder.layers=3",
    "model.identity_encoder.code_dim=8",
    "objective.visual.frames_per_clip=4",
    "data.batch_size=6",
    "train.epochs=2",
    "train.checkpoint_every_steps=4",
    "train.log_every_steps=2",
    "train.probe.max_clips=40",
    "evaluate.epochs=3",
    "evaluate.patience=2",
    "evaluate.seeds=[0]",
    "evaluate.hidden=8",
]


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """72 clips, 6 speakers (3/2/2... by split), 32x32 frames; generated once per session."""
    from avssl.config import load_config
    from avssl.data.synthetic.generator import generate

    out = tmp_path_factory.mktemp("corpus") / "synth"
    cfg = load_config("tiny", TINY_SYNTH + [f"synth.out={out}"])
    generate(cfg.synth, cfg.seed, quiet=True)
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh folder: mlflow.db, mlruns/ and avssl_runs/ land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the in-process tests (as `avssl` itself starts it)."""
    import ray

    from avssl.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def tiny_cfg(workdir: Path, corpus: Path, *extra: str):
    from avssl.config import load_config

    return load_config(
        "tiny",
        TINY_TRAIN
        + [
            f"data.corpus={corpus}",
            *(f"evaluate.corpora.{task}={corpus}" for task in ("emotion", "word", "affect")),
            "study.noise.babble_talkers=2",
            f"train.storage_path={workdir / 'runs'}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        ]
        + list(extra),
    )
