"""Clusters: cluster.yaml validation, job submission to a real Ray head, multi-node pretraining,
and the faults a cluster run must survive (a dead node, a killed driver, a dropped MLflow server)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from avssl.cluster import check_cluster_file
from avssl.errors import ConfigError
from avssl.runtime import free_port
from tests.conftest import TINY_TRAIN
from tests.ray_cluster import BIN, ListeningSockets, LocalRayCluster, registered_checkpoint_step

REPO = Path(__file__).resolve().parents[1]


# -- cluster.yaml ------------------------------------------------------------------------------


def test_shipped_cluster_files_pass_rays_validator_and_avssl_checks():
    for name in ("cluster.yaml", "cluster-gpu.yaml"):
        cfg = check_cluster_file(REPO / name)
        assert cfg["cluster_name"].startswith("avssl")
    local = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert local["provider"]["type"] == "local" and local["provider"]["worker_ips"]
    gpu = yaml.safe_load((REPO / "cluster-gpu.yaml").read_text())
    assert any("g5" in t["node_config"]["InstanceType"] for t in gpu["available_node_types"].values())


def _broken(tmp_path: Path, edit) -> Path:
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    edit(cfg)
    out = tmp_path / "broken.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_broken_cluster_files_are_rejected(tmp_path):
    def typo(c):
        c["head_start_ray_comands"] = c.pop("head_start_ray_commands")

    with pytest.raises(ConfigError, match=r"Ray's cluster validator rejected .*head_start_ray_comands"):
        check_cluster_file(_broken(tmp_path, typo))

    def wrong_type(c):
        c["max_workers"] = "two"

    with pytest.raises(ConfigError, match="Ray's cluster validator rejected"):
        check_cluster_file(_broken(tmp_path, wrong_type))

    def no_workers(c):
        del c["provider"]["worker_ips"]

    with pytest.raises(ConfigError, match="worker_ips"):
        check_cluster_file(_broken(tmp_path, no_workers))

    def public_dashboard(c):
        c["head_start_ray_commands"] = [s.replace("--dashboard-host=$AVSSL_HEAD_IP", "--dashboard-host=0.0.0.0") for s in c["head_start_ray_commands"]]

    with pytest.raises(ConfigError, match="--dashboard-host=0.0.0.0` binds a service to every interface"):
        check_cluster_file(_broken(tmp_path, public_dashboard))

    def secret(c):
        c["setup_commands"].append("echo 'export MLFLOW_TRACKING_PASSWORD=hunter2' >> ~/.avssl_env")

    with pytest.raises(ConfigError, match="credential is written into the file"):
        check_cluster_file(_broken(tmp_path, secret))

    def no_mlflow(c):
        c["head_start_ray_commands"] = [s for s in c["head_start_ray_commands"] if "head_services.py start" not in s]

    with pytest.raises(ConfigError, match="no MLflow server"):
        check_cluster_file(_broken(tmp_path, no_mlflow))

    out = subprocess.run([str(BIN / "avssl"), "cluster", "check", str(_broken(tmp_path, typo))], capture_output=True, text=True)
    assert out.returncode == 2 and "rejected" in out.stderr and "Traceback" not in out.stderr


def _edit_commands(c: dict, key: str, fn) -> None:
    c[key] = [fn(str(cmd)) for cmd in c[key]]


# Each class of mistake that broke `ray up` / `ray submit` on first contact, on a copy of cluster.yaml.
BROKEN_COPIES = {
    "kill pattern matching its own shell": (
        lambda c: c["head_start_ray_commands"].insert(1, "pkill -f 'mlflow server' || true"),
        r"head_start_ray_commands\[1\]: `pkill -f 'mlflow server'` matches the shell that runs it"),
    "kill pattern via pgrep": (
        lambda c: c["head_start_ray_commands"].insert(1, "kill $(pgrep -f head_services) || true"),
        r"`pgrep -f head_services` matches the shell that runs it"),
    "sync exclusion removing a package folder": (
        lambda c: c.__setitem__("rsync_exclude", [x if x != "/data" else "data" for x in c["rsync_exclude"]]),
        r"rsync_exclude 'data' removes the package folder avssl/data .*'/data'"),
    "sync exclusion by wildcard": (
        lambda c: c["rsync_exclude"].append("*.py"),
        r"rsync_exclude '\*\.py' removes the file avssl/__init__.py"),
    "repository synced where it shadows the package": (
        lambda c: c.__setitem__("file_mounts", {("~/avssl" if k == "~/avssl-src" else k): v for k, v in c["file_mounts"].items()}),
        r"syncs the repository to ~/avssl: `ray submit` runs scripts from the home folder"),
    "avssl installed before the CPU torch": (
        lambda c: c.__setitem__("setup_commands", [x for x in c["setup_commands"] if "torch==" not in x]),
        r"installs avssl before any torch, so pip pulls torch==2\.13\.0 from PyPI onto CPU nodes"),
    "torch from PyPI on CPU nodes": (
        lambda c: _edit_commands(c, "setup_commands", lambda x: x.replace("torch==2.13.0+cpu", "torch==2.13.0")),
        r"`torch==2\.13\.0` pulls a CUDA build from PyPI onto CPU nodes"),
    "torch unpinned": (
        lambda c: _edit_commands(c, "setup_commands", lambda x: x.replace("torch==2.13.0+cpu", "torch")),
        r"`torch` is not an exact version"),
    "torch of another version": (
        lambda c: _edit_commands(c, "setup_commands", lambda x: x.replace("torch==2.13.0+cpu", "torch==2.12.0+cpu")),
        r"avssl pins torch==2\.13\.0"),
    "token file left readable": (
        lambda c: c.__setitem__("setup_commands", [x for x in c["setup_commands"] if "chmod" not in x]),
        r"auth token .* nothing on the head, workers sets it to 600"),
    "head address guessed from the interfaces": (
        lambda c: _edit_commands(c, "setup_commands", lambda x: re.sub(r"\$\(python3 -c .*?\)'\)\}", "$(hostname -I | awk '{print $1}')}", x)),
        r"the head address is guessed from the node's interfaces \(`hostname -I`\)"),
    "head address from nowhere": (
        lambda c: _edit_commands(c, "setup_commands", lambda x: re.sub(r"HEAD=\$\{RAY_HEAD_IP:-.*?'\)\}", "HEAD=$(cat ~/head)", x)),
        r"AVSSL_HEAD_IP does not come from a pinned source"),
    "head address pinned to another address": (
        lambda c: _edit_commands(c, "setup_commands", lambda x: re.sub(r"HEAD=\$\{RAY_HEAD_IP:-.*?'\)\}", "HEAD=10.0.0.99", x).replace('"export AVSSL_HEAD_IP=$HEAD"', "'export AVSSL_HEAD_IP=10.0.0.99'")),
        r"AVSSL_HEAD_IP=10\.0\.0\.99 is not provider\.head_ip \(10\.0\.0\.10\)"),
    "MLflow server left to outlive ray down": (
        lambda c: c["head_start_ray_commands"].append("nohup mlflow server --host $AVSSL_HEAD_IP > mlflow.log 2>&1 &"),
        r"outlives `ray down`"),
}


def test_cluster_check_validates_object_storage(tmp_path):
    """cluster-gpu.yaml keeps corpora, runs and MLflow artifacts in S3: the check wants well-formed
    bucket URIs and a role on every node (never a key); an on-prem cluster an endpoint."""
    def gpu(edit) -> Path:
        cfg = yaml.safe_load((REPO / "cluster-gpu.yaml").read_text())
        edit(cfg)
        out = tmp_path / "gpu.yaml"
        out.write_text(yaml.safe_dump(cfg))
        return out

    with pytest.raises(ConfigError, match=r"node type 'gpu_worker' has no IamInstanceProfile: its processes cannot reach .*AVSSL_STORAGE_PATH=s3://my-avssl-bucket/avssl_runs"):
        check_cluster_file(gpu(lambda c: c["available_node_types"]["gpu_worker"]["node_config"].pop("IamInstanceProfile")))
    with pytest.raises(ConfigError, match=r"AVSSL_BUCKET=s3://My_Bucket is not an S3 URI"):
        check_cluster_file(gpu(lambda c: _edit_commands(c, "setup_commands", lambda x: x.replace("s3://my-avssl-bucket", "s3://My_Bucket"))))
    with pytest.raises(ConfigError, match=r"storage in S3 \(AVSSL_STORAGE_PATH=s3://runs-bucket/avssl\) on a 'local' cluster: export AWS_ENDPOINT_URL"):
        check_cluster_file(_broken(tmp_path, lambda c: _edit_commands(c, "setup_commands", lambda x: x.replace("$AVSSL_SHARED/avssl_runs", "s3://runs-bucket/avssl"))))


@pytest.mark.parametrize("mistake", list(BROKEN_COPIES))
def test_cluster_check_catches(tmp_path, mistake):
    edit, message = BROKEN_COPIES[mistake]
    with pytest.raises(ConfigError, match=message):
        check_cluster_file(_broken(tmp_path, edit))


def test_cluster_check_catches_everything_in_the_file_as_it_was(tmp_path):
    """cluster.yaml before the launcher was tried for real: each of its five defects is reported."""
    old = yaml.safe_load((REPO / "cluster.yaml").read_text())
    old["file_mounts"] = {"~/avssl": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    old["rsync_exclude"] = [".venv", ".git", "data", "mlruns", "__pycache__"]
    old["setup_commands"] = [
        "echo 'export AVSSL_SHARED=/mnt/avssl' > ~/.avssl_env",
        "HEAD=${RAY_HEAD_IP:-$(hostname -I | awk '{print $1}')} && printf '%s\\n' \"export AVSSL_HEAD_IP=$HEAD\" "
        "'export AVSSL_STORAGE_PATH=$AVSSL_SHARED/avssl_runs' \"export MLFLOW_TRACKING_URI=http://$HEAD:5000\" >> ~/.avssl_env",
        "test -d ~/avssl-venv || python3 -m venv ~/avssl-venv",
        "~/avssl-venv/bin/pip install -q -e ~/avssl",
    ]
    old["head_start_ray_commands"] = [
        "source ~/.avssl_env && ~/avssl-venv/bin/ray stop",
        "pkill -f 'mlflow server' || true",
        "source ~/.avssl_env && nohup ~/avssl-venv/bin/mlflow server --host $AVSSL_HEAD_IP --port 5000 > ~/mlflow-server.log 2>&1 &",
        "source ~/.avssl_env && ulimit -n 65536; ~/avssl-venv/bin/ray start --head --node-ip-address=$AVSSL_HEAD_IP --port=6379 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
    ]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError) as err:
        check_cluster_file(path)
    text = str(err.value)
    for expected in ("matches the shell that runs it", "removes the package folder avssl/data", "pulls torch==2.13.0 from PyPI onto CPU nodes",
                     "sets it to 600", "guessed from the node's interfaces", "shadows the installed package", "outlives `ray down`"):
        assert expected in text, (expected, text)


def test_rsync_exclude_semantics():
    from avssl.cluster import rsync_excludes

    assert rsync_excludes("data", "avssl/data", True) and rsync_excludes("data", "data", True)
    assert rsync_excludes("/data", "data", True) and not rsync_excludes("/data", "avssl/data", True)
    assert rsync_excludes("data/", "avssl/data", True) and not rsync_excludes("data/", "avssl/data", False)
    assert rsync_excludes("avssl/da*", "avssl/data", True) and rsync_excludes("avssl/da*", "x/avssl/data", True)
    assert not rsync_excludes("/avssl/da*", "x/avssl/data", True)
    assert rsync_excludes("**/data", "a/b/data", True) and not rsync_excludes("*.yaml", "avssl/config", True)
    assert rsync_excludes("/*.egg-info", "avssl.egg-info", True) and not rsync_excludes("/*.egg-info", "avssl/x.egg-info", True)


# -- loopback only --------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_runtime_listens_on_loopback_only(workdir, synth_corpus):
    """`avssl pretrain` without a cluster starts a local Ray runtime: while it trains with two DDP
    workers, no process of its tree (GCS, raylet, dashboard, agents, workers, the torch process
    group) listens outside 127.0.0.0/8."""
    cmd = [str(BIN / "avssl"), "pretrain", *_tiny_args(workdir, synth_corpus, "loopback", "objective.name=audio", "train.epochs=1",
                                                        "train.num_workers=2", "data.pretrain_fraction=0.5")]
    (workdir / "shared").mkdir()
    log = workdir / "pretrain.log"
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with ListeningSockets([proc.pid]) as sockets:
            rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
    print("\n" + sockets.table())
    assert rc == 0, log.read_text()[-4000:]
    ray_parts = " ".join(sockets.seen.values())
    assert "raylet" in ray_parts and "gcs_server" in ray_parts and "RayTrainWorker" in ray_parts, sockets.table()
    assert not sockets.outside_loopback(), sockets.table()


# -- MLflow server faults --------------------------------------------------------------------------


def test_unreachable_mlflow_server_fails_before_any_compute(workdir, synth_corpus):
    port = free_port()
    t0 = time.time()
    out = subprocess.run(
        [str(BIN / "avssl"), "pretrain", "--config", "tiny", f"data.corpus={synth_corpus}", "run_name=nowhere",
         f"train.storage_path={workdir / 'runs'}", f"tracking.uri=http://127.0.0.1:{port}", "tracking.connect_timeout_s=3",
         "train.probe.enabled=false"],
        capture_output=True, text=True, cwd=workdir, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (workdir / "runs").exists()  # no Ray run, no checkpoint folder
    assert time.time() - t0 < 60


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can stop and start again on the same port."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=(self.root / "server.log").open("ab"), start_new_session=True,
        )
        deadline = time.time() + 300  # MLflow 3's server takes over a minute to start on a busy 2-core machine
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            import os

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.mark.slow
def test_mlflow_server_dropping_mid_run_loses_no_training(workdir, synth_corpus, ray_local):
    """The server dies after the first metrics and comes back later: training never stops, the
    metrics logged while it was down arrive after it returns, and the run ends FINISHED."""
    from avssl.train.trainer import pretrain
    from tests.conftest import tiny_cfg

    server = MlflowServer(workdir)
    server.start()
    outage: dict = {}
    import threading

    over = threading.Event()  # the test ended (passed or failed): the server must not be started again

    def drop_and_restore():
        client = MlflowClient(server.uri)
        deadline = time.time() + 200
        while time.time() < deadline and not over.is_set():
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avssl.run_name` = 'drop'")
                if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                    break
            except Exception:
                pass
            time.sleep(0.2)
        server.stop()
        outage["down_at"] = time.time()
        if over.wait(12):
            return
        outage["up_at"] = time.time()
        server.start()

    t = threading.Thread(target=drop_and_restore, daemon=True)
    t.start()
    try:
        cfg = tiny_cfg(workdir, synth_corpus, "objective.name=audio", "run_name=drop", "train.epochs=4", "train.probe.enabled=false",
                       f"tracking.uri={server.uri}", "tracking.connect_timeout_s=3", "train.log_every_steps=1")
        r = pretrain(cfg)
        t.join(timeout=60)
        assert "down_at" in outage and "up_at" in outage, "the server was never dropped"
        assert r.tracking and r.tracking["closed"], r.tracking
        client = MlflowClient(server.uri)
        run = client.get_run(r.run_id)
        assert run.info.status == "FINISHED"
        losses = client.get_metric_history(r.run_id, "train/loss")
        logged_while_down = [m for m in losses if outage["down_at"] * 1000 <= m.timestamp <= outage["up_at"] * 1000]
        assert logged_while_down, "no metric from the outage reached the server after it came back"
        assert max(m.step for m in losses) == r.metrics["step"]
        assert r.tracking["lost"] == 0
    finally:
        over.set()
        t.join(timeout=320)  # a restart in progress finishes, then is stopped below: no server outlives the test
        server.stop()


def test_metrics_that_never_reach_a_dead_server_are_counted_and_artifacts_kept(tmp_path):
    from avssl.tracking import RunLogger

    logger = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, flush_every_s=0.2, fallback_dir=tmp_path / "unsent")
    for step in range(5):
        logger.metrics({"train/loss": 1.0 / (step + 1), "lr": 0.1}, step)
    artifact = tmp_path / "encoder.pt"
    artifact.write_bytes(b"weights")
    logger.artifact(artifact, "encoder")
    result = logger.close(timeout_s=2)
    assert result["lost"] == 10 and result["sent"] == 0
    assert [Path(p).read_bytes() for p in result["kept_locally"]] == [b"weights"]
    assert Path(result["kept_locally"][0]).parent == tmp_path / "unsent" / "encoder"


# -- a real Ray head: Jobs API ---------------------------------------------------------------------


def _tiny_args(workdir: Path, corpus: Path, run_name: str, *extra: str) -> list[str]:
    return ["--config", "tiny", *TINY_TRAIN, f"data.corpus={corpus}", f"train.storage_path={workdir / 'shared' / 'runs'}",
            f"tracking.uri=sqlite:///{workdir / 'shared' / 'mlflow.db'}", f"run_name={run_name}", "train.probe.enabled=false", *extra]


@pytest.fixture
def ray_head():
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=2, resources={"avssl_tune_driver": 4})
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.cluster
def test_job_submission_to_a_local_head_with_token_auth(workdir, synth_corpus, ray_head):
    (workdir / "shared").mkdir()
    # The head's REST API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(ray_head.request(f"{ray_head.dashboard_url}/api/jobs/", auth=False), timeout=10)
    assert refused.value.code in (401, 403)

    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(REPO),
              "--submission-id", "avssl-tiny-pretrain", "--", "avssl", "pretrain",
              *_tiny_args(workdir, synth_corpus, "job-tiny", "objective.name=audio", "train.epochs=1")]
    env = {k: v for k, v in ray_head.env.items()}
    # The whole cluster (head processes, the job's driver and its Train workers) stays on loopback.
    with ListeningSockets(ray_head._processes) as sockets:
        out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
    assert sockets.seen and not sockets.outside_loopback(), sockets.table()
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "pretrain 'job-tiny' finished" in log
    with urllib.request.urlopen(ray_head.request(f"{ray_head.dashboard_url}/api/jobs/avssl-tiny-pretrain"), timeout=20) as r:
        assert json.loads(r.read())["status"] == "SUCCEEDED"

    # The entry script `ray submit cluster.yaml scripts/cluster_job.py -- ...` runs on the head.
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(REPO), "--",
              "python", "scripts/cluster_job.py", "pretrain", *_tiny_args(workdir, synth_corpus, "entry-tiny", "objective.name=audio", "train.epochs=1")]
    out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    client = MlflowClient(f"sqlite:///{workdir / 'shared' / 'mlflow.db'}")
    exp = [e.experiment_id for e in client.search_experiments()]
    for name in ("job-tiny", "entry-tiny"):
        (run,) = client.search_runs(exp, f"tags.`avssl.run_name` = '{name}'")
        assert run.info.status == "FINISHED"
        assert run.data.metrics["final/steps"] > 0
        assert (workdir / "shared" / "runs" / name / "encoder.pt").is_file()


# -- a real multi-node cluster: placement and faults -----------------------------------------------


@pytest.fixture
def three_nodes():
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=1, resources={"avssl_tune_driver": 4})
        cluster.add_node("a", num_cpus=1)
        cluster.add_node("b", num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(run_dir: Path) -> dict[int, dict]:
    out = {}
    for p in (run_dir / "workers").glob("rank*.json"):
        try:
            info = json.loads(p.read_text())
            out[info["rank"]] = info
        except (OSError, ValueError):
            pass
    return out


def _start_driver(cluster: LocalRayCluster, workdir: Path, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "avssl"), "pretrain", *args], cwd=workdir, env=cluster.client_env(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30"),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
@pytest.mark.cluster
def test_killed_driver_then_killed_node_on_a_three_node_cluster(workdir, synth_corpus, three_nodes):
    """Workers spread over nodes; a SIGKILLed driver's rerun resumes; a node whose raylet is
    SIGKILLed mid-run is replaced by the remaining nodes and the run finishes from its checkpoint."""
    cluster = three_nodes
    (workdir / "shared").mkdir()
    drivers: list[subprocess.Popen] = []
    sockets = ListeningSockets(lambda: [*cluster._processes(), *(d.pid for d in drivers if d.poll() is None)], interval_s=2.0)
    sockets.__enter__()  # what the three nodes, the drivers and their workers listen on
    args = _tiny_args(workdir, synth_corpus, "multinode", "objective.name=audio", "train.epochs=6", "train.num_workers=2",
                      "train.placement_strategy=SPREAD", "train.checkpoint_every_steps=2", "train.max_failures=3")
    run_dir = workdir / "shared" / "runs" / "multinode"

    # 1. Driver killed after a registered checkpoint; the same command resumes.
    driver = _start_driver(cluster, workdir, args, workdir / "driver1.log")
    drivers.append(driver)
    step_at_driver_kill = _wait_for(lambda: max(0, registered_checkpoint_step(run_dir)) >= 2 and registered_checkpoint_step(run_dir), 240, driver, "a checkpoint")
    placed = _wait_for(lambda: len(_workers(run_dir)) == 2 and _workers(run_dir), 60, driver, "both workers")
    assert placed[0]["node_id"] != placed[1]["node_id"], "SPREAD should put the two workers on different nodes"
    import os

    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    # 2. Rerun; once it has resumed and checkpointed again, kill a worker node's raylet.
    driver = _start_driver(cluster, workdir, args, workdir / "driver2.log")
    drivers.append(driver)
    _wait_for(lambda: registered_checkpoint_step(run_dir) >= step_at_driver_kill + 4, 240, driver, "a checkpoint after the rerun")
    victim = _node_hosting_a_worker(cluster, _workers(run_dir), exclude="head")
    step_at_node_kill = registered_checkpoint_step(run_dir)
    cluster.kill_node(victim)
    killed_node_id = victim.node_id
    assert driver.wait(timeout=400) == 0, (workdir / "driver2.log").read_text()[-4000:]

    client = MlflowClient(f"sqlite:///{workdir / 'shared' / 'mlflow.db'}")
    exp = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(exp, "tags.`avssl.run_name` = 'multinode'")
    assert run.info.status == "FINISHED"
    resumed = [v for _, v in _history(client, run.info.run_id, "resumed_from_step")]
    assert len(resumed) == 2, resumed
    assert resumed[0] >= step_at_driver_kill and resumed[1] >= step_at_node_kill, (resumed, step_at_driver_kill, step_at_node_kill)
    final_steps = run.data.metrics["final/steps"]
    losses = _history(client, run.info.run_id, "train/loss")
    assert max(s for s, _ in losses) == final_steps
    after = _workers(run_dir)
    assert killed_node_id not in {w["node_id"] for w in after.values()}
    assert cluster.alive_nodes() == 2
    sockets.__exit__(None, None, None)
    assert sockets.seen and not sockets.outside_loopback(), sockets.table()
    print(f"\nnode kill: driver killed at checkpoint step {step_at_driver_kill}, resumed from {resumed[0]}; "
          f"node '{victim.name}' killed at checkpoint step {step_at_node_kill}, resumed from {resumed[1]}; "
          f"finished at step {final_steps}, MLflow status {run.info.status}")


def _node_hosting_a_worker(cluster: LocalRayCluster, workers: dict[int, dict], exclude: str):
    """A non-head node running a training worker; Ray node ids are matched to our named nodes by
    their custom resource through the State API on the head."""
    with urllib.request.urlopen(cluster.request(f"{cluster.dashboard_url}/api/v0/nodes?limit=100&detail=true"), timeout=20) as r:
        nodes = json.loads(r.read())["data"]["result"]["result"]
    for info in nodes:
        names = [k[len("node_"):] for k in (info.get("resources_total") or {}) if k.startswith("node_")]
        if not names or names[0] == exclude or info.get("state") != "ALIVE":
            continue
        if info["node_id"] in {w["node_id"] for w in workers.values()}:
            node = next(n for n in cluster.nodes if n.name == names[0])
            node.node_id = info["node_id"]
            return node
    raise AssertionError(f"no non-{exclude} node hosts a worker: {workers}")
