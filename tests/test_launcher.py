"""The Ray cluster launcher as a user runs it: `ray up`, `ray submit`, `ray exec`, `ray dashboard`,
`ray job submit` and `ray down` on a copy of cluster.yaml where only the lines marked EDIT differ,
against a real node over ssh (this machine, reached through an sshd of the test's own on
127.0.0.1, as a user created for the test). Also the head's service supervisor on its own."""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.ray_cluster import ListeningSockets
from tests.ssh_node import BIN, NodeUser, Sshd, ensure_packages, free_port, launcher_env, mux_masters, wait_until

REPO = Path(__file__).resolve().parents[1]
HEAD_SERVICES = REPO / "scripts" / "head_services.py"


# -- the copy of cluster.yaml a user makes ----------------------------------------------------------


def edit_cluster_file(text: str, edits: dict[int, str]) -> str:
    """Replace the value on each line marked `EDIT n` (n -> new value, as YAML / shell text); every
    other line stays as shipped. Returns the new file text."""
    out = []
    for line in text.splitlines(keepends=True):
        m = re.search(r"#\s*EDIT (\d+)\b", line)
        if not m or int(m.group(1)) not in edits:
            out.append(line)
            continue
        new = edits[int(m.group(1))]
        comment = line[m.start():]
        indent = line[: len(line) - len(line.lstrip())]
        body = line[len(indent): m.start()].rstrip()
        if body.startswith("# "):  # a commented-out setting: uncomment it
            body = body[2:]
        if body.startswith("- "):  # a command: keep the command, replace what it writes
            out.append(f"{indent}- {new}   {comment}")
        else:
            key = body.split(":", 1)[0]
            out.append(f"{indent}{key}: {new}   {comment}")
    return "".join(out)


def only_edit_lines_changed(before: str, after: str) -> list[str]:
    """The changed lines that are not marked EDIT (should be none)."""
    bad = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, before.splitlines(), after.splitlines()).get_opcodes():
        if tag == "equal":
            continue
        old, new = before.splitlines()[i1:i2], after.splitlines()[j1:j2]
        if len(old) != len(new) or any("EDIT" not in line for line in old + new):
            bad += [f"- {line}" for line in old] + [f"+ {line}" for line in new]
    return bad


