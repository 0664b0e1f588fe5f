"""`avssl pretrain`: build and run the Ray Train `TorchTrainer`, tracked as one MLflow run.

Rerunning with the same `run_name` (and `train.storage_path`) resumes: Ray finds the run's
snapshot and the loop restarts from the latest checkpoint; the same MLflow run is reopened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from avssl import storage
from avssl.config.loader import flatten
from avssl.config.schema import Config
from avssl.data.corpus import Corpus
from avssl.errors import AvsslError, DataError
from avssl.objectives import build_objective
from avssl.runtime import check_resources, ensure_ray
from avssl.tracking import Tracker, mlflow_ui_hint
from avssl.train.loop import ENCODER_FILE, TRACKING_STATUS_FILE, train_loop_per_worker


@dataclass
class PretrainResult:
    run_id: str
    run_name: str
    metrics: dict[str, Any]
    checkpoint_path: Optional[str]
    encoder_path: str
    tracking_uri: str
    seconds: float
    tracking: Optional[dict[str, Any]] = None
    registered_model: Optional[str] = None


def run_tags(cfg: Config, corpus: Corpus) -> dict[str, str]:
    return {
        "avssl.kind": "pretrain",
        "avssl.run_name": str(cfg.run_name),
        "avssl.objective": cfg.objective.name,
        "avssl.corpus": corpus.name,
        "avssl.preset": cfg.preset,
        "avssl.data_fraction": f"{cfg.data.pretrain_fraction:g}",
        "avssl.workers": str(cfg.train.num_workers),
    }


def data_error_of(error: BaseException) -> Optional[DataError]:
    """The `DataError` behind a failed `fit()` (raised on a worker, or stopped on by the
    controller through `StopOnDataError`), if that is what it was."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        stack.extend([getattr(e, "controller_failure", None), e.__cause__, e.__context__])
        stack.extend((getattr(e, "worker_failures", None) or {}).values())
    return None


def _stop_on_data_error_callback():
    from ray.train import UserCallback

    class StopOnDataError(UserCallback):
        """Data errors are deterministic: a worker that raised `DataError` fails the run at once.

        Ray Train's failure policy retries any worker error up to `max_failures` times; an error
        raised from this controller hook is a controller error, which it does not retry."""

        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                if isinstance(worker_exceptions[rank], DataError):
                    raise worker_exceptions[rank]

    return StopOnDataError()


def build_trainer(cfg: Config, loop_config: dict[str, Any], callbacks: Optional[list] = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers: Any = cfg.train.num_workers
    if cfg.train.elastic_min_workers:
        workers = (cfg.train.elastic_min_workers, cfg.train.num_workers)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.train.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="loss", checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[*(callbacks or []), _stop_on_data_error_callback()],
            logging_config=LoggingConfig(log_level=cfg.train.log_level),
        ),
    )


def prepare_run(cfg: Config, parent_run_id: Optional[str] = None, extra_tags: Optional[dict[str, str]] = None) -> tuple[Config, Corpus, Tracker, str, bool]:
    """Everything that can fail cheaply, in order, before any compute: corpus, objective vs
    corpus, tracking store, Ray resources; then the MLflow run is created or reopened."""
    corpus = Corpus(cfg.data.corpus)
    objective = build_objective(cfg.objective)
    if objective.visual and not corpus.has_video:
        raise DataError(f"objective '{cfg.objective.name}' needs video frames; corpus {corpus.root} is audio-only (use objective.name=audio)")
    corpus.check_shards(corpus.select("train") + corpus.select("val"))  # the splits pretraining reads
    from avssl.train.probe import check_probe

    check_probe(cfg)  # the probe's own labelled corpus: a probe that cannot run is an error, not a silent gap
    if not cfg.run_name:
        cfg = cfg.model_copy(update={"run_name": f"{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"})
    tracker = Tracker.from_config(cfg.tracking)
    ensure_ray(cfg.train.ray_address)
    check_resources(cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu, cfg.train.gpus_per_worker, cfg.train.elastic_min_workers)
    key = {"avssl.kind": "pretrain", "avssl.run_name": str(cfg.run_name)}
    run_id, reopened = tracker.find_or_start_run(str(cfg.run_name), key, params=flatten(cfg.model_dump(mode="json")), parent_id=parent_run_id)
    tracker.set_tags(run_id, {**run_tags(cfg, corpus), **(extra_tags or {})})
    if not reopened:
        log_corpora(tracker, run_id, cfg, corpus)
    return cfg, corpus, tracker, run_id, reopened


