"""`avssl evaluate`: one encoder x one or more downstream tasks, several seeds each, every
evaluation an MLflow run (a child of the encoder's pretraining run when there is one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from avssl.config.loader import flatten
from avssl.config.schema import Config, EvaluateConfig, task_corpus
from avssl.data.corpus import Corpus
from avssl.evaluate.downstream import CLEAN, HeadResult, HeadTrainer, TaskData, load_task_data, test_noise_seed
from avssl.evaluate.features import FeatureStore
from avssl.evaluate.noise import Condition
from avssl.evaluate.sources import FeatureSource, encoder_signature, resolve_source
from avssl.evaluate.tasks import TASKS, Task
from avssl.tracking import Tracker, mlflow_ui_hint


def make_task(name: str, corpus: Corpus) -> Task:
    cls = TASKS.get(name)
    return cls(corpus.label_values(cls.labels[0]) if cls.kind == "classification" else None)


def feature_store(cfg: Config) -> FeatureStore:
    """`evaluate.feature_store`, else `features/` under the runs' storage path (local or object store)."""
    from avssl import storage

    root = cfg.evaluate.feature_store or storage.join(cfg.train.storage_path, "features")
    return FeatureStore(root if storage.is_remote(root) else Path(root).resolve())  # absolute: Ray tasks may run elsewhere


def eval_device(ev: EvaluateConfig):
    """The torch device of evaluation work in this process: a GPU with `evaluate.use_gpu`."""
    import torch

    if not ev.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from avssl.errors import ConfigError

        raise ConfigError("evaluate.use_gpu=true, but this process sees no CUDA GPU (a CUDA build of torch and a GPU are needed); "
                          "set evaluate.use_gpu=false to evaluate on CPUs")
    return torch.device("cuda")


def check_eval_resources(ev: EvaluateConfig, parallel: bool) -> None:
    """Before any compute: a GPU evaluation needs a GPU where it will run (the Ray cluster, or here)."""
    if not ev.use_gpu:
        return
    if not parallel:
        eval_device(ev)
        return
    import ray

    from avssl.errors import ConfigError

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus < ev.gpus_per_task:
        raise ConfigError(f"evaluate.use_gpu=true asks {ev.gpus_per_task:g} GPU per evaluation task, but the Ray cluster has {gpus:g} GPUs; "
                          "set evaluate.use_gpu=false, or start Ray where there is a GPU")


class TaskDataCache:
    """The labelled splits of each task's own corpus (`evaluate.corpora`: rows and targets; audio
    stays in the shards), shared by every method evaluated in one process, with the feature store."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._data: dict[str, TaskData] = {}
        self._corpora: dict[str, Corpus] = {}

    def corpus(self, task_name: str) -> Corpus:
        path = task_corpus(self.cfg, task_name)
        if path not in self._corpora:
            self._corpora[path] = Corpus(path)
        return self._corpora[path]

    def get(self, task_name: str) -> TaskData:
        if task_name not in self._data:
            corpus = self.corpus(task_name)
            self._data[task_name] = load_task_data(corpus, make_task(task_name, corpus), babble_talkers=self.cfg.study.noise.babble_talkers,
                                                   store=feature_store(self.cfg))
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


def job_fraction(job: EvalJob, ev: EvaluateConfig) -> float:
    """The share of the training labels a job's heads train on."""
    return ev.label_fraction if job.label_fraction is None else job.label_fraction


def extract_features(source: FeatureSource, data: TaskData, ev: EvaluateConfig, test_conditions: tuple[Condition, ...]) -> dict:
    """A frozen source's features, once per (split, condition), into the feature store: clean train
    and validation clips and the test clips under every test condition. Returns the sets' handles
    (file locations and clip offsets); every seed's head then reads from these."""
    import torch

    torch.set_num_threads(1)
    trainer = HeadTrainer(source, data, ev, device=eval_device(ev))
    trainer.frozen_features("train", data.train, CLEAN, 0)
    trainer.frozen_features("val", data.val, CLEAN, 0)
    for cond in test_conditions:
        trainer.frozen_features("test", data.test, cond, test_noise_seed(cond))
    return dict(data.cache)


