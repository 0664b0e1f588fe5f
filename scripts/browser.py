"""A real browser on the MLflow UI, all on 127.0.0.1: Debian's chromium (installed with apt-get
when missing), an `mlflow server` of our own on a free port (stopped by its process id), and
headless page dumps and screenshots. Used by the browser test and by `scripts/ui_screenshots.py`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

CHROMIUM = ("chromium", "chromium-browser")


def chromium() -> Optional[str]:
    return next((p for p in map(shutil.which, CHROMIUM) if p), None)


def ensure_chromium() -> str:
    """The chromium executable, installed from Debian's archive if missing (no service is started)."""
    found = chromium()
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
                   env=env, check=True, capture_output=True, timeout=1200)
    found = chromium()
    if not found:
        raise RuntimeError("apt-get installed chromium, but no chromium executable is on PATH")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, artifacts: Optional[Path] = None, timeout_s: float = 300.0) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over a SQLite store; yields its URL; stopped by its PID."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    log = open(store.parent / f"mlflow-server-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(store.parent / f'mlflow-server-{port}.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its own workers: a group we started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def _headless(exe: str, profile: Path, *args: str, budget_ms: int) -> list[str]:
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args]


def dump_dom(url: str, profile: Path, budget_ms: int = 30000) -> str:
    """The page's DOM after its scripts ran (up to `budget_ms` of virtual time)."""
    exe = ensure_chromium()
    out = subprocess.run(_headless(exe, profile, "--dump-dom", url, budget_ms=budget_ms), capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"chromium --dump-dom failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def screenshot(url: str, path: Path, profile: Path, size: tuple[int, int] = (1500, 900), budget_ms: int = 30000) -> Path:
    exe = ensure_chromium()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(_headless(exe, profile, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url, budget_ms=budget_ms),
                         capture_output=True, text=True, timeout=180)
    if out.returncode != 0 or not path.is_file():
        raise RuntimeError(f"chromium --screenshot failed ({out.returncode}): {out.stderr[-2000:]}")
    return path
