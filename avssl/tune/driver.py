"""`avssl tune SPACE.yaml`: Ray Tune on Ray Train V2.

Each trial is a function trainable that builds and fits a `TorchTrainer` named after the trial
(reporting every epoch to Tune through `TuneReportCallback`, so ASHA can stop bad trials early),
and optionally trains a downstream head on the result. Trial drivers hold no CPU (a custom
resource on local runtimes), so trial workers can never be starved by their own drivers.
Rerunning the same search name (or `--resume`) restores it: finished trials are not rerun.

MLflow: one parent run per search (found again by its name tag on restore), one child run per
trial keyed by the trial id (reopened, never duplicated), with the sampled values as params,
the pretraining metrics per step, and the trial's best downstream metric.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from avssl import storage
from avssl.config.loader import apply_overrides, config_from_dict, flatten
from avssl.config.schema import Config
from avssl.errors import AvsslError, ConfigError
from avssl.runtime import TUNE_DRIVER_RESOURCE, ensure_ray
from avssl.tracking import Tracker, mlflow_ui_hint
from avssl.tune.space import SearchSpace, TrialSettings, flat_params, load_space, sampled_overrides, to_tune

DONE_TAG = "avssl.trial_status"


def trial_config(static: dict[str, Any], params: dict[str, Any], trial_id: str) -> tuple[Config, TrialSettings]:
    overrides, trial_values = sampled_overrides(params)
    tree = apply_overrides(static["base"], overrides)
    cfg = config_from_dict(tree)
    trial = TrialSettings.model_validate({**static["trial"], **trial_values})
    cfg = cfg.model_copy(update={"run_name": trial_id})
    cfg.train.storage_path = str(storage.join(static["storage"], "train"))
    cfg.train.num_workers = trial.workers
    cfg.train.cpus_per_worker = trial.cpus_per_worker
    cfg.train.use_gpu = trial.gpus_per_worker > 0
    cfg.train.gpus_per_worker = trial.gpus_per_worker or 1.0
    cfg.train.probe.task = trial.task
    # Only epoch-end reports: every report then carries the epoch's metrics for the scheduler.
    cfg.train.checkpoint_every_steps = 10**9
    return cfg, trial


def _downstream(cfg: Config, trial: TrialSettings, encoder_path: Optional[str], in_process: bool) -> dict[str, float]:
    """Train one downstream head and return its validation scores: in the trial's process when it
    holds the trial's CPUs, else in a Ray task that holds them."""
    import ray

    from avssl.evaluate.features import FeatureStore
    from avssl.evaluate.runner import TaskDataCache, fit_seeds
    from avssl.evaluate.sources import resolve_source

    source = resolve_source(encoder_path if trial.encoder == "pretrained" else "scratch", cfg, seed=cfg.seed)
    data = TaskDataCache(cfg).get(trial.task)
    data.store = FeatureStore()  # a trial's encoder is its own: its features are not kept for reuse
    args = (source, data, cfg.evaluate, cfg.evaluate.label_fraction, (("clean", None),), (), [cfg.seed])
    if in_process:
        result = fit_seeds(*args, val_se=True)[0]
    else:
        result = ray.get(ray.remote(num_cpus=trial.cpus_per_worker)(fit_seeds).remote(*args, val_se=True))[0]
    # Selection metrics only: a search never sees (or logs) test-set scores.
    return {f"downstream/val_{k}": v for k, v in result.val.items()} | {"downstream/best_epoch": result.best_epoch}


def _log_trial_corpora(tracker: Tracker, run_id: str, cfg: Config, trial: TrialSettings) -> None:
    from avssl.config.schema import task_corpus
    from avssl.data.corpus import Corpus
    from avssl.train.trainer import log_corpora

    if trial.encoder == "pretrained":
        log_corpora(tracker, run_id, cfg, Corpus(cfg.data.corpus))
    if trial.downstream:
        tracker.log_corpus(run_id, Corpus(task_corpus(cfg, trial.task)), "evaluation")