def test_edit_lines_are_numbered_in_the_readme_order():
    text = (REPO / "cluster.yaml").read_text()
    numbers = [int(n) for n in re.findall(r"#\s*EDIT (\d+)\b", text)]
    assert numbers == sorted(numbers) == list(range(1, len(numbers) + 1)), numbers
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Clusters"):]
    section = section[: section.index("\n## ", 3)]
    for n in numbers:
        assert re.search(rf"^\s*{n}\. ", section, re.M), f"the README's cluster section does not list edit {n}"
    # An edited copy differs from the shipped file only on EDIT lines, and stays valid.
    copy = edit_cluster_file(text, {1: "127.0.0.1", 2: "[]", 3: "someone", 4: "/tmp/key",
                                    5: "echo 'export AVSSL_SHARED=/srv/x' > ~/.avssl_env", 6: "echo 'export AVSSL_RAY_PORT=1' >> ~/.avssl_env"})
    assert not only_edit_lines_changed(text, copy)
    import yaml

    cfg = yaml.safe_load(copy)
    assert cfg["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert cfg["auth"] == {"ssh_user": "someone", "ssh_private_key": "/tmp/key"}


def test_cluster_job_imports_the_installed_avssl_next_to_a_folder_named_avssl(tmp_path):
    """`ray submit` copies the script to the home folder and runs it there; a folder named avssl
    in that home (the repository synced as ~/avssl) must not shadow the installed package."""
    (tmp_path / "avssl" / "avssl").mkdir(parents=True)  # a checkout: no __init__.py at its top
    script = tmp_path / "cluster_job.py"
    script.write_text((REPO / "scripts" / "cluster_job.py").read_text())
    shadowed = subprocess.run([sys.executable, "-c", "from avssl import __version__"], cwd=tmp_path, capture_output=True, text=True)
    assert shadowed.returncode != 0 and "cannot import name '__version__'" in shadowed.stderr  # the defect, as it was
    out = subprocess.run([sys.executable, str(script), "--version"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0 and "avssl" in out.stdout, out.stderr


# -- the head's services, on their own ------------------------------------------------------------


def _listener(port: int) -> subprocess.Popen:
    """A stand-in for Ray's GCS server: a process listening on the Ray port."""
    code = f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    assert wait_until(lambda: _connects("127.0.0.1", port), 20)
    return proc


def _connects(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


# Stands in for `mlflow server` (whose start takes from seconds to minutes on a busy machine; the
# launcher test runs the real one): answers every GET on --host:--port, with a worker process as
# uvicorn has, and records the arguments it was given.
FAKE_MLFLOW = """#!{python}
import http.server, json, subprocess, sys, time
args = sys.argv[2:]
opt = {{args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}}
json.dump(args, open({record!r}, "w"))
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"path": self.path, "host": self.headers.get("Host")}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((opt["--host"], int(opt["--port"])), Handler).serve_forever()
"""


def test_head_services_stop_when_ray_stops_and_relay_a_private_address(tmp_path):
    """The server on a non-127.0.0.1 address (127.0.0.2 here) is relayed to 127.0.0.1 and accepts its
    own address as a Host; `start` again replaces the first instance (ended by its recorded ids);
    when the process on the Ray port exits, the supervisor ends the server, its workers and itself."""
    import psutil

    ray_port, mlflow_port = free_port(), free_port()
    fake = tmp_path / "mlflow"
    fake.write_text(FAKE_MLFLOW.format(python=sys.executable, record=str(tmp_path / "mlflow-args.json")))
    fake.chmod(0o755)
    gcs = _listener(ray_port)
    env = {**os.environ, "HOME": str(tmp_path)}
    args = [sys.executable, str(HEAD_SERVICES), "start", "--host", "127.0.0.2", "--port", str(mlflow_port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
            "--ray-port", str(ray_port), "--relay", str(mlflow_port), "--state-dir", str(tmp_path / "state"), "--mlflow", str(fake)]
    try:
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        state = json.loads((tmp_path / "state" / "head_services.json").read_text())
        first = [psutil.Process(state[k]["pid"]) for k in ("supervisor", "mlflow")]
        assert _health(f"http://127.0.0.2:{mlflow_port}/health") and _health(f"http://127.0.0.1:{mlflow_port}/health")
        given = json.loads((tmp_path / "mlflow-args.json").read_text())
        assert given[given.index("--host") + 1] == "127.0.0.2"
        assert "127.0.0.2:*" in given[given.index("--allowed-hosts") + 1].split(",")

        # Started again (as `ray up` does on a restart): the first instance is replaced, not doubled.
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert not any(_running(p) for p in first)
        state = json.loads((tmp_path / "state" / "head_services.json").read_text())
        second = [psutil.Process(state[k]["pid"]) for k in ("supervisor", "mlflow")]
        group = [*second, *second[1].children(recursive=True)]

        # Ray stops: everything of the services ends by itself.
        gcs.kill()
        gcs.wait()
        assert wait_until(lambda: not any(_running(p) for p in group), 60), [" ".join(p.cmdline()) for p in group if _running(p)]
        assert not _connects("127.0.0.1", mlflow_port) and not _connects("127.0.0.2", mlflow_port)
        assert not (tmp_path / "state" / "head_services.json").exists()
        log = (tmp_path / "avssl-head-services.log").read_text()
        assert "stopping: Ray stopped on this node" in log

        # `stop` with nothing left running is fine (and touches nothing it did not start).
        out = subprocess.run([sys.executable, str(HEAD_SERVICES), "stop", "--state-dir", str(tmp_path / "state")],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    finally:
        subprocess.run([sys.executable, str(HEAD_SERVICES), "stop", "--state-dir", str(tmp_path / "state")], env=env,
                       capture_output=True, timeout=120)
        gcs.kill()
        gcs.wait()


# -- the launcher, end to end ---------------------------------------------------------------------


class Steps:
    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []
        self.t0 = time.time()

    @contextmanager
    def __call__(self, name: str):
        t = time.time()
        status = "FAILED"
        try:
            yield
            status = "ok"
        finally:
            self.rows.append((name, time.time() - t, status))
            print(f"  [{time.time() - self.t0:6.1f} s] {name}: {time.time() - t:.1f} s {status}", flush=True)

    def table(self) -> str:
        lines = [f"{name:<72} {secs:7.1f} s  {status}" for name, secs, status in self.rows]
        return "\n".join(lines + [f"{'total':<72} {time.time() - self.t0:7.1f} s"])


class Launcher:
    def __init__(self, root: Path, env: dict[str, str], cluster_file: Path):
        self.root, self.env, self.cluster_file = root, env, cluster_file
        self.n = 0

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        self.n += 1
        log = self.root / f"{self.n:02d}-{args[0]}-{args[1] if len(args) > 1 else ''}.log".replace("/", "_")
        with log.open("w") as f:
            out = subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, timeout=timeout)
        text = log.read_text(errors="replace")
        if check and out.returncode != 0:
            raise AssertionError(f"`ray {' '.join(args)}` exited {out.returncode}:\n{text[-6000:]}")
        return text


def _phases(up_log: str) -> str:
    """How long `ray up` spent in each of its steps, from the timestamps of its log."""
    from datetime import datetime

    up_log = re.sub(r"\x1b\[[0-9;]*m", "", up_log)
    marks = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\s+INFO updater\.py:\d+ -- \[(\d)/7\] (.+)$", up_log, re.M)
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", up_log, re.M)
    if not marks or not stamps:
        return "(no step timestamps in the log)"
    t = [datetime.strptime(m[0], "%Y-%m-%d %H:%M:%S,%f") for m in marks] + [datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f")]
    return "; ".join(f"[{m[1]}/7] {m[2].strip()}: {(t[i + 1] - t[i]).total_seconds():.0f} s" for i, m in enumerate(marks))


def _mlflow_runs(uri: str, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps, f"tags.`avssl.run_name` = '{run_name}'")


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(3000)
def test_cluster_launcher_up_submit_dashboard_down():
    if os.geteuid() != 0:
        pytest.skip("needs root: it creates a user for the node and runs an sshd of its own")
    import psutil

    steps = Steps()
    root = Path(tempfile.mkdtemp(prefix="avl", dir="/tmp"))  # short: ssh and Ray socket paths have length limits
    root.chmod(0o755)
    user = sshd = dashboard = None
    try:
        with steps("install openssh-server and rsync if missing (apt-get)"):
            installed = ensure_packages()
            print(f"    installed: {installed or 'nothing, all present'}")
        with steps("create the node user (key, pip config), start sshd on 127.0.0.1"):
            user = NodeUser(root)
            sshd = Sshd(root, user).start()
        env = launcher_env(root, sshd)
        shared = user.home / "shared"
        ports = {name: free_port() for name in ("RAY", "DASHBOARD", "MLFLOW", "CLIENT", "AGENT")}
        shipped = (REPO / "cluster.yaml").read_text()
        text = edit_cluster_file(shipped, {
            1: "127.0.0.1",
            2: "[]",
            3: user.name,
            4: str(user.key),
            5: f"echo 'export AVSSL_SHARED={shared}' > ~/.avssl_env",
            6: "echo 'export " + " ".join(f"AVSSL_{k}_PORT={v}" for k, v in ports.items()) + "' >> ~/.avssl_env",
        })
        assert not only_edit_lines_changed(shipped, text), only_edit_lines_changed(shipped, text)
        cluster_file = root / "cluster.yaml"  # the launcher runs in the repository: file_mounts' "." is this checkout
        cluster_file.write_text(text)
        ray = Launcher(root, env, cluster_file)
        cf = str(cluster_file)

        with steps("ray get-auth-token --generate && chmod 600 (README); avssl cluster check on the copy"):
            subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
            token_file = Path(env["HOME"]) / ".ray" / "auth_token"
            token_file.chmod(0o600)
            out = subprocess.run([str(BIN / "avssl"), "cluster", "check", cf], cwd=REPO, env=env, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr

        # Everything the cluster runs is this user's; what it listens on is recorded from here on.
        with ListeningSockets(lambda: [*user.processes(), *([sshd.proc.pid] if sshd.proc else [])], interval_s=2.0) as sockets:
            with steps("ray up (venv, CPU torch, avssl; Ray head; MLflow server)"):
                up_log = ray("up", "-y", "--no-config-cache", cf, timeout=2400)
                print("    " + _phases(up_log))
            node_env = (user.home / ".avssl_env").read_text()
            assert "export AVSSL_HEAD_IP=127.0.0.1" in node_env, node_env
            token = user.home / ".ray" / "auth_token"
            assert token.stat().st_mode & 0o777 == 0o600
            assert token.read_text().strip() == token_file.read_text().strip()
            venv_python = user.home / "avssl-venv" / "bin" / "python"
            torch_build = subprocess.run([str(venv_python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                                         capture_output=True, text=True).stdout.strip()
            assert torch_build == "2.13.0+cpu None", torch_build

            with steps("ray submit ... scripts/cluster_job.py -- synth (tiny corpus on shared storage)"):
                ray("submit", cf, "scripts/cluster_job.py", "--", "synth", "synth.protocol=false", "synth.out=$AVSSL_SHARED/data/synth", "synth.speakers=6",
                    "synth.clips_per_speaker=8", "synth.frame_size=32", "synth.clip_seconds=1.2", "synth.workers=1",
                    "synth.baseline=false", timeout=600)
                assert (shared / "data" / "synth" / "manifest.jsonl").is_file()

            with steps("ray submit ... scripts/cluster_job.py -- pretrain (tiny, audio objective)"):
                log = ray("submit", cf, "scripts/cluster_job.py", "--", "pretrain", "--config", "tiny", "objective.name=audio",
                          "data.corpus=$AVSSL_SHARED/data/synth", "run_name=launcher", "train.epochs=1",
                          "train.probe.enabled=false", "train.checkpoint_every_steps=4", "train.log_every_steps=2",
                          "model.audio_encoder.base_channels=4", "model.audio_encoder.layers=3",
                          "model.audio_encoder.code_dim=16", "model.audio_encoder.gru_hidden=16", "data.batch_size=6",
                          timeout=900)
                assert "pretrain 'launcher' finished" in log, log[-4000:]

            with steps("the run through the head's MLflow server: FINISHED, encoder artifact"):
                uri = f"http://127.0.0.1:{ports['MLFLOW']}"
                client, runs = _mlflow_runs(uri, "launcher")
                assert len(runs) == 1, runs
                run = runs[0]
                assert run.info.status == "FINISHED"
                encoder = [a.path for a in client.list_artifacts(run.info.run_id, "encoder")]
                assert any(p.endswith(".pt") for p in encoder), encoder
                assert (shared / "avssl_runs" / "launcher" / "encoder.pt").is_file()
                print(f"    run {run.info.run_id}: {run.info.status}, artifacts {encoder}")

            with steps("ray exec ... 'ray status'"):
                status = ray("exec", cf, "ray status", timeout=300)
                assert "Active:" in status and "CPU" in status, status[-3000:]

            with steps("ray dashboard (tunnel) + ray job submit through it"):
                local_port = free_port()
                dash_log = (root / "dashboard.log").open("w")
                dashboard = subprocess.Popen([str(BIN / "ray"), "dashboard", cf, "--port", str(local_port), "--remote-port",
                                              str(ports["DASHBOARD"])], cwd=REPO, env=env, stdout=dash_log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
                url = f"http://127.0.0.1:{local_port}"

                def version():
                    req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
                    try:
                        with urllib.request.urlopen(req, timeout=5) as r:
                            return json.loads(r.read())
                    except (OSError, ValueError):
                        return None

                assert wait_until(version, 90), (root / "dashboard.log").read_text()
                out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
                                      "python", "scripts/cluster_job.py", "corpus", "$AVSSL_SHARED/data/synth"],
                                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
                assert out.returncode == 0 and "succeeded" in (out.stdout + out.stderr).lower(), (out.stdout + out.stderr)[-4000:]
                assert "clips" in out.stdout, out.stdout[-3000:]
                os.killpg(dashboard.pid, signal.SIGTERM)
                dashboard.wait(30)

            cluster_pids = {p.pid for p in user.processes()}
            mlflow_pid = json.loads((user.home / ".avssl" / "head_services.json").read_text())["mlflow"]["pid"]
            assert mlflow_pid in cluster_pids
            with steps("ray down"):
                ray("down", "-y", cf, timeout=300)

            with steps("everything ended: the node user's processes (MLflow included), ssh sessions and masters"):
                left = wait_until(lambda: not user.processes() and not mux_masters(root) and not sshd.sessions(), 90)
                leftovers = [f"{p.pid} {' '.join(p.cmdline())[:150]}" for p in [*user.processes(), *mux_masters(root), *sshd.sessions()]
                             if p.is_running()]
                assert left, f"still running after `ray down`: {leftovers}"
                assert not psutil.pid_exists(mlflow_pid) or psutil.Process(mlflow_pid).status() == psutil.STATUS_ZOMBIE
                assert not _connects("127.0.0.1", ports["MLFLOW"]) and not _connects("127.0.0.1", ports["RAY"])
                print(f"    {len(cluster_pids)} processes of the cluster were running before `ray down`; none is left")

        print("\nlistening sockets of the cluster (node user's processes and sshd) from `ray up` to `ray down`:")
        print(sockets.table())
        assert sockets.seen and not sockets.outside_loopback(), sockets.table()
        print("\n" + steps.table())
    finally:
        if dashboard is not None and dashboard.poll() is None:
            os.killpg(dashboard.pid, signal.SIGKILL)
            dashboard.wait()
        left = user.kill_all() if user is not None else []
        if sshd is not None:
            sshd.stop()
        if user is not None:
            user.delete()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        if left:
            print(f"killed what the node user still ran: {left}")
