"""`avssl evaluate`: one encoder x one or more downstream tasks, several seeds each, every
evaluation an MLflow run (a child of the encoder's pretraining run when there is one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from avssl.config.loader import flatten
from avssl.config.schema import Config, EvaluateConfig
from avssl.data.corpus import Corpus
from avssl.evaluate.downstream import CLEAN, HeadResult, HeadTrainer, TaskData, load_task_data
from avssl.evaluate.noise import Condition
from avssl.evaluate.sources import FeatureSource, resolve_source
from avssl.evaluate.tasks import TASKS, Task
from avssl.tracking import Tracker, mlflow_ui_hint


def make_task(name: str, corpus: Corpus) -> Task:
    cls = TASKS.get(name)
    return cls(corpus.label_values(cls.labels[0]) if cls.kind == "classification" else None)


class TaskDataCache:
    """Decoded labelled splits, shared by every method evaluated in one process."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self._data: dict[str, TaskData] = {}

    def get(self, task_name: str) -> TaskData:
        if task_name not in self._data:
            self._data[task_name] = load_task_data(self.corpus, make_task(task_name, self.corpus))
        return self._data[task_name]


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array(values, dtype=float)
    return float(np.nanmean(arr)), float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0


def aggregate(results: list[HeadResult], condition: str = "clean") -> dict[str, float]:
    """test/<metric>_mean and _std over seeds, plus val and best-epoch summaries."""
    out: dict[str, float] = {}
    for metric in results[0].test[condition]:
        m, s = mean_std([r.test[condition][metric] for r in results])
        out[f"test/{metric}_mean"], out[f"test/{metric}_std"] = m, s
    for metric in results[0].val:
        out[f"val/{metric}_mean"], _ = mean_std([r.val[metric] for r in results])
    out["best_epoch_mean"], _ = mean_std([r.best_epoch for r in results])
    return out


def log_seed_curves(tracker: Tracker, run_id: str, results: list[HeadResult], seeds: list[int], prefix: str = "") -> None:
    for seed, r in zip(seeds, results):
        for name, values in r.curves.items():
            for epoch, v in enumerate(values, 1):
                tracker.log_metrics(run_id, {f"{prefix}seed{seed}/{name}": v}, step=epoch)
        for cond, metrics in r.test.items():
            tracker.log_metrics(run_id, {f"{prefix}seed{seed}/test/{cond}/{k}": v for k, v in metrics.items()}, step=0)


def learning_curves_figure(results: list[HeadResult], seeds: list[int], title: str, metric: str):
    from avssl.figures import curves

    series = {}
    for seed, r in zip(seeds, results):
        series[f"train (seed {seed})"] = r.curves["train_score"]
        series[f"val (seed {seed})"] = r.curves["val_score"]
    return curves(series, "epoch", metric, title)


@dataclass
class EvalSummary:
    method: str
    task: str
    run_id: str
    metrics: dict[str, float]
    results: list[HeadResult]

    @property
    def primary(self) -> str:
        return TASKS.get(self.task).primary


@dataclass
class EvalJob:
    """One evaluation: a source on a task (at a label fraction, under noise conditions), all seeds."""

    source: FeatureSource
    task: str
    label_fraction: Optional[float] = None
    test_conditions: tuple[Condition, ...] = (CLEAN,)
    train_conditions: tuple[Condition, ...] = ()
    parent_run_id: Optional[str] = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    run_name: Optional[str] = None


def fit_seeds(source: FeatureSource, data: TaskData, ev: EvaluateConfig, fraction: float, test_conditions: tuple[Condition, ...], train_conditions: tuple[Condition, ...], seeds: Optional[list[int]] = None) -> list[HeadResult]:
    """The work of one job (or of one of its seeds); runs in a Ray task or in-process."""
    import torch

    from avssl.evaluate.downstream import fraction_of

    torch.set_num_threads(1)
    trainer = HeadTrainer(source, data, ev)
    return [trainer.fit(seed, fraction_of(data.train, fraction, seed), test_conditions, train_conditions) for seed in (seeds or ev.seeds)]


def _start_job_run(job: EvalJob, cfg: Config, tracker: Tracker, data_cache: TaskDataCache) -> tuple[str, float]:
    from avssl.evaluate.downstream import fraction_of

    data = data_cache.get(job.task)
    ev = cfg.evaluate
    fraction = ev.label_fraction if job.label_fraction is None else job.label_fraction
    source = job.source
    tags = {
        "avssl.kind": "evaluate",
        "avssl.method": source.name,
        "avssl.method_kind": source.kind,
        "avssl.task": job.task,
        "avssl.head": ev.head,
        "avssl.finetune": str(source.trainable and source.kind == "pretrained").lower(),
        "avssl.label_fraction": f"{fraction:g}",
        "avssl.corpus": data_cache.corpus.name,
        "avssl.seeds": ",".join(map(str, ev.seeds)),
        **({"avssl.encoder_run_id": source.encoder_run_id} if source.encoder_run_id else {}),
        **source.tags,
        **job.extra_tags,
    }
    params = {f"evaluate.{k}": v for k, v in flatten(ev.model_dump(mode="json")).items()}
    params.update({"source": source.description, "train_clips": len(fraction_of(data.train, fraction, ev.seeds[0]))})
    # Parent: the study when there is one, else the encoder's pretraining run.
    parent = job.parent_run_id or source.encoder_run_id
    return tracker.start_run(job.run_name or f"eval-{source.name}-{job.task}", tags, params, parent_id=parent), fraction


