"""Search spaces declared in `tune_spaces/*.yaml`, validated before any trial starts.

A space names the config fields it varies and how (choice, uniform, loguniform, randint, grid),
the metric and mode, the scheduler (ASHA by default; none for grids), the searcher, samples,
per-trial resources, concurrency, and the base config it overrides. A grid may also run over
bundles of settings that go together, e.g. `{trial.encoder: scratch}` vs
`{trial.encoder: pretrained, data.pretrain_fraction: 0.5}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from avssl.config.loader import _check_key_path, _format_validation_error, load_config, read_yaml_mapping
from avssl.config.schema import Config
from avssl.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrialSettings(Strict):
    """What one trial does. Fields here can be searched too, as `trial.<field>`."""

    encoder: Literal["pretrained", "scratch"] = "pretrained"
    downstream: bool = Field(False, description="after pretraining, train a downstream head and report its validation score")
    task: str = "emotion"
    workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="a fraction (e.g. 0.25) lets small trials share a GPU")
    in_process: bool = Field(True, description="a one-worker trial runs the training loop in the trial's own process "
                             "(no nested TorchTrainer); trials with several workers always nest one")


class SchedulerSettings(Strict):
    name: Literal["asha", "none"] = "asha"
    time_attr: str = "epoch"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: Optional[int] = Field(None, ge=1, description="default: the base config's train.epochs")


class BaseSettings(Strict):
    config: str = "tiny"
    overrides: list[str] = []


class SearchSpace(Strict):
    name: str
    description: str = ""
    base: BaseSettings = BaseSettings()
    metric: str = "probe/val_uar"
    mode: Literal["max", "min"] = "max"
    space: dict[str, dict[str, Any]]
    trial: TrialSettings = TrialSettings()
    scheduler: Optional[SchedulerSettings] = None  # default: ASHA unless the space has a grid
    searcher: Literal["random", "optuna"] = Field("random", description="random/grid sampling, or Optuna's TPE (model-based)")
    num_samples: int = Field(1, ge=1, description="samples of the random dimensions (each grid point is run this many times)")
    max_concurrent_trials: int = Field(2, ge=1)
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ '\""):
            raise ValueError("name must be non-empty without spaces, quotes or slashes")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        if not self.space:
            raise ValueError("space must vary at least one field")
        for key, dist in self.space.items():
            _check_distribution(key, dist)
        if self.scheduler is None:
            self.scheduler = SchedulerSettings(name="none" if self.has_grid else "asha")
        if self.searcher == "optuna" and self.has_grid:
            raise ValueError("searcher optuna samples its dimensions; grids run with searcher: random")
        return self

    def searched_trial_fields(self) -> set[str]:
        """The `trial.*` fields this space varies (directly or inside grid bundles)."""
        found = set()
        for key, dist in self.space.items():
            values = next(iter(dist.values()))
            keys = [key] + [k for v in (values if isinstance(values, list) else []) if isinstance(v, dict) for k in v]
            found.update(k[len("trial."):] for k in keys if k.startswith("trial."))
        return found

    @property
    def in_process(self) -> bool:
        """Whether trials train inside their own process: one worker, and the trial's resources
        (workers, CPUs, GPUs) fixed for the whole search."""
        return self.trial.in_process and self.trial.workers == 1 and not (
            self.searched_trial_fields() & {"workers", "cpus_per_worker", "gpus_per_worker", "in_process"})

    @property
    def has_grid(self) -> bool:
        return any("grid" in d for d in self.space.values())

    @property
    def grid_size(self) -> int:
        n = 1
        for d in self.space.values():
            if "grid" in d:
                n *= len(d["grid"])
        return n

    @property
    def total_trials(self) -> int:
        return self.grid_size * self.num_samples


def _check_field(key: str, where: str) -> None:
    if key.startswith("trial."):
        name = key[len("trial.") :]
        if name not in TrialSettings.model_fields:
            raise ValueError(f"{where}: 'trial' has no field '{name}' (fields: {', '.join(TrialSettings.model_fields)})")
        return
    try:
        _check_key_path(key.split("."), key)
    except ConfigError as e:
        raise ValueError(f"{where}: {e}") from None


def _check_distribution(key: str, dist: dict[str, Any]) -> None:
    where = f"space.{key}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ValueError(f"{where}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{uniform: [0.1, 2.0]}}")
    kind, args = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}.{kind}: a non-empty list of values")
        bundles = [a for a in args if isinstance(a, dict)]
        if bundles and (kind != "grid" or len(bundles) != len(args)):
            raise ValueError(f"{where}.{kind}: settings bundles (mappings) go in a grid, all values bundles")
        if bundles:
            for b in bundles:
                for k in b:
                    _check_field(k, f"{where}.grid")
        else:
            _check_field(key, where)
        return
    _check_field(key, where)
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
        raise ValueError(f"{where}.{kind}: [low, high]")
    lo, hi = args
    if not lo < hi:
        raise ValueError(f"{where}.{kind}: low must be below high (got {lo}, {hi})")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"{where}.loguniform: bounds must be positive")
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ValueError(f"{where}.randint: integer bounds")


def load_space(path: Union[str, Path], overrides: list[str] = ()) -> tuple[SearchSpace, Config]:
    """The validated space and its validated base config (base overrides, then CLI overrides)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search space")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + _format_validation_error(e).replace("invalid config", "invalid search space")) from None
    base_config = space.base.config
    if not Path(base_config).is_absolute() and (path.parent / base_config).is_file():
        base_config = str(path.parent / base_config)
    cfg = load_config(base_config, list(space.base.overrides) + list(overrides))
    return space, cfg


def to_tune(space: SearchSpace) -> dict[str, Any]:
    """The Ray Tune param_space: dotted keys -> tune distributions."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dist in space.space.items():
        kind, args = next(iter(dist.items()))
        if kind == "grid":
            out[key] = tune.grid_search(args)
        elif kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "randint":
            out[key] = tune.randint(args[0], args[1] + 1)
    return out


def sampled_overrides(params: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """A trial's sampled values -> (config overrides, trial settings). Bundles are flattened."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    overrides = [f"{k}={_yaml_scalar(v)}" for k, v in flat.items() if not k.startswith("trial.")]
    trial = {k[len("trial.") :]: v for k, v in flat.items() if k.startswith("trial.")}
    return overrides, trial


def _yaml_scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def flat_params(params: dict[str, Any]) -> dict[str, Any]:
    """For MLflow: bundles flattened, every key prefixed `space.`."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update({f"space.{k}": v for k, v in value.items()})
        else:
            out[f"space.{key}"] = value
    return out