def log_corpora(tracker: Tracker, run_id: str, cfg: Config, corpus: Corpus) -> None:
    """The pretraining pool and the probe's labelled corpus, as the run's MLflow dataset inputs."""
    from avssl.config.schema import probe_corpus

    tracker.log_corpus(run_id, corpus, "pretraining")
    if cfg.train.probe.enabled:
        tracker.log_corpus(run_id, Corpus(probe_corpus(cfg)), "probe")


def register(tracker: Tracker, cfg: Config, run_id: str, run_dir: storage.Location, aliases: list[str]) -> Optional[str]:
    """The encoder as a registered model (`tracking.model_name`), aliases moved to it. A registry
    that refuses leaves the encoder a plain run artifact, with a warning: training is not lost."""
    if not cfg.tracking.register_models:
        return None
    name = cfg.tracking.model_name.format(objective=cfg.objective.name)
    try:
        local = storage.fetch(storage.join(run_dir, ENCODER_FILE))
        if local is None:  # storage not shared with this machine: the run's artifact
            local = tracker.download(run_id, f"encoder/{ENCODER_FILE}")
        version = tracker.register_encoder(run_id, local, name, aliases)
    except Exception as e:
        print(f"WARNING: encoder of run {run_id} not registered in the MLflow Model Registry ({type(e).__name__}: {e}); "
              f"it stays loadable by run id", flush=True)
        return None
    uri = f"models:/{name}/{version}"
    tracker.set_tags(run_id, {"avssl.registered_model": uri})
    return uri


def pretrain(cfg: Config, parent_run_id: Optional[str] = None, extra_tags: Optional[dict[str, str]] = None) -> PretrainResult:
    t0 = time.perf_counter()
    cfg, corpus, tracker, run_id, reopened = prepare_run(cfg, parent_run_id, extra_tags)
    run_dir = storage.join(cfg.train.storage_path, str(cfg.run_name))
    print(f"pretrain '{cfg.run_name}': objective {cfg.objective.name}, corpus {corpus.folder_name} ({corpus.name}), "
          f"{cfg.train.num_workers} worker(s), MLflow run {run_id}" + (" (resuming)" if reopened else ""), flush=True)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "tracking_uri": tracker.uri,
        "run_id": run_id,
        "encoder_dir": str(run_dir),
    }
    trainer = build_trainer(cfg, loop_config)
    try:
        result = trainer.fit()
    except Exception as e:
        try:
            tracker.end_run(run_id, "FAILED")
        except Exception:  # the tracking server is down too; the error below matters more
            pass
        data_error = data_error_of(e)
        if data_error is not None:  # deterministic: rerunning cannot help, the data must be fixed
            raise DataError(f"pretraining '{cfg.run_name}' stopped on a data error: {data_error}") from None
        cause = getattr(e, "__cause__", None) or e
        raise AvsslError(f"pretraining '{cfg.run_name}' failed: {type(cause).__name__}: {cause}\n"
                         f"checkpoints written so far are kept in {run_dir}; rerun the same command to resume") from None
    registered = register(tracker, cfg, run_id, run_dir, ["newest", str(cfg.run_name)])
    tracking = _finish_tracking(tracker, run_id, run_dir, cfg.tracking.connect_timeout_s)
    return PretrainResult(
        run_id=run_id,
        run_name=str(cfg.run_name),
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        encoder_path=str(storage.join(run_dir, ENCODER_FILE)),
        tracking_uri=tracker.uri,
        seconds=time.perf_counter() - t0,
        tracking=tracking,
        registered_model=registered,
    )


