"""Pretraining on a real local Ray runtime, tracked in a real MLflow store."""

import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from avssl.errors import DataError, ResourceError
from avssl.models import load_encoder
from avssl.train.trainer import pretrain
from tests.conftest import tiny_cfg
from tests.ray_cluster import registered_checkpoint_step

pytestmark = pytest.mark.slow


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_pretrain_is_tracked_in_mlflow_and_resumes_by_name(workdir, synth_corpus, ray_local):
    cfg = tiny_cfg(workdir, synth_corpus, "objective.name=av", "run_name=av-tiny", "train.epochs=3")
    r = pretrain(cfg)
    client = MlflowClient(r.tracking_uri)
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.name"] == "av" and run.data.params["model.audio_encoder.gru_hidden"] == "16"
    assert {k: run.data.tags[k] for k in ("avssl.objective", "avssl.corpus", "avssl.preset", "avssl.data_fraction")} == {
        "avssl.objective": "av", "avssl.corpus": "synthetic", "avssl.preset": "tiny", "avssl.data_fraction": "1"
    }
    total = history(client, r.run_id, "train/loss")
    audio = history(client, r.run_id, "train/loss/audio")
    assert len(total) >= 3 and [s for s, _ in total] == sorted({s for s, _ in total})
    assert total[-1][1] < total[0][1] and audio[-1][1] < audio[0][1], "pretext losses must fall"
    assert client.get_metric_history(r.run_id, "train/loss/visual") and client.get_metric_history(r.run_id, "val/copy_still/visual")
    for key in ("throughput/samples_per_s", "probe/val_uar", "val/loss/visual", "val/loss/audio/log_f0"):
        assert client.get_metric_history(r.run_id, key), key
    arts = {a.path for a in client.list_artifacts(r.run_id, "frames")} | {a.path for a in client.list_artifacts(r.run_id, "encoder")}
    assert "frames/epoch_001.png" in arts and "encoder/encoder.pt" in arts
    enc, extra = load_encoder(Path(client.download_artifacts(r.run_id, "encoder/encoder.pt", str(workdir))))
    assert extra["objective"] == "av" and extra["step"] == r.metrics["step"]
    state = torch.load(Path(r.checkpoint_path) / "state.pt", weights_only=True)
    assert state["state"]["step"] == r.metrics["step"]

    # The MLflow side users browse: corpora as dataset inputs, system metrics, a registered encoder
    # that evaluation loads by alias, and an experiment that opens on its runs.
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in run.inputs.dataset_inputs}
    assert ("synthetic", "pretraining") in inputs, inputs  # the probe reads the same corpus here: MLflow keeps one record
    assert client.get_metric_history(r.run_id, "system/cpu_utilization_percentage")
    assert r.registered_model == "models:/avssl-encoder-av/1"
    version = client.get_model_version_by_alias("avssl-encoder-av", "newest")
    assert str(version.version) == "1" and str(client.get_model_version_by_alias("avssl-encoder-av", "av-tiny").version) == "1"
    from avssl.evaluate.sources import resolve_source
    from avssl.tracking import Tracker

    tracker = Tracker(r.tracking_uri, cfg.tracking.experiment)
    source = resolve_source("models:/avssl-encoder-av@newest", cfg, tracker)
    assert source.encoder_run_id == r.run_id and source.name == "av-tiny"
    for a, b in zip(source.module.encoder.state_dict().values(), enc.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="registered models: avssl-encoder-av"):
        resolve_source("models:/avssl-encoder-visual@newest", cfg, tracker)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # Same name again: the same MLflow run, and training continues where it stopped.
    steps_before = r.metrics["step"]
    again = pretrain(tiny_cfg(workdir, synth_corpus, "objective.name=av", "run_name=av-tiny", "train.epochs=4"))
    assert again.run_id == r.run_id
    assert again.metrics["step"] > steps_before
    resumed = history(client, r.run_id, "resumed_from_step")
    assert resumed and resumed[-1][1] == steps_before
    runs = client.search_runs([run.info.experiment_id], "tags.`avssl.run_name` = 'av-tiny'")
    assert len(runs) == 1


def test_two_workers_on_one_machine(workdir, synth_corpus, ray_local):
    r = pretrain(tiny_cfg(workdir, synth_corpus, "objective.name=audio", "run_name=two", "train.num_workers=2", "train.epochs=1"))
    client = MlflowClient(r.tracking_uri)
    assert client.get_run(r.run_id).data.tags["avssl.workers"] == "2"
    assert client.get_metric_history(r.run_id, "throughput/epoch_samples_per_s")


def _kill_a_worker_after_checkpoint(run_dir: Path, min_step: int, killed: dict) -> None:
    import json

    deadline = time.time() + 240
    while time.time() < deadline:
        step = registered_checkpoint_step(run_dir)
        record = run_dir / "workers" / "rank0.json"
        if step >= min_step and record.exists():
            pid = json.loads(record.read_text())["pid"]
            killed["step"] = step
            killed["pid"] = pid
            psutil.Process(pid).kill()
            return
        time.sleep(0.05)