def trial_fn(config: dict[str, Any], static: dict[str, Any]) -> None:
    """One trial: pretrain (reporting each epoch to Tune) and/or train a downstream head.
    `config` holds the sampled values; `static` the search's fixed settings."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from avssl.tracking import system_metrics
    from avssl.train.loop import ENCODER_FILE, TuneTrialSession, run_loop
    from avssl.train.trainer import build_trainer

    config = dict(config)
    trial_id = tune.get_context().get_trial_id()
    cfg, trial = trial_config(static, config, trial_id)
    tracker = Tracker(static["tracking_uri"], static["experiment"], check=False)
    key = {"avssl.kind": "trial", "avssl.trial_id": trial_id}
    metric = static["metric"]
    done = tracker.find_run(key, static["parent_run_id"])
    if done is not None and done.data.tags.get(DONE_TAG) == "finished":
        # Finished before the search was interrupted (Tune's state had not caught up): report the
        # recorded result instead of training again.
        recorded = done.data.metrics
        tune.report({metric: recorded.get(f"best/{metric}"), "epoch": recorded.get("epoch", cfg.train.epochs), "reused_result": 1})
        return
    params = {**flat_params(config), "trial.encoder": trial.encoder, "trial.task": trial.task, "evaluate.label_fraction": cfg.evaluate.label_fraction}
    run_id, reopened = tracker.find_or_start_run(f"{static['search_name']}-{trial_id}", key, params=params, parent_id=static["parent_run_id"])
    if not reopened:
        _log_trial_corpora(tracker, run_id, cfg, trial)
    in_process = static["in_process"]
    tracker.set_tags(run_id, {"avssl.search_name": static["search_name"], "avssl.encoder": trial.encoder, DONE_TAG: "running",
                              "avssl.trial_mode": "in-process" if in_process else "nested TorchTrainer"})
    encoder_path = None
    final: dict[str, float] = {}
    if trial.encoder == "pretrained":
        run_dir = storage.join(cfg.train.storage_path, trial_id)
        encoder_path = str(storage.join(run_dir, ENCODER_FILE))
        # Tagged now: a scheduler may end this trial right after its last report, before this function returns.
        tracker.set_tags(run_id, {"avssl.encoder_path": encoder_path})
        loop_config = {"cfg": cfg.model_dump(mode="json"), "tracking_uri": tracker.uri, "run_id": run_id, "encoder_dir": str(run_dir)}
        if in_process:
            # The same loop as a Ray Train worker's, in this process: checkpoints and resume go
            # through the trial's own storage (tune.report / tune.get_checkpoint).
            session = TuneTrialSession()
            with system_metrics(loop_config, 0):
                run_loop(loop_config, session)
            last = session.last
        else:
            last = build_trainer(cfg, loop_config, callbacks=[TuneReportCallback()]).fit().metrics or {}
        final.update({k: v for k, v in last.items() if isinstance(v, (int, float))})
    if trial.downstream:
        scores = _downstream(cfg, trial, encoder_path, in_process)
        scores["epoch"] = cfg.train.epochs + 1 if trial.encoder == "pretrained" else 1
        tracker.log_metrics(run_id, scores, step=int(scores["epoch"]))
        final.update(scores)
        tune.report(scores)
    if metric in final:
        tracker.log_metrics(run_id, {f"best/{metric}": final[metric]} | ({f"best/{metric}_se": final[f"{metric}_se"]} if f"{metric}_se" in final else {}))
    tracker.set_tags(run_id, {DONE_TAG: "finished"})
    tracker.end_run(run_id, "FINISHED")


def _trial_runs_sync(tracker: Tracker, parent_id: str, metric: str, mode: str, max_epochs: int):
    """A Tune callback (driver side) that closes each trial's MLflow run the way it ended, including
    trials the scheduler stopped (their trial function is killed before it can)."""
    from ray import tune

    class TrialRunSync(tune.Callback):
        def _close(self, trial: Any, status: str, label: str) -> None:
            runs = tracker.find_runs({"avssl.kind": "trial", "avssl.trial_id": trial.trial_id}, parent_id=parent_id)
            for run in runs:
                if run.data.tags.get(DONE_TAG) == "finished" and status == "FINISHED":
                    continue
                history = tracker.metric_history(run.info.run_id, metric)
                if history:
                    best = (max if mode == "max" else min)(history, key=lambda m: m.value)
                    values = {f"best/{metric}": best.value}
                    se = [m.value for m in tracker.metric_history(run.info.run_id, f"{metric}_se") if m.step == best.step]
                    if se:
                        values[f"best/{metric}_se"] = se[-1]
                    tracker.log_metrics(run.info.run_id, values)
                tracker.set_tags(run.info.run_id, {DONE_TAG: label})
                tracker.end_run(run.info.run_id, status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch", 0) or 0
            self._close(trial, "FINISHED", "finished" if epoch >= max_epochs else "stopped_early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED", "error")

    return TrialRunSync()


@dataclass
class SearchResult:
    name: str
    parent_run_id: str
    trials: list[dict[str, Any]]
    best: Optional[dict[str, Any]]
    seconds: float
    restored: bool
    summary: dict[str, float]


def _trial_rows(grid: Any, metric: str, mode: str) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        values = df[metric].dropna().tolist() if df is not None and metric in df else []
        best = (max(values) if mode == "max" else min(values)) if values else None
        se = None
        if best is not None and f"{metric}_se" in df:
            at_best = df[df[metric] == best][f"{metric}_se"].dropna()
            se = float(at_best.iloc[-1]) if len(at_best) else None
        cfg = dict(r.config or {})
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
            "config": cfg,
            "best": best,
            "se": se,
            "epochs": float(df["epoch"].max()) if df is not None and "epoch" in df and len(df) else 0.0,
            "error": str(r.error) if r.error else None,
        })
    return rows


def tie_rate(rows: list[dict[str, Any]], decimals: int = 6) -> float:
    """The share of finished trials whose score equals another finished trial's: a metric without
    the resolution to tell configurations apart shows up here first."""
    scores = [round(r["best"], decimals) for r in rows if r["best"] is not None]
    if len(scores) < 2:
        return 0.0
    return sum(1 for v in scores if scores.count(v) > 1) / len(scores)


def search_summary(rows: list[dict[str, Any]], mode: str) -> dict[str, float]:
    """Tie rate, best-vs-worst spread, and the best trial's lead over the runner-up in units of its
    standard error (when the metric reports one)."""
    ok = sorted((r for r in rows if r["best"] is not None), key=lambda r: r["best"], reverse=mode == "max")
    out = {"search/trials": float(len(rows)), "search/finished": float(len(ok)), "search/errored": float(sum(1 for r in rows if r["error"])),
           "search/tie_rate": tie_rate(rows)}
    if ok:
        out["search/spread"] = abs(ok[0]["best"] - ok[-1]["best"])
        if ok[0].get("se") is not None:
            out["search/best_se"] = ok[0]["se"]
    if len(ok) > 1 and ok[0].get("se") and ok[1].get("se"):
        out["search/lead_over_runner_up_in_se"] = abs(ok[0]["best"] - ok[1]["best"]) / float(np.hypot(ok[0]["se"], ok[1]["se"]))
    return out


def _searcher(space: SearchSpace, concurrent: int):
    """Random/grid sampling, or Optuna's TPE behind a concurrency limit. Either one's state is part
    of the search's checkpoint, so a restored search carries on with the same sampler."""
    if space.searcher == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=space.seed)), max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrent, random_state=space.seed)


