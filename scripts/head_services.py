"""The head node's own services, tied to the life of Ray on that node.

cluster.yaml starts them right after `ray start --head`:

    head_services.py start --host ADDR --port 5000 --backend-store-uri sqlite:///... \
        --artifacts-destination DIR --ray-port 6379 --relay 8265 --relay 5000

and they stop by themselves when Ray stops on the head (`ray down` and `ray stop` both end the
GCS server, which a supervisor process watches), so nothing of the cluster outlives `ray down`.

- an MLflow tracking server on ADDR:PORT, in a process group of its own;
- where ADDR is not 127.0.0.1: a relay from 127.0.0.1:N to ADDR:N for each `--relay N`,
  because `ray dashboard` (and `ray attach -p N`) forward to *localhost* on the head, while the
  dashboard and MLflow listen on the head's private address only.

`stop` ends a running instance by the process id it recorded (never by a name pattern, which
would also match the shell that runs the command). Standard library plus psutil (a dependency of
avssl): run it with the Python of the venv that has mlflow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

STATE_DIR = Path.home() / ".avssl"
STATE_FILE = "head_services.json"
LOG_FILE = Path.home() / "avssl-head-services.log"
MLFLOW_LOG = Path.home() / "mlflow-server.log"


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} head_services[{os.getpid()}]: {msg}", flush=True)


def _listens_on_localhost(host: str) -> bool:
    """Whether a service bound to host answers on 127.0.0.1, where `ray dashboard` forwards to."""
    return host in ("127.0.0.1", "localhost")


# -- process bookkeeping: a pid plus its start time, so a recycled pid is never signalled ---------


def _identity(pid: int) -> dict:
    import psutil

    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def _alive(ident: dict | None) -> bool:
    import psutil

    if not ident:
        return False
    try:
        p = psutil.Process(ident["pid"])
        return abs(p.create_time() - ident["create_time"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _end_group(ident: dict | None, grace_s: float) -> None:
    """SIGTERM the process group led by ident (start_new_session made it a group leader), then
    SIGKILL whatever of the group is left after grace_s."""
    if not _alive(ident):
        return
    pgid = ident["pid"]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def _read_state(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(state_dir: Path, state: dict) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(state_dir / STATE_FILE)


# -- the supervisor ---------------------------------------------------------------------------


def _listener_pid(port: int) -> int | None:
    """The process (of this user) listening on a TCP port: the GCS server of the local Ray head."""
    import psutil

    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return c.pid
    return None


class _Relay:
    """127.0.0.1:port -> host:port, one asyncio loop in a daemon thread."""

    def __init__(self, host: str, ports: list[int]):
        self.host, self.ports = host, ports
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.bound: list[int] = []
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        for port in self.ports:
            try:
                server = asyncio.start_server(lambda r, w, p=port: self._handle(r, w, p), "127.0.0.1", port)
                self.loop.run_until_complete(server)
                self.bound.append(port)
                _log(f"relay 127.0.0.1:{port} -> {self.host}:{port}")
            except OSError as e:
                _log(f"no relay on 127.0.0.1:{port}: {e}")
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer, port: int) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def supervise(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    stopping = threading.Event()
    reason = {"why": ""}

    def on_signal(signum, _frame):
        reason["why"] = f"signal {signal.Signals(signum).name}"
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    mlflow = Path(args.mlflow) if args.mlflow else Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow if mlflow.exists() else "mlflow"), "server", "--backend-store-uri", args.backend_store_uri,
           "--artifacts-destination", args.artifacts_destination, "--host", args.host, "--port", str(args.port)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    # MLflow refuses requests whose Host header is not localhost or an RFC 1918 address; the nodes
    # address it by the head's address, whatever range that is in.
    hosts = dict.fromkeys([args.host, "localhost", "127.0.0.1"])
    cmd += ["--allowed-hosts", ",".join(h for host in hosts for h in (host, f"{host}:*"))]
    _log("starting " + " ".join(cmd))
    with open(MLFLOW_LOG, "ab") as log:
        server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state = {"supervisor": _identity(os.getpid()), "mlflow": _identity(server.pid)}
    _write_state(state_dir, state)

    relay = _Relay(args.host, args.relay) if args.relay and not _listens_on_localhost(args.host) else None

    # Ray's GCS server on this node: when it is gone, Ray has stopped here.
    gcs = None
    deadline = time.time() + 120
    while gcs is None and time.time() < deadline and not stopping.is_set():
        pid = _listener_pid(args.ray_port)
        gcs = _identity(pid) if pid else None
        if gcs is None:
            stopping.wait(0.5)
    if gcs is None and not stopping.is_set():
        reason["why"] = f"nothing of this user listens on the Ray port {args.ray_port}: is Ray running on this node?"
        stopping.set()
    elif gcs is not None:
        _log(f"watching Ray's GCS server (pid {gcs['pid']}, port {args.ray_port})")

    while not stopping.is_set():
        if not _alive(gcs):
            reason["why"] = "Ray stopped on this node"
            break
        if server.poll() is not None:
            reason["why"] = f"the MLflow server exited with code {server.returncode} (see {MLFLOW_LOG})"
            break
        stopping.wait(0.5)

    _log(f"stopping: {reason['why']}")
    _end_group(state.get("mlflow"), grace_s=15)
    if server.poll() is None:
        server.wait(5)
    if relay is not None:
        relay.loop.call_soon_threadsafe(relay.loop.stop)
    current = _read_state(state_dir)
    if current.get("supervisor", {}).get("pid") == os.getpid():
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    _log("stopped")
    return 0


# -- commands -----------------------------------------------------------------------------------


def stop(state_dir: Path, quiet: bool = False) -> int:
    state = _read_state(state_dir)
    running = [name for name in ("supervisor", "mlflow") if _alive(state.get(name))]
    if running and not quiet:
        pids = ", ".join(f"{name} pid {state[name]['pid']}" for name in running)
        print(f"stopping the head services ({pids})")
    _end_group(state.get("supervisor"), grace_s=25)  # it ends the MLflow server itself
    _end_group(state.get("mlflow"), grace_s=10)  # in case the supervisor was killed without warning
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return 0


def _health(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _store_ready(url: str, deadline: float, answers: int = 4) -> bool:
    """/health answers before the tracking store does: each server worker opens the store on its
    first request (seconds on a busy head). Wait until the store has answered a few requests."""
    ok = 0
    while ok < answers and time.time() < deadline:
        if _health(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=max(1.0, min(60.0, deadline - time.time()))):
            ok += 1
        else:
            time.sleep(0.5)
    return ok >= answers


def start(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    stop(state_dir, quiet=True)
    argv = [sys.executable, os.path.abspath(__file__), "supervise", *_forward(args)]
    with open(LOG_FILE, "ab") as log:
        sup = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, close_fds=True)
    supervisor = _identity(sup.pid)  # it records itself and the MLflow server in the state file
    url = f"http://{args.host}:{args.port}"
    deadline = time.time() + args.timeout_s
    while not (_health(f"{url}/health") and _store_ready(url, deadline)):
        if sup.poll() is not None or time.time() > deadline:
            why = "exited" if sup.poll() is not None else f"did not answer within {args.timeout_s:g} s"
            print(f"the MLflow server on {url} {why}; last lines of {LOG_FILE} and {MLFLOW_LOG}:", file=sys.stderr)
            for f in (LOG_FILE, MLFLOW_LOG):
                try:
                    print("".join(f.read_text(errors="replace").splitlines(True)[-15:]), file=sys.stderr)
                except OSError:
                    pass
            _end_group(supervisor, grace_s=25)
            stop(state_dir, quiet=True)
            return 1
        time.sleep(0.5)
    relays = "" if _listens_on_localhost(args.host) or not args.relay else f"; 127.0.0.1:{{{','.join(map(str, args.relay))}}} relayed to {args.host}"
    print(f"MLflow server on {url} (supervisor pid {sup.pid}: it stops when Ray stops on this node{relays})")
    return 0


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--host", args.host, "--port", str(args.port), "--backend-store-uri", args.backend_store_uri,
           "--artifacts-destination", args.artifacts_destination, "--ray-port", str(args.ray_port),
           "--state-dir", str(args.state_dir), "--workers", str(args.workers or 0)]
    if args.mlflow:
        out += ["--mlflow", args.mlflow]
    for port in args.relay or []:
        out += ["--relay", str(port)]
    return out


def status(state_dir: Path) -> int:
    state = _read_state(state_dir)
    for name in ("supervisor", "mlflow"):
        ident = state.get(name)
        print(f"{name}: {'running, pid ' + str(ident['pid']) if _alive(ident) else 'not running'}")
    return 0 if _alive(state.get("supervisor")) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "supervise"):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True, help="the head's private address (never 0.0.0.0)")
        p.add_argument("--port", type=int, default=5000, help="MLflow server port")
        p.add_argument("--backend-store-uri", required=True)
        p.add_argument("--artifacts-destination", required=True)
        p.add_argument("--ray-port", type=int, default=6379, help="the head's GCS port, watched to stop with Ray")
        p.add_argument("--relay", type=int, action="append", help="relay 127.0.0.1:N to HOST:N (repeatable)")
        p.add_argument("--workers", type=int, default=0, help="MLflow server workers (0: MLflow's default)")
        p.add_argument("--state-dir", default=str(STATE_DIR))
        p.add_argument("--mlflow", default=None, help="the mlflow executable (default: the one next to this Python)")
        p.add_argument("--timeout-s", type=float, default=600.0, help="how long `start` waits for the server and its store")
    for name in ("stop", "status"):
        sub.add_parser(name).add_argument("--state-dir", default=str(STATE_DIR))
    args = parser.parse_args(argv)
    if args.command in ("start", "supervise") and args.host in ("0.0.0.0", "::", ""):
        parser.error(f"--host {args.host!r} would listen on every interface: give the head's private address")
    if args.command == "start":
        return start(args)
    if args.command == "supervise":
        return supervise(args)
    if args.command == "stop":
        return stop(Path(args.state_dir))
    return status(Path(args.state_dir))


if __name__ == "__main__":
    sys.exit(main())
