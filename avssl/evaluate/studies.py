"""The paper's studies, each one MLflow parent run with a child run per method (and fraction):

- noise: the same heads tested with white and babble noise at several SNRs (optionally trained
  with noise too); a figure of the metric vs SNR per method.
- datasize: heads trained on fractions of the labelled data; train/validation curves, the
  overfitting gap (best train score minus best validation score) and how early validation peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from avssl.config.loader import flatten
from avssl.config.schema import Config
from avssl.evaluate.downstream import CLEAN
from avssl.evaluate.noise import Condition, condition_name, parse_snr
from avssl.evaluate.runner import EvalJob, EvalSummary, HeadPrefetch, TaskDataCache, mean_std, run_jobs
from avssl.evaluate.sources import FeatureSource, resolve_sources
from avssl.evaluate.tasks import TASKS
from avssl.tracking import Tracker, mlflow_ui_hint


def noise_conditions(cfg: Config) -> list[Condition]:
    snrs = [parse_snr(s) for s in cfg.study.noise.snrs]
    out: list[Condition] = [CLEAN] if None in snrs else []
    out += [(kind, snr) for kind in cfg.study.noise.types for snr in snrs if snr is not None]
    return out


def _start_study(tracker: Tracker, cfg: Config, study: str, cache: TaskDataCache, parent_run_id: Optional[str], tags: Optional[dict[str, str]] = None) -> str:
    """The study's MLflow run; inside a recipe (`tags` carrying its id) an earlier run of the same study is reopened."""
    data = cache.get(cfg.study.task)  # the task's corpus and labels, before any compute
    all_tags = {"avssl.kind": "study", "avssl.study": study, "avssl.task": cfg.study.task, "avssl.corpus": data.corpus_name,
                "avssl.corpus_path": data.corpus_path, "avssl.head": cfg.evaluate.head, "avssl.layer": cfg.evaluate.layer,
                "avssl.finetune": str(cfg.evaluate.finetune).lower(), **(tags or {})}
    params = {f"study.{k}": v for k, v in flatten(cfg.study.model_dump(mode="json")).items()}
    params.update({f"evaluate.{k}": v for k, v in flatten(cfg.evaluate.model_dump(mode="json")).items()})
    if tags:
        key = {"avssl.kind": "study", "avssl.study": study, **tags}
        run_id, _ = tracker.find_or_start_run(f"study-{study}-{cfg.study.task}", key, params, parent_id=parent_run_id)
        tracker.set_tags(run_id, all_tags)
        return run_id
    return tracker.start_run(f"study-{study}-{cfg.study.task}", all_tags, params, parent_id=parent_run_id)


@dataclass
class StudyPlan:
    """A study's MLflow parent run and the evaluation jobs it needs; `finish` turns their results
    into tables and figures. Planning apart from running lets several studies share one batch of
    Ray tasks."""

    kind: str
    run_id: str
    jobs: list[EvalJob]
    cfg: Config
    tracker: Tracker

    def finish(self, summaries: list[EvalSummary]) -> dict[str, Any]:
        try:
            if not summaries:  # every job finished in an earlier run (a resumed recipe)
                self.tracker.end_run(self.run_id, "FINISHED")
                return {"run_id": self.run_id, "table": {}, "metric": TASKS.get(self.cfg.study.task).primary, "fractions": self.cfg.study.datasize.fractions}
            out = _finish_noise(self, summaries) if self.kind == "noise" else _finish_datasize(self, summaries)
            self.tracker.end_run(self.run_id, "FINISHED")
        except BaseException:
            self.tracker.end_run(self.run_id, "FAILED")
            raise
        return {"run_id": self.run_id, **out}


def noise_jobs(cfg: Config, sources: list[FeatureSource], study_id: Optional[str] = None, tags: Optional[dict[str, str]] = None,
               done: frozenset[str] = frozenset()) -> list[EvalJob]:
    """The noise study's evaluations of `sources` (under the study run `study_id`), less those in `done`."""
    conditions = noise_conditions(cfg)
    train_conditions = tuple(c for c in conditions if c != CLEAN) if cfg.study.noise.train_with_noise else ()
    return [
        EvalJob(
            source, cfg.study.task, test_conditions=tuple(conditions), train_conditions=train_conditions, parent_run_id=study_id,
            extra_tags={"avssl.study": "noise", "avssl.study_run_id": study_id or "", "avssl.train_with_noise": str(bool(train_conditions)).lower(),
                        "avssl.job": f"noise/{cfg.study.task}/{source.name}", **(tags or {})},
            run_name=f"noise-{source.name}",
        )
        for source in sources
        if f"noise/{cfg.study.task}/{source.name}" not in done
    ]