def _search_figures(tracker: Tracker, parent_id: str, space: SearchSpace, rows: list[dict[str, Any]], metric: str) -> None:
    from avssl.figures import heatmap, scatter

    ok = [r for r in rows if r["best"] is not None]
    if not ok:
        return
    for key, dist in space.space.items():
        kind = next(iter(dist))
        values = [r["config"].get(key) for r in ok]
        if all(isinstance(v, (int, float)) for v in values) and kind != "grid":
            tracker.log_figure(parent_id, scatter(values, [r["best"] for r in ok], key, f"best {metric}", f"{metric} vs {key}"), f"search_{key.replace('.', '_')}.png")
    grids = [k for k, d in space.space.items() if "grid" in d]
    if len(grids) == 2:
        a, b = grids
        ra = [_label(v) for v in space.space[a]["grid"]]
        cb = [_label(v) for v in space.space[b]["grid"]]
        values, errors = np.full((len(ra), len(cb)), np.nan), np.full((len(ra), len(cb)), np.nan)
        for r in ok:
            i, j = ra.index(_label(r["config"][a])), cb.index(_label(r["config"][b]))
            if np.isnan(values[i, j]) or r["best"] > values[i, j]:
                values[i, j], errors[i, j] = r["best"], r.get("se") if r.get("se") is not None else np.nan
        title = f"best {metric}" + (" ± 1.96 SE (bootstrap over validation clips)" if np.isfinite(errors).any() else "")
        tracker.log_figure(parent_id, heatmap(values, ra, cb, b, a, title, errors=1.96 * errors), "search_grid.png")


def _label(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k.split('.')[-1]}={x}" for k, x in v.items())
    return str(v)


def _check_metric(space: SearchSpace, cfg: Config) -> None:
    """The search metric must be computable by every trial, checked before any trial starts."""
    from avssl.train.probe import check_probe

    if space.metric.startswith("downstream/"):
        if not space.trial.downstream:
            raise ConfigError(f"metric '{space.metric}' needs trial.downstream: true in the space file")
        if "test" in space.metric:
            raise ConfigError(f"metric '{space.metric}': searches select on validation scores, never on test scores")
        from avssl.evaluate.runner import TaskDataCache

        TaskDataCache(cfg).get(space.trial.task)
        return
    probe_cfg = cfg.model_copy(deep=True)
    probe_cfg.train.probe.task = space.trial.task
    check_probe(probe_cfg, space.metric)