def fit_seeds(source: FeatureSource, data: TaskData, ev: EvaluateConfig, fraction: float, test_conditions: tuple[Condition, ...], train_conditions: tuple[Condition, ...],
              seeds: Optional[list[int]] = None, features: Optional[dict] = None, val_se: bool = False) -> list[HeadResult]:
    """The work of one job (or of one of its seeds); runs in a Ray task or in-process. `features`:
    a frozen source's feature sets (from `extract_features`), shared by all seeds; a label fraction
    reads its clips from the whole training split's set."""
    import torch

    from avssl import storage
    from avssl.evaluate.downstream import fraction_of

    torch.set_num_threads(1)
    if features and not storage.is_remote(data.store.root):
        # The extraction task's sets, where this process can read their files (the same machine, or a
        # shared file system); otherwise the store finds them by key (copying from an object store
        # into this process's scratch folder) or, on a node that cannot see them, recomputes them.
        data.cache.update({k: fs for k, fs in features.items() if fs.path.is_file()})
    trainer = HeadTrainer(source, data, ev, device=eval_device(ev))
    out = []
    for seed in (seeds or ev.seeds):
        train = fraction_of(data.train, fraction, seed)
        out.append(trainer.fit(seed, train, test_conditions, train_conditions, val_se=val_se))
    return out


def _start_job_run(job: EvalJob, cfg: Config, tracker: Tracker, data_cache: TaskDataCache) -> tuple[str, float]:
    from avssl.evaluate.downstream import fraction_of

    data = data_cache.get(job.task)
    ev = cfg.evaluate
    fraction = job_fraction(job, ev)
    source = job.source
    tags = {
        "avssl.kind": "evaluate",
        "avssl.method": source.name,
        "avssl.method_kind": source.kind,
        "avssl.task": job.task,
        "avssl.head": ev.head,
        "avssl.layer": source.layer,
        "avssl.finetune": str(source.trainable and source.kind == "pretrained").lower(),
        "avssl.label_fraction": f"{fraction:g}",
        "avssl.corpus": data.corpus_name,
        "avssl.corpus_path": data.corpus_path,
        "avssl.seeds": ",".join(map(str, ev.seeds)),
        **({"avssl.encoder_arch": encoder_signature(source.encoder_config)} if source.encoder_config is not None else {}),
        **({"avssl.encoder_run_id": source.encoder_run_id} if source.encoder_run_id else {}),
        **source.tags,
        **job.extra_tags,
    }
    params = {f"evaluate.{k}": v for k, v in flatten(ev.model_dump(mode="json")).items()}
    params.update({"source": source.description, "train_clips": len(fraction_of(data.train, fraction, ev.seeds[0])),
                   "test_clips": len(data.test), "corpus": data.corpus_path, **source.architecture()})
    # Parent: the study when there is one, else the encoder's pretraining run.
    parent = job.parent_run_id or source.encoder_run_id
    run_id = tracker.start_run(job.run_name or f"eval-{source.name}-{job.task}", tags, params, parent_id=parent)
    tracker.log_corpus(run_id, data_cache.corpus(job.task), "evaluation")
    return run_id, fraction


PREDICTIONS_FILE = "predictions.npz"


def log_predictions(tracker: Tracker, run_id: str, results: list[HeadResult], tracker_data: TaskData) -> None:
    """Every seed's test predictions under every condition, with the truth, clip ids and speakers:
    what the report's bootstrap intervals and paired differences are computed from."""
    import tempfile

    test = tracker_data.test
    arrays: dict[str, np.ndarray] = {
        "y_true": np.asarray(test.targets), "clip_ids": np.array(test.clip_ids), "speakers": np.array(test.speakers),
    }
    for cond in results[0].predictions:
        arrays[f"pred/{cond}"] = np.stack([r.predictions[cond] for r in results])
        if cond != "clean":  # the SNR every test clip actually got (over its own length)
            from avssl.evaluate.downstream import applied_snrs
            from avssl.evaluate.noise import parse_condition

            arrays[f"snr/{cond}"] = applied_snrs(tracker_data, parse_condition(cond))
    # Per seed: the overfitting gap (best train score - best validation score) and the best validation score.
    arrays["gap"] = np.array([max(r.curves["train_score"]) - max(r.curves["val_score"]) for r in results])
    arrays["best_val"] = np.array([max(r.curves["val_score"]) for r in results])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / PREDICTIONS_FILE
        np.savez_compressed(path, **arrays)
        tracker.log_artifact(run_id, path)