def plan_noise_study(cfg: Config, tracker: Tracker, cache: TaskDataCache, parent_run_id: Optional[str] = None,
                     tags: Optional[dict[str, str]] = None, done: frozenset[str] = frozenset()) -> StudyPlan:
    """`tags` go on the study and every evaluation (a recipe's id); jobs whose `avssl.job` key is in
    `done` finished in an earlier run of the recipe and are not rerun."""
    sources = resolve_sources(cfg.study.methods, cfg, tracker, cfg.seed)
    study_id = _start_study(tracker, cfg, "noise", cache, parent_run_id, tags)
    jobs = noise_jobs(cfg, sources, study_id, tags, done)
    print(f"noise study on {cfg.study.task}: {', '.join(s.name for s in sources)} x {len(noise_conditions(cfg))} conditions", flush=True)
    return StudyPlan("noise", study_id, jobs, cfg, tracker)


def _finish_noise(plan: StudyPlan, summaries: list[EvalSummary]) -> dict[str, Any]:
    from avssl.figures import errorbar_lines

    cfg, tracker = plan.cfg, plan.tracker
    primary = TASKS.get(cfg.study.task).primary
    conditions = noise_conditions(cfg)
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for s in summaries:
        row = {}
        for cond in conditions:
            name = condition_name(cond)
            prefix = "test/" if cond == CLEAN else f"noise/{name}/"
            row[name] = (s.metrics[f"{prefix}{primary}_mean"], s.metrics[f"{prefix}{primary}_std"])
        table[s.method] = row
    snrs = list(cfg.study.noise.snrs)
    for kind in cfg.study.noise.types:
        names = [condition_name(CLEAN if parse_snr(x) is None else (kind, parse_snr(x))) for x in snrs]
        series = {m: ([row[n][0] for n in names], [row[n][1] for n in names]) for m, row in table.items()}
        fig = errorbar_lines([str(x) for x in snrs], series, "SNR (dB)", f"test {primary}", f"{cfg.study.task} with {kind} noise")
        tracker.log_figure(plan.run_id, fig, f"noise_{kind}.png")
    tracker.log_text(plan.run_id, format_noise_table(table, primary), "noise_table.md")
    return {"table": table, "metric": primary}


def datasize_jobs(cfg: Config, sources: list[FeatureSource], study_id: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                  done: frozenset[str] = frozenset()) -> list[EvalJob]:
    """The dataset-size study's evaluations of `sources` at every fraction, less those in `done`."""
    return [
        EvalJob(
            source, cfg.study.task, label_fraction=fraction, parent_run_id=study_id,
            extra_tags={"avssl.study": "datasize", "avssl.study_run_id": study_id or "", "avssl.job": f"datasize/{cfg.study.task}/{source.name}/{fraction:g}", **(tags or {})},
            run_name=f"datasize-{source.name}-{fraction:g}",
        )
        for source in sources
        for fraction in cfg.study.datasize.fractions
        if f"datasize/{cfg.study.task}/{source.name}/{fraction:g}" not in done
    ]


def plan_datasize_study(cfg: Config, tracker: Tracker, cache: TaskDataCache, parent_run_id: Optional[str] = None,
                        tags: Optional[dict[str, str]] = None, done: frozenset[str] = frozenset()) -> StudyPlan:
    sources = resolve_sources(cfg.study.methods, cfg, tracker, cfg.seed)
    study_id = _start_study(tracker, cfg, "datasize", cache, parent_run_id, tags)
    jobs = datasize_jobs(cfg, sources, study_id, tags, done)
    print(f"datasize study on {cfg.study.task}: {', '.join(s.name for s in sources)} x fractions {cfg.study.datasize.fractions}", flush=True)
    return StudyPlan("datasize", study_id, jobs, cfg, tracker)


def _finish_datasize(plan: StudyPlan, summaries: list[EvalSummary]) -> dict[str, Any]:
    from avssl.figures import curves, errorbar_lines

    cfg, tracker = plan.cfg, plan.tracker
    task = cfg.study.task
    primary = TASKS.get(task).primary
    fractions = cfg.study.datasize.fractions
    table: dict[str, dict[float, dict[str, Any]]] = {}
    for job, s in zip(plan.jobs, summaries):
        of = overfitting(s)
        tracker.log_metrics(s.run_id, of)
        table.setdefault(s.method, {})[job.label_fraction] = {
            "mean": s.metrics[f"test/{primary}_mean"], "std": s.metrics[f"test/{primary}_std"], **of,
            "train_curve": s.results[0].curves["train_score"], "val_curve": s.results[0].curves["val_score"],
        }
    series = {m: ([row[f]["mean"] for f in fractions], [row[f]["std"] for f in fractions]) for m, row in table.items()}
    labels = [f"{100 * f:g}%" for f in fractions]
    tracker.log_figure(plan.run_id, errorbar_lines(labels, series, "labelled training data", f"test {primary}", f"{task}: data fraction"), "datasize_metric.png")
    gaps = {m: ([row[f]["overfit/gap_mean"] for f in fractions], [row[f]["overfit/gap_std"] for f in fractions]) for m, row in table.items()}
    tracker.log_figure(plan.run_id, errorbar_lines(labels, gaps, "labelled training data", "best train - best val", "overfitting gap"), "datasize_gap.png")
    smallest = fractions[0]
    lc = {}
    for m, row in table.items():
        lc[f"{m} train"] = row[smallest]["train_curve"]
        lc[f"{m} val"] = row[smallest]["val_curve"]
    tracker.log_figure(plan.run_id, curves(lc, "epoch", primary, f"learning curves at {100 * smallest:g}% of the labels (seed {cfg.evaluate.seeds[0]})"), "datasize_curves_smallest.png")
    tracker.log_text(plan.run_id, format_datasize_table(table, fractions, primary), "datasize_table.md")
    return {"table": table, "metric": primary, "fractions": fractions}