def run_search(space: SearchSpace, cfg: Config, name: Optional[str] = None, resume: bool = False, retry_errored: bool = False) -> SearchResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t0 = time.perf_counter()
    name = name or space.name
    searches = storage.join(cfg.train.storage_path, "searches")
    path = storage.join(searches, name)
    tracker = Tracker.from_config(cfg.tracking)
    from ray.tune import Tuner

    restorable = Tuner.can_restore(str(path))
    if resume and not restorable:
        raise ConfigError(f"--resume: no search named '{name}' under {searches} (start it without --resume)")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # save the search's state often: cheap, and resumes lose little
    _check_metric(space, cfg)
    resources = ensure_ray(cfg.train.ray_address)
    per_trial = space.trial.workers * space.trial.cpus_per_worker
    capacity = int(resources.get("CPU", 1) // per_trial)
    if capacity < 1:
        raise AvsslError(f"a trial needs {per_trial:g} CPUs; the Ray cluster has {resources.get('CPU', 0):g}")
    gpus = space.trial.workers * space.trial.gpus_per_worker
    if gpus:
        if resources.get("GPU", 0) < min(gpus, 1):
            raise AvsslError(f"a trial needs {gpus:g} GPU(s) (trial.gpus_per_worker={space.trial.gpus_per_worker:g}); the Ray cluster has {resources.get('GPU', 0):g}")
        capacity = min(capacity, int(resources["GPU"] / gpus + 1e-9))
    concurrent = min(space.max_concurrent_trials, capacity)
    in_process = space.in_process
    if in_process:  # the trial's process is the worker: it holds the worker's resources
        trial_resources = {"CPU": space.trial.cpus_per_worker} | ({"GPU": space.trial.gpus_per_worker} if space.trial.gpus_per_worker else {})
    else:  # a driver that holds nothing, and a nested TorchTrainer whose workers hold the resources
        trial_resources = {"CPU": 0, TUNE_DRIVER_RESOURCE: 1} if resources.get(TUNE_DRIVER_RESOURCE) else {"CPU": 0.01}

    search_key = {"avssl.kind": "search", "avssl.search_name": name}
    parent_id, reopened = tracker.find_or_start_run(
        f"search-{name}", search_key,
        params={f"space.{k}": v for k, v in flatten(space.model_dump(mode="json")).items() if k != "description"},
    )
    tracker.set_tags(parent_id, {"avssl.metric": space.metric, "avssl.mode": space.mode, "avssl.space_file_name": space.name})
    max_epochs = space.scheduler.max_t or cfg.train.epochs
    static = {
        "base": cfg.model_dump(mode="json"),
        "trial": space.trial.model_dump(mode="json"),
        "storage": str(path),
        "tracking_uri": tracker.uri,
        "experiment": cfg.tracking.experiment,
        "parent_run_id": parent_id,
        "search_name": name,
        "metric": space.metric,
        "in_process": in_process,
    }
    param_space = to_tune(space)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, static=static), trial_resources)
    callbacks = [_trial_runs_sync(tracker, parent_id, space.metric, space.mode, max_epochs)]
    run_config = tune.RunConfig(name=name, storage_path=str(searches), callbacks=callbacks, verbose=1)
    print(f"search '{name}': {space.total_trials} trials, up to {concurrent} at a time, {space.mode} {space.metric}; "
          f"searcher {space.searcher}, scheduler {space.scheduler.name}; trials {'in-process' if in_process else 'on nested TorchTrainers'}; "
          f"MLflow run {parent_id}" + (" (restoring)" if restorable else ""), flush=True)
    try:
        if restorable:
            tuner = Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=retry_errored, param_space=param_space)
        else:
            scheduler = None
            if space.scheduler.name == "asha":
                scheduler = ASHAScheduler(
                    time_attr=space.scheduler.time_attr, max_t=max_epochs,
                    grace_period=space.scheduler.grace_period, reduction_factor=space.scheduler.reduction_factor,
                )
            tuner = Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=space.metric, mode=space.mode, scheduler=scheduler, num_samples=space.num_samples,
                    search_alg=_searcher(space, concurrent),
                ),
                run_config=run_config,
            )
        grid = tuner.fit()
    except BaseException:
        tracker.set_tags(parent_id, {"avssl.search_status": "interrupted"})
        raise
    rows = _trial_rows(grid, space.metric, space.mode)
    ok = [r for r in rows if r["best"] is not None]
    best = (max if space.mode == "max" else min)(ok, key=lambda r: r["best"]) if ok else None
    summary = search_summary(rows, space.mode) | {"search/seconds": time.perf_counter() - t0}
    if best:
        summary[f"search/best_{space.metric}"] = best["best"]
        best_runs = tracker.find_runs({"avssl.kind": "trial", "avssl.trial_id": best["trial_id"]}, parent_id=parent_id)
        if best_runs:
            best["run_id"] = best_runs[0].info.run_id
            best["encoder_path"] = best_runs[0].data.tags.get("avssl.encoder_path")
            tracker.set_tags(parent_id, {"avssl.best_trial_id": best["trial_id"], "avssl.best_run_id": best["run_id"]})
        tracker.log_text(parent_id, "\n".join(f"{k}: {v}" for k, v in best["config"].items()), "best_config.txt")
        if best.get("encoder_path") and best.get("run_id") and storage.is_file(best["encoder_path"]):
            from avssl.train.trainer import register

            best["registered_model"] = register(tracker, cfg, best["run_id"], str(best["encoder_path"]).rsplit("/", 1)[0], [f"best-of-{name}"])
    tracker.log_metrics(parent_id, summary)
    _search_figures(tracker, parent_id, space, rows, space.metric)
    tracker.set_tags(parent_id, {"avssl.search_status": "finished"})
    tracker.end_run(parent_id, "FINISHED")
    return SearchResult(name, parent_id, rows, best, time.perf_counter() - t0, restorable, summary)