def _log_job(job: EvalJob, run_id: str, results: list[HeadResult], cfg: Config, tracker: Tracker, task: Task, job_data: TaskData) -> EvalSummary:
    from avssl.figures import confusion

    metrics = aggregate(results)
    for cond in results[0].test:
        if cond != "clean":
            metrics.update({f"noise/{cond}/{k[5:]}": v for k, v in aggregate(results, cond).items() if k.startswith("test/")})
    metrics["seconds"] = float(sum(r.seconds for r in results))
    tracker.log_metrics(run_id, metrics)
    log_seed_curves(tracker, run_id, results, cfg.evaluate.seeds)
    tracker.log_figure(run_id, learning_curves_figure(results, cfg.evaluate.seeds, f"{job.source.name} on {job.task}", task.primary), "curves.png")
    log_predictions(tracker, run_id, results, tracker_data=job_data)
    if results[0].confusion is not None:
        cm = sum(r.confusion for r in results)
        tracker.log_figure(run_id, confusion(cm, task.classes, f"{job.source.name}: {job.task}, test, {len(results)} seeds"), "confusion.png")
    tracker.end_run(run_id, "FINISHED")
    return EvalSummary(job.source.name, job.task, run_id, metrics, results)


def training_key(job: EvalJob, fraction: float) -> tuple:
    """What decides how a job's heads train: the source's weights, kind and layer, the task, the
    label fraction and the training noise."""
    s = job.source
    return (s.digest(), s.kind, s.trainable, s.layer, job.task, float(fraction), tuple(job.train_conditions))


def extraction_key(job: EvalJob) -> tuple:
    """A frozen source's features are extracted once per (source, task)."""
    return (job.source.name, job.source.kind, job.source.layer, job.task)


def frozen_extractions(jobs: list[EvalJob]) -> dict[tuple, tuple[EvalJob, list[Condition]]]:
    """Frozen sources' features, once per (source, task) for every condition any of `jobs` tests:
    extraction key -> (a job of that source and task, the conditions)."""
    out: dict[tuple, tuple[EvalJob, list[Condition]]] = {}
    for job in jobs:
        if not job.source.trainable:
            _, conds = out.setdefault(extraction_key(job), (job, []))
            conds += [c for c in job.test_conditions if c not in conds]
    return out


def training_groups(jobs: list[EvalJob], fractions: list[float]) -> list[tuple[list[int], tuple[Condition, ...]]]:
    """Jobs whose heads train identically (the same source weights, task, label fraction and
    training noise: the main table's, the noise study's and the dataset-size study's full-label job
    of one method) train once, tested under the union of their conditions; each job keeps its own
    run and conditions. Returns (job indices, test conditions) per training."""
    groups: dict[tuple, tuple[list[int], list[Condition]]] = {}
    for i, (job, fraction) in enumerate(zip(jobs, fractions)):
        members, conds = groups.setdefault(training_key(job, fraction), ([], []))
        members.append(i)
        conds += [c for c in job.test_conditions if c not in conds]
    return [(members, tuple(conds)) for members, conds in groups.values()]


def restrict(result: HeadResult, conditions: tuple[Condition, ...]) -> HeadResult:
    """A head's result as a job that tested only `conditions` sees it."""
    import dataclasses

    from avssl.evaluate.noise import condition_name

    names = [condition_name(c) for c in conditions]
    return dataclasses.replace(result, test={n: result.test[n] for n in names},
                               predictions={n: result.predictions[n] for n in names if n in result.predictions},
                               confusion=result.confusion if CLEAN in conditions else None)