def _finish_tracking(tracker: Tracker, run_id: str, run_dir: storage.Location, timeout_s: float) -> dict[str, Any]:
    """Close the MLflow run, retrying a server that dropped mid-run; never lose the trained result
    over it. Returns what rank 0 could send ({sent, lost, kept_locally}) plus `closed`."""
    import json

    try:
        status = json.loads(storage.read_bytes(storage.join(run_dir, TRACKING_STATUS_FILE)))
    except (OSError, ValueError):
        status = {}
    deadline = time.time() + max(3 * timeout_s, 10.0)
    while True:
        try:
            tracker.end_run(run_id, "FINISHED")
            status["closed"] = True
            break
        except Exception as e:  # the server is down: retry, then report instead of crashing
            if time.time() > deadline:
                status["closed"] = False
                status["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                break
            time.sleep(2.0)
    if not status["closed"] or status.get("lost") or status.get("kept_locally"):
        print(f"WARNING: MLflow at {tracker.uri} did not take everything: {status.get('lost', '?')} metric values lost, "
              f"artifacts kept locally: {status.get('kept_locally') or 'none'}"
              + ("" if status["closed"] else f"; run {run_id} could not be closed ({status.get('error')}) and stays RUNNING")
              + f". Training itself finished; checkpoints and the encoder are in {run_dir}.", flush=True)
    return status


def pretrain_command(cfg: Config) -> int:
    r = pretrain(cfg)
    m = r.metrics
    print(f"\npretrain '{r.run_name}' finished in {r.seconds:.0f} s: step {m.get('step')}, train loss {m.get('loss', float('nan')):.4f}, "
          f"val loss {m.get('val/loss', float('nan')):.4f}")
    print(f"  MLflow run id: {r.run_id}  (evaluate it with: avssl evaluate evaluate.encoder={r.run_id})")
    print(f"  encoder: {r.encoder_path}" + (f"  (registered: {r.registered_model})" if r.registered_model else ""))
    print(f"  checkpoint: {r.checkpoint_path}")
    print(f"  results: {mlflow_ui_hint(r.tracking_uri)}")
    return 0


def _pretrain_remote(cfg_tree: dict[str, Any], parent_run_id: Optional[str] = None, extra_tags: Optional[dict[str, str]] = None) -> PretrainResult:
    from avssl.config.loader import config_from_dict

    return pretrain(config_from_dict(cfg_tree), parent_run_id, extra_tags)


def pretrain_many(cfgs: list[Config], on_done=None, parent_run_id: Optional[str] = None, extra_tags: Optional[dict[str, str]] = None,
                  between: Optional[Callable[[float], None]] = None) -> list[PretrainResult]:
    """Several pretrainings at once, as many as the cluster's CPUs hold (each `TorchTrainer` is
    driven from a zero-CPU Ray task, the way Tune drives trials). Results keep the input order.
    `between(free_cpus)` is called about every second with the CPUs no pretraining holds or
    waits for (other work may use them meanwhile)."""
    import ray

    if len(cfgs) <= 1 and between is None:
        out = [pretrain(c, parent_run_id, extra_tags) for c in cfgs]
        for r in out:
            if on_done:
                on_done(r)
        return out
    if not cfgs:
        return []
    first = cfgs[0].train
    ensure_ray(first.ray_address)
    for c in cfgs:
        check_resources(c.train.num_workers, c.train.cpus_per_worker, c.train.use_gpu, c.train.gpus_per_worker, c.train.elastic_min_workers)
    per_run = max(c.train.num_workers * c.train.cpus_per_worker for c in cfgs)
    cpus = ray.cluster_resources().get("CPU", 1)
    slots = max(1, int(cpus // per_run))
    drive = ray.remote(num_cpus=0, max_retries=0)(_pretrain_remote)
    results: list[Optional[PretrainResult]] = [None] * len(cfgs)
    queue = list(enumerate(cfgs))
    running: dict[Any, int] = {}
    while queue or running:
        while queue and len(running) < slots:
            i, c = queue.pop(0)
            running[drive.remote(c.model_dump(mode="json"), parent_run_id, extra_tags)] = i
        if between is not None:
            between(max(0.0, cpus - per_run * (len(running) + len(queue))))
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0 if between is not None else None)
        if not done:
            continue
        i = running.pop(done[0])
        try:
            results[i] = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, AvsslError):
                raise cause from None
            raise AvsslError(f"pretraining '{cfgs[i].run_name}' failed: {cause}") from None
        if on_done:
            on_done(results[i])
    return [r for r in results if r is not None]
