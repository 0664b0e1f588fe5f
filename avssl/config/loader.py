"""Load a config: preset or YAML file, then dotted overrides, validated before any work starts."""

from __future__ import annotations

import copy
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from avssl.config.schema import Config
from avssl.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
# Fields holding filesystem paths: made absolute at load so Ray workers (other cwd) agree.
PATH_FIELDS = ("synth.out", "data.corpus", "train.storage_path", "train.probe.corpus", "report.out", "tracking.artifact_root")
PATH_MAPPINGS = ("evaluate.corpora",)  # mappings whose values are paths


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (configs, search spaces, cluster files)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of fields, got {type(data).__name__}")
    return data


def _resolve_source(config: str) -> Path:
    path = Path(config)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"config '{config}' is neither a file nor a preset; presets: {', '.join(preset_names())}"
    )


def _load_tree(config: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A file may say `extends: PRESET_OR_FILE` to start from another config."""
    path = _resolve_source(config)
    key = str(path.resolve())
    if key in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(seen + (key,))}")
    data = read_yaml_mapping(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        data.setdefault("preset", path.stem if path.parent == PRESET_DIR else data.get("preset", "custom"))
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: 'extends' must name a preset or a file")
    if not Path(base_name).is_absolute() and (path.parent / base_name).is_file():
        base_name = str(path.parent / base_name)
    base = _load_tree(base_name, seen + (key,))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _submodel(model: type[BaseModel], name: str) -> Optional[type[BaseModel]]:
    ann = model.model_fields[name].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _is_mapping(model: type[BaseModel], name: str) -> bool:
    return typing.get_origin(model.model_fields[name].annotation) is dict


def _check_key_path(parts: list[str], raw: str) -> None:
    """Fail on an unknown dotted key, naming the nearest valid field."""
    model: Optional[type[BaseModel]] = Config
    for i, part in enumerate(parts):
        if model is None:
            prefix = ".".join(parts[:i])
            raise ConfigError(f"override '{raw}': '{prefix}' is a value, not a section")
        names = _field_names(model)
        if part not in names:
            prefix = ".".join(parts[:i])
            where = f"'{prefix}'" if prefix else "the config"
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
            raise ConfigError(f"override '{raw}': {where} has no field '{part}'{hint} fields: {', '.join(names)}")
        if _is_mapping(model, part):  # a mapping (e.g. evaluate.corpora): any one key below it
            if len(parts) > i + 2:
                raise ConfigError(f"override '{raw}': '{'.'.join(parts[: i + 2])}' is a value, not a section")
            return
        model = _submodel(model, part)


def parse_override(raw: str) -> tuple[list[str], Any]:
    if "=" not in raw:
        raise ConfigError(f"override '{raw}' must look like section.field=value")
    key, _, value = raw.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{raw}' has an empty field name")
    _check_key_path(parts, raw)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for raw in overrides:
        parts, value = parse_override(raw)
        node = tree
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return tree


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parent_parts = [str(p) for p in e["loc"][:-1]]
            model: Optional[type[BaseModel]] = Config
            for p in parent_parts:
                model = _submodel(model, p) if model and p in model.model_fields else None
            names = _field_names(model) if model else []
            close = difflib.get_close_matches(str(e["loc"][-1]), names, n=1)
            hint = f"; did you mean '{'.'.join(parent_parts + [close[0]])}'?" if close else ""
            lines.append(f"  {loc}: unknown field{hint} fields here: {', '.join(names)}")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"  {loc}: {e['msg']}{got_s}")
    return "invalid config:\n" + "\n".join(lines)


def _resolve_paths(cfg: Config, base: Path) -> None:
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        node: Any = cfg
        for p in parents:
            node = getattr(node, p)
        value = getattr(node, leaf)
        if value is None or "://" in str(value):
            continue
        setattr(node, leaf, str((base / os.path.expanduser(value)).resolve()))
    for dotted in PATH_MAPPINGS:
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        mapping = getattr(node, leaf)
        setattr(node, leaf, {k: v if "://" in str(v) else str((base / os.path.expanduser(v)).resolve()) for k, v in mapping.items()})


def _check_registered_names(cfg: Config) -> None:
    """Names that refer to registries are checked here, before any work starts."""
    from avssl.evaluate.tasks import TASKS
    from avssl.models import AUDIO_ENCODERS, ATTRIBUTE_HEADS, FRAME_DECODERS, IDENTITY_ENCODERS
    from avssl.objectives import OBJECTIVES

    checks = [
        ("model.audio_encoder.name", AUDIO_ENCODERS, cfg.model.audio_encoder.name),
        ("model.identity_encoder.name", IDENTITY_ENCODERS, cfg.model.identity_encoder.name),
        ("model.frame_decoder.name", FRAME_DECODERS, cfg.model.frame_decoder.name),
        ("model.attribute_heads.name", ATTRIBUTE_HEADS, cfg.model.attribute_heads.name),
        ("objective.name", OBJECTIVES, cfg.objective.name),
        ("train.probe.task", TASKS, cfg.train.probe.task),
        ("study.task", TASKS, cfg.study.task),
    ]
    checks += [(f"evaluate.tasks[{i}]", TASKS, t) for i, t in enumerate(cfg.evaluate.tasks)]
    checks += [(f"evaluate.corpora.{t}", TASKS, t) for t in cfg.evaluate.corpora]
    problems = [f"  {field}: {reg.unknown_message(value)}" for field, reg, value in checks if value not in reg]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def load_config(
    config: Optional[str] = None,
    overrides: Iterable[str] = (),
    base_dir: Optional[Path] = None,
    check_names: bool = True,
) -> Config:
    """Build the validated config: defaults <- preset/file (with `extends`) <- overrides."""
    overrides = list(overrides)
    tree = _load_tree(config) if config else _load_tree("tiny")
    # On top of the defaults: overriding one field of a nested default (synth.corpora.pool.speakers)
    # keeps that default's other fields.
    tree = apply_overrides(deep_merge(Config().model_dump(mode="json"), tree), overrides)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
    _resolve_paths(cfg, base_dir or Path.cwd())
    if check_names:
        _check_registered_names(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config that was serialised with `model_dump` (e.g. inside a checkpoint)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params and Tune spaces."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