def print_result(res: SearchResult, space: SearchSpace, uri: str) -> None:
    print(f"\nsearch '{res.name}' {'restored and ' if res.restored else ''}finished in {res.seconds:.0f} s: {len(res.trials)} trials")
    for r in sorted(res.trials, key=lambda r: (r["best"] is None, -(r["best"] or 0) if space.mode == "max" else (r["best"] or 0))):
        vals = ", ".join(f"{k}={_label(v)}" for k, v in r["config"].items())
        best = (f"{r['best']:.4f}" + (f"±{r['se']:.3f}" if r.get("se") is not None else "")) if r["best"] is not None else "-"
        print(f"  {r['trial_id']:<14} {space.metric}={best:<14} epochs={r['epochs']:<4g} {vals}" + (f"  ERROR {r['error'][:80]}" if r["error"] else ""))
    summ = res.summary
    line = f"tie rate {summ['search/tie_rate']:.0%} of {summ['search/finished']:.0f} finished trials"
    if "search/spread" in summ:
        line += f"; best-vs-worst spread {summ['search/spread']:.4f}"
    if "search/lead_over_runner_up_in_se" in summ:
        lead = summ["search/lead_over_runner_up_in_se"]
        line += f"; best leads the runner-up by {lead:.1f} standard errors" + ("" if lead >= 2 else " (not resolved: below 2)")
    print(line)
    if res.best:
        print(f"best trial {res.best['trial_id']} ({space.metric}={res.best['best']:.4f}): "
              + ", ".join(f"{k}={_label(v)}" for k, v in res.best["config"].items()))
        if res.best.get("encoder_path"):
            print(f"  best encoder: {res.best['encoder_path']}  (MLflow run {res.best.get('run_id')})"
                  + (f"; registered as {res.best['registered_model']}, alias best-of-{res.name}" if res.best.get("registered_model") else ""))
    print(f"  MLflow parent run {res.parent_run_id}; {mlflow_ui_hint(uri)}")


def tune_command(space_path: str, overrides: list[str], resume: bool = False, name: Optional[str] = None, retry_errored: bool = False) -> int:
    space, cfg = load_space(space_path, overrides)
    res = run_search(space, cfg, name, resume, retry_errored)
    print_result(res, space, Tracker.from_config(cfg.tracking, check=False).uri)
    return 0


def run_quick_search(cfg: Config) -> Optional[str]:
    """The quick start's search: tune_spaces/quick.yaml over the quick start's corpus."""
    path = quick_space_path()
    overrides = [f"data.corpus={cfg.data.corpus}", f"train.storage_path={cfg.train.storage_path}", f"tracking.experiment={cfg.tracking.experiment}"]
    if cfg.tracking.uri:
        overrides.append(f"tracking.uri={cfg.tracking.uri}")
    space, base = load_space(path, overrides)
    res = run_search(space, base)
    print_result(res, space, Tracker.from_config(base.tracking, check=False).uri)
    return res.parent_run_id


def quick_space_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "tune_spaces" / "quick.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: the quick start's search runs from a checkout of avssl (pip install -e .)")
    return path
