"""Connecting to Ray: join a cluster (address from config or RAY_ADDRESS) or start a local runtime,
and check that requested resources can ever be satisfied before spending any compute.

The local runtime is local: every process of it binds and connects on 127.0.0.1 only. Ray on
Linux runs in "cluster mode" by default, which moves a node announced as 127.0.0.1 to the
machine's routable address and opens its servers on every interface; `loopback_env()` turns that
off for every Ray process, and the torch process group that Ray Train sets up is bound to the
address its ranks connect to (`bind_torch_store_to_master_address`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Optional
from urllib.parse import urlparse

from avssl.errors import ResourceError

TUNE_DRIVER_RESOURCE = "avssl_tune_driver"
LOOPBACK = "127.0.0.1"
# Runs first in every Ray worker process of a job started through ensure_ray.
WORKER_SETUP_HOOK = "avssl.runtime.bind_torch_store_to_master_address"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address_host(address: str) -> Optional[str]:
    """The host of a Ray address: `ray://h:p`, `http://h:p`, `h:p`; None for `auto`."""
    if address == "auto":
        return None
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    return parsed.hostname


def loopback_interface() -> str:
    """Name of the interface that carries 127.0.0.1 (`lo` on Linux)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addrs):
                return name
    except Exception:
        pass
    return "lo"


def loopback_env() -> dict[str, str]:
    """Environment that keeps Ray and torch.distributed on 127.0.0.1: Ray's cluster mode off (else
    a node started on 127.0.0.1 is moved to the routable address and its servers listen on every
    interface) and gloo's sockets on the loopback interface."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": loopback_interface()}


def _use_loopback_in_this_process() -> None:
    """Apply loopback_env() here and to every process started from here (Ray's node processes
    inherit this environment). Ray reads the cluster-mode switch when it is imported, so the
    already imported constant is set too."""
    os.environ.update(loopback_env())
    try:
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):
        pass


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, tune_slots: int = 8) -> dict:
    """Initialise Ray once per process. Locally: every process on 127.0.0.1, dashboard on a free
    loopback port (Train's placement-group cleaner needs its State API) and a custom resource that
    Tune's trial drivers hold instead of CPU. Joining a cluster whose address is a loopback
    address (a one-machine test cluster) keeps this process on loopback as well."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker prints go straight to the driver (Train's print patch would echo them twice).
    env = {"PYTHONUNBUFFERED": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    loopback = not address or is_loopback(address_host(address)) or os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    if loopback:
        _use_loopback_in_this_process()
        env.update(loopback_env())
    runtime_env = {"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise ResourceError(f"cannot join the Ray cluster at {address}: {e}") from None
    else:
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{port}"
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            dashboard_port=port,
            resources={TUNE_DRIVER_RESOURCE: tune_slots},
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
            _node_ip_address=LOOPBACK,
        )
    drop_known_noise()
    return ray.cluster_resources()


# Lines Ray prints to the driver that no user can act on, matched exactly.
KNOWN_NOISE = (
    # Ray Train 2.60's controller, once per run, about its own PreemptionWatcher actor (ray-project/ray#53727).
    "Actor with class name: 'PreemptionWatcher'",
)


def drop_known_noise() -> None:
    """Filter `KNOWN_NOISE` out of the worker output Ray forwards to this driver; every other line
    passes unchanged. Relies on Ray's stream dispatcher: if that ever moves, nothing is filtered."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handle in list(getattr(dispatcher, "handlers", [])):
        if name != "ray_print_logs" or getattr(handle, "_avssl_filter", False):
            continue

        def filtered(data, _handle=handle):
            lines = [line for line in data.get("lines", []) if not any(n in line for n in KNOWN_NOISE)]
            if lines:
                _handle({**data, "lines": lines})

        filtered._avssl_filter = True
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


def bind_torch_store_to_master_address() -> None:
    """Worker setup hook: the rank-0 TCPStore of torch.distributed, which Ray Train creates through
    `torch.distributed.rendezvous`, listens on every interface ('::'). Bind it to the address the
    other ranks are given (MASTER_ADDR: the node's Ray address, 127.0.0.1 locally) instead.

    Installed lazily: the patch is applied when torch.distributed.rendezvous is first imported, so
    Ray workers that never use torch do not pay for importing it."""
    module = sys.modules.get("torch.distributed.rendezvous")
    if module is not None:
        _patch_rendezvous(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport:
    """A meta-path finder that only watches for torch.distributed.rendezvous."""

    name = "torch.distributed.rendezvous"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _patch_rendezvous(module)

        spec.loader.exec_module = exec_module
        return spec


def _patch_rendezvous(module) -> None:
    original = getattr(module, "_create_c10d_store", None)
    if original is None or getattr(original, "avssl_bound", False):
        return

    def create_c10d_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        try:
            ip = ipaddress.ip_address(hostname)
        except ValueError:  # a host name: leave it to torch
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        agent_store = getattr(module, "_torchelastic_use_agent_store", lambda: False)()
        if rank != 0 or agent_store or port == 0:
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(ip), port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        return module.TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                               multi_tenant=True, master_listen_fd=sock.detach(), use_libuv=use_libuv)

    create_c10d_store.avssl_bound = True
    module._create_c10d_store = create_c10d_store


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