def _log_job(job: EvalJob, run_id: str, results: list[HeadResult], cfg: Config, tracker: Tracker, task: Task) -> EvalSummary:
    from avssl.figures import confusion

    metrics = aggregate(results)
    for cond in results[0].test:
        if cond != "clean":
            metrics.update({f"noise/{cond}/{k[5:]}": v for k, v in aggregate(results, cond).items() if k.startswith("test/")})
    metrics["seconds"] = float(sum(r.seconds for r in results))
    tracker.log_metrics(run_id, metrics)
    log_seed_curves(tracker, run_id, results, cfg.evaluate.seeds)
    tracker.log_figure(run_id, learning_curves_figure(results, cfg.evaluate.seeds, f"{job.source.name} on {job.task}", task.primary), "curves.png")
    if results[0].confusion is not None:
        cm = sum(r.confusion for r in results)
        tracker.log_figure(run_id, confusion(cm, task.classes, f"{job.source.name}: {job.task}, test, {len(results)} seeds"), "confusion.png")
    tracker.end_run(run_id, "FINISHED")
    return EvalSummary(job.source.name, job.task, run_id, metrics, results)


def run_jobs(jobs: list[EvalJob], cfg: Config, tracker: Tracker, data_cache: TaskDataCache, on_done=None) -> list[EvalSummary]:
    """Run evaluation jobs, as Ray tasks when there are several (both cores locally, any node on a
    cluster); MLflow runs are created and logged by this process. Results keep the jobs' order."""
    runs = [_start_job_run(job, cfg, tracker, data_cache) for job in jobs]
    summaries: list[Optional[EvalSummary]] = [None] * len(jobs)
    seeds = cfg.evaluate.seeds
    try:
        if cfg.evaluate.parallel and len(jobs) * len(seeds) > 1:
            import ray

            from avssl.runtime import ensure_ray

            ensure_ray(cfg.train.ray_address)
            remote = ray.remote(num_cpus=1, max_retries=1)(fit_seeds)
            refs = {task: ray.put(data_cache.get(task)) for task in {j.task for j in jobs}}
            pending: dict[Any, tuple[int, int]] = {}
            per_job: dict[int, dict[int, HeadResult]] = {i: {} for i in range(len(jobs))}
            for i, (job, (_, fraction)) in enumerate(zip(jobs, runs)):
                for k, seed in enumerate(seeds):  # one task per seed: a slow method does not idle a core
                    ref = remote.remote(job.source, refs[job.task], cfg.evaluate, fraction, job.test_conditions, job.train_conditions, [seed])
                    pending[ref] = (i, k)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i, k = pending.pop(done[0])
                per_job[i][k] = ray.get(done[0])[0]
                if len(per_job[i]) == len(seeds):
                    results = [per_job[i][k] for k in range(len(seeds))]
                    summaries[i] = _log_job(jobs[i], runs[i][0], results, cfg, tracker, data_cache.get(jobs[i].task).task)
                    if on_done:
                        on_done(summaries[i])
        else:
            for i, (job, (run_id, fraction)) in enumerate(zip(jobs, runs)):
                results = fit_seeds(job.source, data_cache.get(job.task), cfg.evaluate, fraction, job.test_conditions, job.train_conditions)
                summaries[i] = _log_job(job, run_id, results, cfg, tracker, data_cache.get(job.task).task)
                if on_done:
                    on_done(summaries[i])
    except BaseException:
        for i, s in enumerate(summaries):
            if s is None:
                tracker.end_run(runs[i][0], "FAILED")
        raise
    return [s for s in summaries if s is not None]


def evaluate_source(source: FeatureSource, task_name: str, cfg: Config, tracker: Tracker, data_cache: TaskDataCache, **job_fields: Any) -> EvalSummary:
    """One job, in this process."""
    return run_jobs([EvalJob(source, task_name, **job_fields)], cfg, tracker, data_cache)[0]


def format_row(s: EvalSummary) -> str:
    p = s.primary
    m, sd = s.metrics[f"test/{p}_mean"], s.metrics[f"test/{p}_std"]
    return f"  {s.method:<22} {s.task:<8} {p:<9} {m:.3f} +- {sd:.3f}   (val {s.metrics.get(f'val/{p}_mean', float('nan')):.3f}, best epoch {s.metrics['best_epoch_mean']:.1f})"


def evaluate_command(cfg: Config) -> int:
    from avssl.errors import ConfigError

    if not cfg.evaluate.encoder:
        raise ConfigError("evaluate.encoder is required: an MLflow run id, a pretraining run name, an encoder file, or scratch / mfcc / logmel")
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root, timeout=cfg.tracking.connect_timeout_s)
    corpus = Corpus(cfg.data.corpus)
    source = resolve_source(cfg.evaluate.encoder, cfg, tracker, cfg.seed)
    cache = TaskDataCache(corpus)
    print(f"evaluate {source.name} ({source.description}) on {', '.join(cfg.evaluate.tasks)}; seeds {cfg.evaluate.seeds}")
    rows = run_jobs([EvalJob(source, task) for task in cfg.evaluate.tasks], cfg, tracker, cache, on_done=lambda s: print(format_row(s), flush=True))
    print(f"\nMLflow runs: {', '.join(r.run_id for r in rows)}\n  results: {mlflow_ui_hint(tracker.uri)}")
    return 0


def summaries_table(summaries: list[EvalSummary]) -> list[dict[str, Any]]:
    return [{"method": s.method, "task": s.task, **s.metrics, "run_id": s.run_id} for s in summaries]
