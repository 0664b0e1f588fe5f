"""A real Ray cluster on 127.0.0.1 for tests: a head and worker nodes started with `ray start`,
as on real machines (one raylet each), with token authentication on and every port explicit.
Every process of it binds and connects on loopback only (`avssl.runtime.loopback_env`), and
`ListeningSockets` records what a process tree listens on while a test runs.

Everything lives under a short temp folder of its own (socket paths have a length limit), and
`stop()` kills only this cluster's processes: never `ray stop`, which would also stop other Ray
runtimes on the machine.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from avssl.runtime import loopback_env

BIN = Path(sys.executable).parent


def registered_checkpoint_step(run_dir: Path) -> int:
    """The newest checkpoint Ray Train's controller has registered (a folder on disk may not be yet)."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


# `ray start --address=...` for a further node on this machine. With Ray's cluster mode off (what
# keeps every node process on loopback), the CLI refuses to join a cluster ("multi-node clusters
# are not supported on Windows and OSX"); with it on, it rewrites --node-ip-address=127.0.0.1 to
# the routable address. So the CLI process alone passes its guard and keeps the given address; the
# node's own processes still run with cluster mode off (self.env).
_JOIN_ON_LOOPBACK = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


@dataclass
class Node:
    name: str
    node_manager_port: int
    resources: dict = field(default_factory=dict)
    node_id: Optional[str] = None

    def raylet(self) -> Optional[psutil.Process]:
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in (p.info["name"] or "") and f"--node_manager_port={self.node_manager_port}" in cmd:
                return p
        return None


