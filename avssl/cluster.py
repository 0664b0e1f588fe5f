"""`avssl cluster check FILE`: a cluster-launcher YAML checked before `ray up` spends any time.

Two layers: Ray's own validator (schema, provider fields, typos), then what avssl needs of a
cluster and the security defaults it promises: avssl installed on every node, an MLflow server
and the tracking URI / shared storage exported, dashboard and MLflow bound to a private address,
Ray token auth, and no credentials written into the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from avssl.config.loader import read_yaml_mapping
from avssl.errors import ConfigError

# Keys and values that look like secrets; a cluster file must read them from the environment.
_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|private[_-]?key)$", re.I)
_SECRET_VALUES = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|(?:aws_secret_access_key|MLFLOW_TRACKING_PASSWORD|RAY_AUTH_TOKEN)\s*=\s*\S+)")
_PUBLIC_BIND = re.compile(r"--(?:dashboard-host|host)[= ](0\.0\.0\.0|::)\b")
# Paths to keys are fine (auth.ssh_private_key: ~/.ssh/id_ed25519); inline material is not.
_PATH_OK_KEYS = {"ssh_private_key", "ssh_public_key"}


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
            yield path, k, v
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _commands(cfg: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    out: list[str] = []
    for k in keys:
        out += [str(c) for c in cfg.get(k) or []]
    for node_type in (cfg.get("available_node_types") or {}).values():
        for k in ("initialization_commands", "worker_setup_commands", "setup_commands"):
            out += [str(c) for c in node_type.get(k) or []]
    return out


def avssl_problems(cfg: dict[str, Any], text: str) -> list[str]:
    """What a Ray-valid file can still get wrong for avssl."""
    problems = []
    commands = "\n".join(_commands(cfg))
    if "pip install" not in commands or "avssl" not in commands:
        problems.append("no setup command installs avssl on the nodes (expected `pip install ... avssl` in setup_commands)")
    if "mlflow server" not in commands:
        problems.append("no MLflow server is started on the head (head_start_ray_commands)")
    for var in ("MLFLOW_TRACKING_URI", "AVSSL_STORAGE_PATH"):
        if var not in commands:
            problems.append(f"{var} is not exported to the nodes: runs would track / checkpoint locally on each node")
    for m in _PUBLIC_BIND.finditer(commands):
        problems.append(f"`{m.group(0)}` binds a service to every interface; bind the head's private address")
    if "RAY_AUTH_MODE=disabled" in commands:
        problems.append("Ray token authentication is disabled (RAY_AUTH_MODE=disabled)")
    for path, key, value in _walk(cfg):
        where = f"{path}.{key}" if path else str(key)
        if path.startswith("file_mounts"):
            continue  # remote path -> local path: copying a key file is how secrets should travel
        if isinstance(value, str) and _SECRET_KEYS.search(str(key)) and str(key) not in _PATH_OK_KEYS and value.strip():
            problems.append(f"{where} holds a credential; read it from the environment instead")
    for m in _SECRET_VALUES.finditer(text):
        problems.append(f"a credential is written into the file ({m.group(0)[:24]}...); read it from the environment")
    return problems


def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Ray's validator, then avssl's checks; raises ConfigError listing every problem found."""
    import copy
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    cfg = read_yaml_mapping(path, "cluster-launcher config")
    text = path.read_text()
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # its INFO lines are about `ray up`, not this check
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except BaseException as e:  # jsonschema.ValidationError, ValueError, click's exit on a PANIC
        if isinstance(e, KeyboardInterrupt):
            raise
        message = getattr(e, "message", None) or getattr(e, "format_message", lambda: None)() or str(e)
        raise ConfigError(f"Ray's cluster validator rejected {path}: {str(message).splitlines()[0]}") from None
    problems = avssl_problems(cfg, text)
    if problems:
        raise ConfigError(f"{path} is a valid Ray cluster config, but:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def cluster_check_command(paths: list[str]) -> int:
    for p in paths:
        cfg = check_cluster_file(p)
        provider = cfg.get("provider", {}).get("type")
        print(f"{p}: accepted by Ray's cluster validator and avssl's checks (provider {provider}, cluster '{cfg.get('cluster_name')}')")
    return 0