def run_studies(plans: list[StudyPlan], cfg: Config, tracker: Tracker, cache: TaskDataCache, extra_jobs: tuple[EvalJob, ...] = (),
                prefetch: Optional[HeadPrefetch] = None) -> tuple[list[dict[str, Any]], list[EvalSummary]]:
    """All the plans' jobs (and any extra ones) in one batch of Ray tasks, then each study's tables."""
    jobs = [j for p in plans for j in p.jobs] + list(extra_jobs)
    try:
        summaries = run_jobs(jobs, cfg, tracker, cache, on_done=lambda s: print(f"  done: {s.method} / {s.task} ({s.run_id[:8]})", flush=True),
                             prefetch=prefetch)
    except BaseException:
        for p in plans:
            tracker.end_run(p.run_id, "FAILED")
        raise
    outputs, k = [], 0
    for p in plans:
        outputs.append(p.finish(summaries[k : k + len(p.jobs)]))
        k += len(p.jobs)
    return outputs, summaries[k:]


def noise_study(cfg: Config, tracker: Tracker, cache: Optional[TaskDataCache] = None, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    cache = cache or TaskDataCache(cfg)
    return run_studies([plan_noise_study(cfg, tracker, cache, parent_run_id)], cfg, tracker, cache)[0][0]


def datasize_study(cfg: Config, tracker: Tracker, cache: Optional[TaskDataCache] = None, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    cache = cache or TaskDataCache(cfg)
    return run_studies([plan_datasize_study(cfg, tracker, cache, parent_run_id)], cfg, tracker, cache)[0][0]


def overfitting(summary: EvalSummary) -> dict[str, float]:
    """Best train score minus best validation score, and the epoch validation peaked, over seeds."""
    gaps, peaks, lengths = [], [], []
    for r in summary.results:
        gaps.append(max(r.curves["train_score"]) - max(r.curves["val_score"]))
        peaks.append(int(np.argmax(r.curves["val_score"])) + 1)
        lengths.append(len(r.curves["val_score"]))
    g, gs = mean_std(gaps)
    p, ps = mean_std(peaks)
    return {"overfit/gap_mean": g, "overfit/gap_std": gs, "overfit/val_peak_epoch_mean": p, "overfit/val_peak_epoch_std": ps, "overfit/epochs_run_mean": float(np.mean(lengths))}


def format_noise_table(table: dict[str, dict[str, tuple[float, float]]], metric: str) -> str:
    conds = list(next(iter(table.values())).keys()) if table else []
    lines = [f"| method | {' | '.join(conds)} |", "|---" * (len(conds) + 1) + "|"]
    for m, row in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in conds) + " |")
    return f"test {metric}\n\n" + "\n".join(lines) + "\n"


def format_datasize_table(table: dict[str, dict[float, dict[str, Any]]], fractions: list[float], metric: str) -> str:
    lines = ["| method | " + " | ".join(f"{100 * f:g}%" for f in fractions) + " |", "|---" * (len(fractions) + 1) + "|"]
    for m, row in table.items():
        cells = [f"{row[f]['mean']:.3f} ± {row[f]['std']:.3f} (gap {row[f]['overfit/gap_mean']:.2f}, val peak ep {row[f]['overfit/val_peak_epoch_mean']:.0f})" for f in fractions]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return f"test {metric} (overfitting gap = best train - best val score)\n\n" + "\n".join(lines) + "\n"


def study_command(cfg: Config, study: str) -> int:
    tracker = Tracker.from_config(cfg.tracking)
    if study == "noise":
        out = noise_study(cfg, tracker)
        print("\n" + format_noise_table(out["table"], out["metric"]))
    else:
        out = datasize_study(cfg, tracker)
        print("\n" + format_datasize_table(out["table"], out["fractions"], out["metric"]))
    print(f"study run: {out['run_id']}\n  results: {mlflow_ui_hint(tracker.uri, tracker.experiment_id)}")
    return 0
