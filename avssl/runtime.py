"""Connecting to Ray: join a cluster (address from config or RAY_ADDRESS) or start a local runtime,
and check that requested resources can ever be satisfied before spending any compute."""

from __future__ import annotations

import os
import socket
from typing import Optional

from avssl.errors import ResourceError

TUNE_DRIVER_RESOURCE = "avssl_tune_driver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, tune_slots: int = 8) -> dict:
    """Initialise Ray once per process. Locally: dashboard on 127.0.0.1 (Train's placement-group
    cleaner needs its State API) and a custom resource that Tune's trial drivers hold instead of CPU."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker prints go straight to the driver (Train's print patch would echo them twice).
    env = {"PYTHONUNBUFFERED": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise ResourceError(f"cannot join the Ray cluster at {address}: {e}") from None
    else:
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            resources={TUNE_DRIVER_RESOURCE: tune_slots},
            runtime_env={"env_vars": env},
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
    return ray.cluster_resources()


def check_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float, min_workers: int = 0) -> None:
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need = max(1, min_workers or num_workers)
    if use_gpu and gpus < need * gpus_per_worker:
        raise ResourceError(
            f"train.use_gpu=true asks for {need} x {gpus_per_worker} GPU but the Ray cluster has {gpus:g}; "
            "set train.use_gpu=false or join a cluster with GPUs (train.ray_address)"
        )
    if cpus < need * cpus_per_worker:
        raise ResourceError(
            f"{need} workers x {cpus_per_worker:g} CPU = {need * cpus_per_worker:g} CPUs requested, the Ray cluster has "
            f"{cpus:g}; lower train.num_workers or train.cpus_per_worker (or add nodes)"
        )


def quiet_train_worker_logs(level: str) -> None:
    """Apply Ray Train's log level to the per-report INFO lines too: Ray 2.60 logs them through a
    logger named by file path, which the `ray.train` level filter does not match."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(getattr(logging, level))
