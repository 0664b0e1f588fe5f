"""Corpora, checkpoints, encoders and MLflow artifacts in object storage, end to end against a
real S3-compatible server (moto in server mode) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from avssl.runtime import free_port
from tests.conftest import TINY_TRAIN

BIN = Path(sys.executable).parent
BUCKET = "avssl"


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on loopback and the standard variables pointing at it (the instance
    metadata service off, so nothing looks for credentials elsewhere)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "avssl-test", "AWS_SECRET_ACCESS_KEY": "avssl-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def _object(key: str) -> bytes | None:
    from avssl import storage

    try:
        return storage.read_bytes(f"s3://{BUCKET}/{key}")
    except FileNotFoundError:
        return None


def _keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_corpus_reads_from_s3_and_damage_is_named(s3, synth_corpus, tmp_path):
    from avssl import storage
    from avssl.data.corpus import Corpus
    from avssl.errors import DataError

    storage.upload(synth_corpus, f"s3://{BUCKET}/corpora/synth")
    local, remote = Corpus(synth_corpus), Corpus(f"s3://{BUCKET}/corpora/synth")
    assert remote.digest() == local.digest() and remote.name == local.name
    row = remote.rows[5]
    a, b = local.load(row), remote.load(row)
    assert (a.audio == b.audio).all() and (a.frames == b.frames).all()
    remote.check_shards(remote.rows)
    assert remote.summary()["clips"] == local.summary()["clips"]
    storage.write_bytes(f"s3://{BUCKET}/corpora/synth/{row['shard']}", b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/corpora/synth/{row['shard']}: shard is unreadable or truncated"):
        Corpus(f"s3://{BUCKET}/corpora/synth").check_shards([row])
    with pytest.raises(DataError, match="is not a prepared corpus"):
        Corpus(f"s3://{BUCKET}/corpora/nothing-here")


@pytest.mark.slow
def test_pretrain_and_evaluate_on_s3_with_a_killed_worker_resuming_from_an_s3_checkpoint(s3, synth_corpus, tmp_path):
    """Synth locally, upload, pretrain reading the corpus from s3:// with checkpoints and MLflow
    artifacts on s3://, SIGKILL the rank-0 worker after an s3 checkpoint, finish from it, then
    evaluate the s3 encoder on the s3 corpus."""
    from mlflow.tracking import MlflowClient

    steps: dict[str, float] = {}
    t = time.perf_counter()
    up = subprocess.run([str(BIN / "avssl"), "corpus", str(synth_corpus), "--upload", f"s3://{BUCKET}/corpora/synth"],
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    steps["upload"] = time.perf_counter() - t
    assert _object("corpora/synth/manifest.jsonl") == (synth_corpus / "manifest.jsonl").read_bytes()

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", "tiny", *TINY_TRAIN, f"data.corpus=s3://{BUCKET}/corpora/synth", f"train.storage_path=s3://{BUCKET}/runs",
            f"tracking.uri={store}", f"tracking.artifact_root=s3://{BUCKET}/mlflow", "run_name=s3run", "objective.name=audio",
            "train.epochs=3", "train.checkpoint_every_steps=2", "train.max_failures=2", "train.probe.enabled=false"]
    env = {**os.environ, **s3, "RAY_ADDRESS": ""}  # its own local runtime, whose workers see the S3 variables
    log = tmp_path / "pretrain.log"
    t = time.perf_counter()
    driver = subprocess.Popen([str(BIN / "avssl"), "pretrain", *args], cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    killed: dict = {}
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not killed:
        snapshot, record = _object("runs/s3run/checkpoint_manager_snapshot.json"), _object("runs/s3run/workers/rank0.json")
        if snapshot and record:
            try:
                step = int(json.loads(snapshot)["latest_checkpoint_result"]["metrics"]["step"])
            except json.JSONDecodeError:  # Ray rewrites its snapshot in place: a read between its HEAD and its GET can come back cut short
                step = -1
            if step >= 4:
                pid = json.loads(record)["pid"]
                assert pid in {p.pid for p in psutil.Process(driver.pid).children(recursive=True)} or psutil.pid_exists(pid)
                psutil.Process(pid).kill()
                killed = {"step": step, "pid": pid, "at": time.perf_counter() - t}
        time.sleep(0.2)
    assert killed, "no s3 checkpoint to kill after:\n" + log.read_text()[-3000:]
    assert driver.wait(timeout=400) == 0, log.read_text()[-4000:]
    steps["pretrain"] = time.perf_counter() - t

    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avssl.run_name` = 's3run'")
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/")
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert len(resumed) == 1 and killed["step"] <= resumed[0] <= killed["step"] + 2, (resumed, killed)
    assert "encoder/encoder.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    assert any(k.startswith("mlflow/") and k.endswith("encoder/encoder.pt") for k in _keys("mlflow/"))  # MLflow's copy, in the bucket
    checkpoints = {k.split("/")[2] for k in _keys("runs/s3run/") if k.split("/")[2].startswith("checkpoint_")}
    assert checkpoints and _object("runs/s3run/encoder.pt"), _keys("runs/s3run/")

    # Evaluation from s3, as a user runs it: the encoder file and the downstream corpus both in the
    # bucket; two seeds, so one Ray task extracts the features into the bucket's feature store and
    # the seeds' tasks read them back from there.
    t = time.perf_counter()
    ev = subprocess.run([str(BIN / "avssl"), "evaluate", "--config", "tiny", *TINY_TRAIN, f"tracking.uri={store}",
                         f"evaluate.encoder=s3://{BUCKET}/runs/s3run/encoder.pt", f"evaluate.corpora.emotion=s3://{BUCKET}/corpora/synth",
                         "evaluate.seeds=[0,1]", "evaluate.epochs=2", "evaluate.tasks=[emotion]", f"train.storage_path=s3://{BUCKET}/runs"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    (eval_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avssl.kind` = 'evaluate'")
    assert eval_run.info.status == "FINISHED" and 0.0 <= eval_run.data.metrics["test/uar_mean"] <= 1.0
    assert eval_run.data.tags["avssl.encoder_path"].startswith("s3://") and eval_run.data.tags["avssl.seeds"] == "0,1"
    stored = _keys("runs/features/")  # the frozen features went to the bucket's feature store: data and index per split
    assert len([k for k in stored if k.endswith(".f32")]) == 3 and len([k for k in stored if k.endswith(".npz")]) == 3, stored
    steps["evaluate"] = time.perf_counter() - t
    print(f"\ns3 end to end: upload {steps['upload']:.1f} s; pretrain {steps['pretrain']:.1f} s with rank 0 killed at s3 checkpoint "
          f"step {killed['step']} ({killed['at']:.1f} s in), resumed from step {resumed[0]:.0f}; evaluate {steps['evaluate']:.1f} s; "
          f"{len(checkpoints)} checkpoints kept in s3://{BUCKET}/runs/s3run")


@pytest.mark.slow
def test_a_search_keeps_its_state_trials_and_encoders_on_s3(s3, synth_corpus, tmp_path):
    """`avssl tune` with train.storage_path on s3://: Tune's experiment state, each trial's
    checkpoints and encoder in the bucket, the best encoder registered from there."""
    import yaml
    from mlflow.tracking import MlflowClient

    from avssl import storage

    storage.upload(synth_corpus, f"s3://{BUCKET}/corpora/synth")
    space = tmp_path / "s3grid.yaml"
    space.write_text(yaml.safe_dump({
        "name": "s3grid", "metric": "probe/val_uar", "base": {"config": "tiny", "overrides": [*TINY_TRAIN, "objective.name=audio", "train.epochs=1"]},
        "space": {"train.lr": {"grid": [1e-3, 2e-3]}}, "trial": {"workers": 1, "cpus_per_worker": 1}, "max_concurrent_trials": 2}))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, **s3, "RAY_ADDRESS": ""}
    r = subprocess.run([str(BIN / "avssl"), "tune", str(space), f"data.corpus=s3://{BUCKET}/corpora/synth", f"train.storage_path=s3://{BUCKET}/runs",
                        f"tracking.uri={store}", f"train.probe.corpus=s3://{BUCKET}/corpora/synth"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    keys = _keys("runs/searches/s3grid/")
    assert any(k.split("/")[-1].startswith("experiment_state") for k in keys), keys
    encoders = [k for k in keys if k.endswith("/encoder.pt")]
    assert len(encoders) == 2, keys
    client = MlflowClient(store)
    trials = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avssl.kind` = 'trial'")
    assert len(trials) == 2 and all(t.data.tags["avssl.encoder_path"].startswith(f"s3://{BUCKET}/runs/searches/s3grid/") for t in trials)
    assert "registered as models:/" in r.stdout, r.stdout[-2000:]