class HeadPrefetch:
    """Head trainings started before their jobs' MLflow runs exist: a recipe knows its baseline
    jobs (scratch, MFCC, log-mel) before its encoders finish pretraining, and trains their heads
    on the CPUs the pretrainings leave idle (`pump`). `run_jobs` then takes each finished or
    running training (`take`) instead of starting it again; a training never started is left to
    `run_jobs`. The trainings are those `run_jobs` would start: the same groups (identical heads
    train once), functions and arguments."""

    def __init__(self, jobs: list[EvalJob], cfg: Config, data_cache: TaskDataCache):
        from avssl.runtime import ensure_ray

        ensure_ray(cfg.train.ray_address)
        import ray

        self._fit = ray.remote(num_cpus=1, max_retries=1)(fit_seeds)
        self._extract = ray.remote(num_cpus=1, max_retries=1)(extract_features)
        self.cfg, self.data_cache = cfg, data_cache
        # (training key, test conditions, seed) -> submitted training; extraction key -> (conditions, ref)
        self.trainings: dict[tuple, Any] = {}
        self.features: dict[tuple, tuple[tuple[Condition, ...], Any]] = {}
        self._data: dict[str, Any] = {}
        self._queue: list[tuple] = []  # (kind, key, payload) in submission order
        self.started = 0  # head trainings started
        fractions = [job_fraction(job, cfg.evaluate) for job in jobs]
        for key, (job, conds) in frozen_extractions(jobs).items():
            self._queue.append(("extract", key, (job, tuple(conds))))
        for members, test_conditions in training_groups(jobs, fractions):
            job, fraction = jobs[members[0]], fractions[members[0]]
            for seed in cfg.evaluate.seeds:
                self._queue.append(("fit", (training_key(job, fraction), test_conditions, seed), (job, fraction, test_conditions, seed)))

    @property
    def queued(self) -> int:
        """Extractions and trainings not started yet."""
        return len(self._queue)

    def _data_ref(self, task: str):
        import ray

        if task not in self._data:
            self._data[task] = ray.put(self.data_cache.get(task))
        return self._data[task]

    def _running(self) -> int:
        import ray

        refs = list(self.trainings.values()) + [ref for _, ref in self.features.values()]
        if not refs:
            return 0
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(refs) - len(ready)

    def pump(self, free_cpus: float) -> None:
        """Start queued work while fewer tasks run than `free_cpus`; a training that reads
        features waits until they are extracted (a task waiting for them would hold a CPU slot)."""
        import ray

        ev = self.cfg.evaluate
        slots = int(free_cpus) - self._running()
        waiting = []
        while self._queue and slots > 0:
            kind, key, payload = self._queue.pop(0)
            if kind == "extract":
                job, conditions = payload
                ref = self._extract.remote(job.source, self._data_ref(job.task), ev, conditions)
                self.features[key] = (conditions, ref)
            else:
                job, fraction, test_conditions, seed = payload
                features = None
                if not job.source.trainable:
                    _, ref = self.features.get(extraction_key(job), (None, None))
                    if ref is None or not ray.wait([ref], timeout=0)[0]:
                        waiting.append((kind, key, payload))
                        continue
                    features = ref
                self.trainings[key] = self._fit.remote(job.source, self._data_ref(job.task), ev, fraction, test_conditions, job.train_conditions, [seed], features)
                self.started += 1
            slots -= 1
        self._queue[:0] = waiting

    def take(self, key: tuple, test_conditions: tuple[Condition, ...], seed: int):
        """The training of this head if it was started (its Ray reference), else None."""
        return self.trainings.pop((key, test_conditions, seed), None)

    def features_for(self, key: tuple, conditions: list[Condition]):
        """Features extracted here for every one of `conditions`, else None."""
        have, ref = self.features.get(key, ((), None))
        return ref if ref is not None and all(c in have for c in conditions) else None