class LocalRayCluster:
    def __init__(self, health_check_ms: int = 500):
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self._used: set[int] = set()
        self.port, self.dashboard_port = self._port_block(2)
        self.nodes: list[Node] = []
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's cluster mode would move a node started on 127.0.0.1 to the routable address.
            **loopback_env(),
            # Notice a dead node within seconds, not the default 15 s.
            "RAY_health_check_period_ms": str(health_check_ms),
            "RAY_health_check_timeout_ms": str(health_check_ms),
            "RAY_health_check_failure_threshold": "4",
        }
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            self.env.pop(var, None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of a process that drives work on this cluster (an `avssl` command)."""
        return {**self.env, "RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url, **extra}

    def _port_block(self, n: int) -> list[int]:
        """n consecutive ports that are free now and given to no other component of this cluster
        (separately picked free ports can land inside a worker port range)."""
        import random
        import socket

        rng = random.Random()
        for _ in range(200):
            base = rng.randrange(20000, 60000 - n)
            block = list(range(base, base + n))
            if self._used.intersection(block):
                continue
            try:
                for port in block:
                    with socket.socket() as sock:
                        sock.bind(("", port))
            except OSError:
                continue
            self._used.update(block)
            return block
        raise RuntimeError(f"no block of {n} free ports")

    def _ports(self, head: bool) -> list[str]:
        ports = self._port_block(8)
        workers = self._port_block(61)
        args = [
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
            f"--metrics-export-port={ports[5]}",
            f"--min-worker-port={workers[0]}",
            f"--max-worker-port={workers[-1]}",
            "--object-store-memory=150000000",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
        ]
        if head:
            args += [f"--ray-client-server-port={ports[6]}"]
        return args

    def _start(self, name: str, args: list[str], num_cpus: int, resources: Optional[dict]) -> Node:
        import json

        resources = {f"node_{name}": 1, **(resources or {})}
        args = args + [f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}"]
        port = int(next(a for a in args if a.startswith("--node-manager-port=")).split("=")[1])
        cli = [str(BIN / "ray")] if "--head" in args else [sys.executable, "-c", _JOIN_ON_LOOPBACK]
        out = subprocess.run([*cli, "start", *args], env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{out.stdout}\n{out.stderr}")
        node = Node(name, port, resources)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 1, resources: Optional[dict] = None) -> Node:
        args = ["--head", f"--port={self.port}", f"--temp-dir={self.root}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"] + self._ports(head=True)
        node = self._start("head", args, num_cpus, resources)
        self.wait_http(f"{self.dashboard_url}/api/version", auth=True)
        return node

    def add_node(self, name: str, num_cpus: int = 1, resources: Optional[dict] = None) -> Node:
        return self._start(name, [f"--address={self.address}"] + self._ports(head=False), num_cpus, resources)

    def wait_http(self, url: str, auth: bool, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.request(url, auth), timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not answer")
            time.sleep(0.5)

    def request(self, url: str, auth: bool = True) -> urllib.request.Request:
        headers = {"Authorization": f"Bearer {self.token_path.read_text().strip()}"} if auth else {}
        return urllib.request.Request(url, headers=headers)

    def alive_nodes(self) -> int:
        import json

        with urllib.request.urlopen(self.request(f"{self.dashboard_url}/nodes?view=summary"), timeout=10) as r:
            summary = json.loads(r.read())["data"]["summary"]
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def kill_node(self, node: Node) -> int:
        """SIGKILL the node's raylet, as when a machine dies; its workers lose their raylet too."""
        raylet = node.raylet()
        if raylet is None:
            raise RuntimeError(f"no raylet for node {node.name}")
        children = raylet.children(recursive=True)
        raylet.kill()
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass
        return raylet.pid

    def _processes(self) -> list[psutil.Process]:
        mine = []
        ports = {f"--node_manager_port={n.node_manager_port}" for n in self.nodes}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(self.root) in cmd or any(port in cmd for port in ports):
                mine.append(p)
        return mine

    def stop(self) -> None:
        procs = self._processes()
        for p in list(procs):
            try:
                procs += p.children(recursive=True)
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class ListeningSockets:
    """Samples, in a background thread, the listening TCP sockets and unconnected UDP sockets of
    some processes and all their descendants: `{(ip, port, proto): command line}`."""

    def __init__(self, roots, interval_s: float = 0.5):
        import threading

        self._roots = roots if callable(roots) else (lambda: roots)
        self.interval_s = interval_s
        self.seen: dict[tuple[str, int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ListeningSockets":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        procs: dict[int, psutil.Process] = {}
        for root in self._roots():
            try:
                root = root if isinstance(root, psutil.Process) else psutil.Process(root)
                for p in [root, *root.children(recursive=True)]:
                    procs[p.pid] = p
            except psutil.Error:
                continue
        if Path("/proc/net/tcp").exists():
            self._sample_proc(procs)
            return
        for p in procs.values():  # elsewhere: psutil per process
            try:
                conns = p.net_connections(kind="inet")
                cmd = " ".join(p.cmdline())[:120]
            except psutil.Error:
                continue
            for c in conns:
                udp = c.type == socket.SOCK_DGRAM
                if c.status == psutil.CONN_LISTEN or (udp and not c.raddr):
                    self.seen.setdefault((c.laddr.ip, c.laddr.port, "udp" if udp else "tcp"), cmd)

    def _sample_proc(self, procs: dict[int, "psutil.Process"]) -> None:
        """Linux: the socket inodes the processes hold, matched against one read of the kernel's
        socket tables (cheap enough to run every second next to a busy cluster)."""
        owner: dict[str, int] = {}
        for pid in procs:
            try:
                for fd in os.scandir(f"/proc/{pid}/fd"):
                    try:
                        target = os.readlink(fd.path)
                    except OSError:
                        continue
                    if target.startswith("socket:["):
                        owner[target[8:-1]] = pid
            except OSError:
                continue
        for table, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
            try:
                lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) < 10 or f[9] not in owner:
                    continue
                local, remote, state = f[1], f[2], f[3]
                if (proto == "tcp" and state != "0A") or (proto == "udp" and int(remote.rsplit(":", 1)[1], 16) != 0):
                    continue
                ip_hex, port_hex = local.rsplit(":", 1)
                raw = bytes.fromhex(ip_hex)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
                key = (ip, int(port_hex, 16), proto)
                if key not in self.seen:
                    try:
                        cmd = " ".join(procs[owner[f[9]]].cmdline())[:120]
                    except psutil.Error:
                        cmd = f"pid {owner[f[9]]}"
                    self.seen[key] = cmd

    def outside_loopback(self) -> dict[tuple[str, int, str], str]:
        return {k: v for k, v in self.seen.items() if not _is_loopback(k[0])}

    def table(self) -> str:
        rows = [f"{proto} {ip}:{port:<6} {'' if _is_loopback(ip) else 'NOT LOOPBACK  '}{cmd}"
                for (ip, port, proto), cmd in sorted(self.seen.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1]))]
        rows.append(f"{len(self.seen)} listening sockets, {len(self.outside_loopback())} outside 127.0.0.0/8")
        return "\n".join(rows)