def test_killed_worker_resumes_from_its_last_checkpoint(workdir, synth_corpus, ray_local):
    cfg = tiny_cfg(workdir, synth_corpus, "objective.name=audio", "run_name=killed", "train.epochs=3",
                   "train.checkpoint_every_steps=2", "train.max_failures=2", "train.probe.enabled=false")
    killed: dict = {}
    killer = threading.Thread(target=_kill_a_worker_after_checkpoint, args=(workdir / "runs" / "killed", 4, killed), daemon=True)
    killer.start()
    r = pretrain(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    client = MlflowClient(r.tracking_uri)
    resumed = history(client, r.run_id, "resumed_from_step")
    # Training may have registered one more checkpoint between the kill decision and the kill.
    assert len(resumed) == 1 and killed["step"] <= resumed[0][1] <= killed["step"] + 2, (resumed, killed)
    restarts = history(client, r.run_id, "final/restarts")
    assert restarts[-1][1] == 1
    steps_per_epoch = r.metrics["step"] // 3
    assert r.metrics["step"] == 3 * steps_per_epoch  # the whole schedule ran, counting on from the checkpoint
    losses = history(client, r.run_id, "train/loss")
    assert max(s for s, _ in losses) == r.metrics["step"]


def test_bad_requests_fail_before_any_compute(workdir, synth_corpus, tmp_path, ray_local):
    with pytest.raises(ResourceError, match=r"8 workers x 1 CPU = 8 CPUs requested, the Ray cluster has 2"):
        pretrain(tiny_cfg(workdir, synth_corpus, "train.num_workers=8", "run_name=too-big"))
    with pytest.raises(ResourceError, match="use_gpu=true"):
        pretrain(tiny_cfg(workdir, synth_corpus, "train.use_gpu=true", "run_name=gpu"))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avssl.run_name` = 'too-big'")

    from avssl.data.corpus import CorpusWriter
    from tests.test_corpus import _clip

    w = CorpusWriter(tmp_path / "audio_only", "a", shard_size=4)
    for i in range(8):
        w.add(_clip(i, frames=False))
    with pytest.raises(DataError, match="needs video frames; .* is audio-only"):
        pretrain(tiny_cfg(workdir, w.finish(), "objective.name=av"))


def _damaged_copy(corpus, tmp_path, how: str):
    """A copy of the corpus whose first training shard is truncated, or damaged inside an array
    (same size, zip directory intact: only reading the shard finds it)."""
    import shutil

    from avssl.data.corpus import Corpus

    copy = tmp_path / f"damaged-{how}"
    shutil.copytree(corpus, copy)
    shard = copy / sorted({r["shard"] for r in Corpus(copy).select("train")})[0]
    data = shard.read_bytes()
    mid = len(data) // 2
    shard.write_bytes(data[:mid] if how == "truncated" else data[:mid] + bytes(256) + data[mid + 256 :])
    return copy, shard.resolve()


def test_a_truncated_shard_fails_once_before_any_compute(workdir, synth_corpus, tmp_path, capfd):
    copy, shard = _damaged_copy(synth_corpus, tmp_path, "truncated")
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        pretrain(tiny_cfg(workdir, copy, "objective.name=audio", "run_name=truncated", "train.max_failures=2"))
    seconds = time.perf_counter() - t0
    assert str(e.value).startswith(f"{shard}: shard is unreadable or truncated"), str(e.value)
    assert seconds < 5, f"{seconds:.1f} s: the shard check should come before Ray Train starts"
    out = capfd.readouterr()
    assert (out.out + out.err + str(e.value)).count(str(shard)) == 1  # one message, no retried tracebacks
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert not client.search_runs([x.experiment_id for x in client.search_experiments()], "tags.`avssl.run_name` = 'truncated'")


def test_a_data_error_in_a_worker_is_not_retried(workdir, synth_corpus, tmp_path, ray_local):
    """Damage that only reading finds: the worker's DataError stops the run at the first attempt,
    whatever train.max_failures allows (a retry would start another RayTrainWorker)."""
    from ray.util.state import list_actors

    def train_workers() -> int:
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10000, raise_on_missing_output=False))

    copy, shard = _damaged_copy(synth_corpus, tmp_path, "inside")
    before = train_workers()
    with pytest.raises(DataError) as e:
        pretrain(tiny_cfg(workdir, copy, "objective.name=audio", "run_name=damaged", "train.max_failures=2", "train.probe.enabled=false"))
    assert str(e.value).startswith(f"pretraining 'damaged' stopped on a data error: {shard}: shard is unreadable"), str(e.value)
    assert train_workers() == before + 1, "the worker group was restarted after a data error"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([x.experiment_id for x in client.search_experiments()], "tags.`avssl.run_name` = 'damaged'")[0]
    assert run.info.status == "FAILED"


def test_known_ray_noise_is_dropped_and_other_worker_lines_pass(ray_local, capsys):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    noise = ("[2026-11-25 19:27:48,816 E 2972 3029] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
             "'cbef' has constructor arguments in the object store and max_restarts > 0.")
    dispatcher.emit({"lines": [noise, "[avssl] epoch 1/3 step 101: train loss 1.4492"], "is_err": True, "pid": 4242,
                     "ip": "127.0.0.1", "task_name": "RayTrainWorker", "actor_name": "", "job": "01"})
    err = capsys.readouterr().err
    assert "epoch 1/3 step 101" in err and "PreemptionWatcher" not in err, err