def run_jobs(jobs: list[EvalJob], cfg: Config, tracker: Tracker, data_cache: TaskDataCache, on_done=None,
             prefetch: Optional[HeadPrefetch] = None) -> list[EvalSummary]:
    """Run evaluation jobs, as Ray tasks when there are several (both cores locally, any node on a
    cluster); MLflow runs are created and logged by this process. Results keep the jobs' order.
    `prefetch`: head trainings already started for some of these jobs."""
    seeds = cfg.evaluate.seeds
    parallel = cfg.evaluate.parallel and len(jobs) * len(seeds) > 1
    if parallel:
        from avssl.runtime import ensure_ray

        ensure_ray(cfg.train.ray_address)
    check_eval_resources(cfg.evaluate, parallel)  # before any run is opened
    runs = [_start_job_run(job, cfg, tracker, data_cache) for job in jobs]
    summaries: list[Optional[EvalSummary]] = [None] * len(jobs)
    groups = training_groups(jobs, [fraction for _, fraction in runs])

    def finish(i: int, results: list[HeadResult]) -> None:
        data = data_cache.get(jobs[i].task)
        summaries[i] = _log_job(jobs[i], runs[i][0], results, cfg, tracker, data.task, data)
        if on_done:
            on_done(summaries[i])

    try:
        if parallel:
            import ray

            gpus = cfg.evaluate.gpus_per_task if cfg.evaluate.use_gpu else 0
            remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(fit_seeds)
            extract = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(extract_features)
            refs = {task: ray.put(data_cache.get(task)) for task in {j.task for j in jobs}}
            # Trainings already under way (prefetched), and the ones to start here.
            pending: dict[Any, tuple[int, int]] = {}
            to_start: list[tuple[int, int]] = []
            for g, (members, test_conditions) in enumerate(groups):
                job, fraction = jobs[members[0]], runs[members[0]][1]
                for k, seed in enumerate(seeds):
                    ref = prefetch.take(training_key(job, fraction), test_conditions, seed) if prefetch else None
                    if ref is not None:
                        pending[ref] = (g, k)
                    else:
                        to_start.append((g, k))
            to_extract = frozen_extractions([jobs[i] for g in dict.fromkeys(g for g, _ in to_start) for i in groups[g][0]])
            feature_refs = {key: (prefetch.features_for(key, conds) if prefetch else None)
                            or extract.remote(job.source, refs[job.task], cfg.evaluate, tuple(conds)) for key, (job, conds) in to_extract.items()}
            per_job: dict[int, dict[int, HeadResult]] = {i: {} for i in range(len(jobs))}
            for g, k in to_start:  # one task per seed: a slow method does not idle a core
                members, test_conditions = groups[g]
                job, fraction = jobs[members[0]], runs[members[0]][1]
                features = feature_refs.get(extraction_key(job))
                ref = remote.remote(job.source, refs[job.task], cfg.evaluate, fraction, test_conditions, job.train_conditions, [seeds[k]], features)
                pending[ref] = (g, k)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                g, k = pending.pop(done[0])
                result = ray.get(done[0])[0]
                for i in groups[g][0]:
                    per_job[i][k] = restrict(result, jobs[i].test_conditions)
                    if len(per_job[i]) == len(seeds):
                        finish(i, [per_job[i][k] for k in range(len(seeds))])
        else:
            for members, test_conditions in groups:
                job, fraction = jobs[members[0]], runs[members[0]][1]
                results = fit_seeds(job.source, data_cache.get(job.task), cfg.evaluate, fraction, test_conditions, job.train_conditions)
                for i in members:
                    finish(i, [restrict(r, jobs[i].test_conditions) for r in results])
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
    tracker = Tracker.from_config(cfg.tracking)
    cache = TaskDataCache(cfg)
    for task in cfg.evaluate.tasks:  # every task's corpus and labels, before any compute
        cache.get(task)
    source = resolve_source(cfg.evaluate.encoder, cfg, tracker, cfg.seed)
    print(f"evaluate {source.name} ({source.description}) on " + ", ".join(f"{t} [{cache.get(t).corpus_name}]" for t in cfg.evaluate.tasks)
          + f"; seeds {cfg.evaluate.seeds}; head {cfg.evaluate.head}, layer {source.layer}")
    rows = run_jobs([EvalJob(source, task) for task in cfg.evaluate.tasks], cfg, tracker, cache, on_done=lambda s: print(format_row(s), flush=True))
    print(f"\nMLflow runs: {', '.join(r.run_id for r in rows)}\n  results: {mlflow_ui_hint(tracker.uri, tracker.experiment_id)}")
    return 0


def summaries_table(summaries: list[EvalSummary]) -> list[dict[str, Any]]:
    return [{"method": s.method, "task": s.task, **s.metrics, "run_id": s.run_id} for s in summaries]
