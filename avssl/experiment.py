"""Experiment recipes: one YAML file per table of the paper's protocol (experiments/*.yaml), run
with one command, resumable, all under one MLflow parent run.

A recipe names a base config and overrides, optionally the synthetic corpora to generate, the
encoders to pretrain (objectives x pretraining seeds), and what to evaluate: the main table
(tasks x methods), the noise study, the dataset-size study, a loss-weight search. Every run it
creates carries the recipe's parent run id (`avssl.recipe_run_id`); a rerun finds finished
pretrainings and evaluations in MLflow and reuses them. It ends with the report of its own runs:
tables with intervals, paired differences and the paper's claims as verdicts.

`scale` overrides size the offline run (epochs, pool size); `--config paper` (or any other base)
drops them and keeps the protocol (`overrides`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationError, field_validator

from avssl.config.schema import Config, Section
from avssl.errors import ConfigError
from avssl.tracking import Tracker, mlflow_ui_hint

OBJECTIVE_NAMES = ("visual", "audio", "av")
BASELINE_NAMES = ("scratch", "mfcc", "logmel")


class PretrainSpec(Section):
    objectives: list[str] = ["visual", "audio", "av"]

    @field_validator("objectives")
    @classmethod
    def _objectives_ok(cls, v: list[str]) -> list[str]:
        from avssl.objectives import OBJECTIVES

        bad = [o for o in v if o not in OBJECTIVES]
        if bad:
            raise ValueError(f"unknown objective(s) {', '.join(bad)}: registered objectives are {', '.join(OBJECTIVES.names())}")
        return v

    seeds: list[int] = Field([0], min_length=1, description="pretraining seeds: one encoder per objective and seed")
    encoders: Optional[str] = Field(None, description="run-name prefix of the encoders (recipes sharing it share encoders); default: the recipe's name")
    overrides: list[str] = []


def _check_methods(methods: list[str]) -> list[str]:
    known = ("pretrained",) + OBJECTIVE_NAMES + BASELINE_NAMES
    bad = [m for m in methods if m not in known and not m.startswith("models:/")]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}: use {', '.join(known)}, or a registered encoder models:/NAME@ALIAS")
    return methods


def _check_tasks(tasks: list[str]) -> list[str]:
    from avssl.evaluate.tasks import TASKS

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}: registered tasks are {', '.join(TASKS.names())}")
    return tasks


class EvalSpec(Section):
    tasks: list[str] = ["emotion", "word", "affect"]
    methods: list[str] = ["pretrained", "scratch", "mfcc", "logmel"]

    _methods_ok = field_validator("methods")(_check_methods)
    _tasks_ok = field_validator("tasks")(_check_tasks)


class StudySpec(Section):
    task: str = "emotion"
    methods: list[str] = ["pretrained", "scratch", "mfcc", "logmel"]

    _methods_ok = field_validator("methods")(_check_methods)

    @field_validator("task")
    @classmethod
    def _task_ok(cls, v: str) -> str:
        return _check_tasks([v])[0]


class SearchSpec(Section):
    space: str
    overrides: list[str] = []


class Recipe(Section):
    name: str
    description: str = ""
    config: str = "tiny"
    overrides: list[str] = Field([], description="the protocol: applied whatever the base config")
    scale: list[str] = Field([], description="sizes for the recipe's own base config; dropped under another --config")
    synth: bool = Field(False, description="generate the synthetic protocol corpora (synth.*) first; reused when unchanged")
    pretrain: Optional[PretrainSpec] = PretrainSpec()
    evaluate: Optional[EvalSpec] = None
    noise: Optional[StudySpec] = None
    datasize: Optional[StudySpec] = None
    search: Optional[SearchSpec] = None


def load_recipe(path: str | Path) -> Recipe:
    from avssl.config.loader import read_yaml_mapping

    data = read_yaml_mapping(Path(path), "experiment recipe")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid recipe:\n" + "\n".join(lines)) from None


def recipe_config(recipe: Recipe, config: Optional[str], overrides: list[str]) -> Config:
    from avssl.config import load_config

    own = config is None or config == recipe.config
    return load_config(recipe.config if own else config, (recipe.scale if own else []) + recipe.overrides + list(overrides))


@dataclass
class Encoder:
    objective: str
    seed: int
    run_id: str
    reused: bool


def pretrain_digest(cfg: Config) -> str:
    """What makes two pretrainings the same: corpus, model, objective, schedule and seed (not where
    they are stored or tracked, nor the probe)."""
    import hashlib
    import json

    tree = cfg.model_dump(mode="json")
    train = {k: v for k, v in tree["train"].items() if k not in ("storage_path", "ray_address", "probe", "log_level", "log_every_steps", "figure_every_epochs")}
    keep = {"seed": tree["seed"], "data": tree["data"], "model": tree["model"], "objective": tree["objective"], "train": train}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _expand(methods: list[str], encoders: list[Encoder]) -> list[str]:
    out: list[str] = []
    for m in methods:
        if m == "pretrained":
            out += [e.run_id for e in encoders]
        elif m in OBJECTIVE_NAMES:
            out += [e.run_id for e in encoders if e.objective == m]
        elif m in BASELINE_NAMES or m.startswith("models:/"):  # a baseline, or a registered encoder
            out.append(m)
        else:
            raise ConfigError(f"recipe method '{m}': use pretrained, an objective ({', '.join(OBJECTIVE_NAMES)}), a baseline "
                              f"({', '.join(BASELINE_NAMES)}) or models:/NAME@ALIAS")
    return list(dict.fromkeys(out))


class RecipeRun:
    """One run of a recipe: its MLflow parent run, and each step reusing what finished before."""

    def __init__(self, recipe: Recipe, cfg: Config, quiet: bool = False):
        self.recipe, self.cfg = recipe, cfg
        self.tracker = Tracker.from_config(cfg.tracking)
        self.timings: dict[str, float] = {}
        key = {"avssl.kind": "recipe", "avssl.recipe": recipe.name}
        from avssl.config.loader import flatten

        self.parent_id, self.resumed = self.tracker.find_or_start_run(
            f"recipe-{recipe.name}", key, params={**{f"recipe.{k}": v for k, v in flatten(recipe.model_dump(mode="json")).items()}},
        )
        self.tracker.set_tags(self.parent_id, {"avssl.recipe_description": recipe.description[:4000], "avssl.preset": cfg.preset})
        self.tags = {"avssl.recipe_run_id": self.parent_id, "avssl.recipe": recipe.name}
        self._cache = None
        self.prefetch = None  # baseline head trainings started during pretraining

    def step(self, title: str) -> float:
        print(f"\n=== {title} ===", flush=True)
        return time.perf_counter()

    # -- steps ------------------------------------------------------------------------------------
    def synth(self) -> None:
        from avssl.data.pipeline import synth_command
        from avssl.quickstart import protocol_matches

        if protocol_matches(self.cfg):
            print(f"reusing {self.cfg.synth.out} (same generator settings)")
        else:
            synth_command(self.cfg, overwrite=True)

    def pretrain(self) -> list[Encoder]:
        from avssl.train.trainer import pretrain_many

        spec = self.recipe.pretrain
        if spec is None:
            return []
        prefix = spec.encoders or self.recipe.name
        encoders, todo = [], []
        for objective in spec.objectives:
            for seed in spec.seeds:
                name = f"{prefix}-{objective}-s{seed}"
                from avssl.config.loader import apply_overrides, config_from_dict

                tree = apply_overrides(self.cfg.model_dump(mode="json"), spec.overrides + [f"objective.name={objective}", f"seed={seed}", f"run_name={name}"])
                one = config_from_dict(tree)
                digest = pretrain_digest(one)
                done = [r for r in self.tracker.find_runs({"avssl.kind": "pretrain", "avssl.run_name": name}) if r.info.status == "FINISHED"]
                if done:
                    theirs = done[-1].data.tags.get("avssl.pretrain_digest")
                    if theirs != digest:
                        raise ConfigError(
                            f"a finished pretraining named '{name}' (run {done[-1].info.run_id}) was trained with other settings "
                            f"(corpus, model, objective or schedule); set pretrain.encoders in the recipe to another prefix, or remove that run"
                        )
                    encoders.append(Encoder(objective, seed, done[-1].info.run_id, True))
                    print(f"  {name}: finished earlier with the same settings, reused (run {done[-1].info.run_id})")
                    continue
                todo.append((objective, seed, one))

        def done_cb(r: Any) -> None:
            print(f"  {r.run_name}: {r.metrics.get('step')} steps, val loss {r.metrics.get('val/loss', float('nan')):.4f}, "
                  f"probe {r.metrics.get('probe/val_uar', r.metrics.get('probe/val_ccc', float('nan'))):.3f}, {r.seconds:.0f} s, run {r.run_id}", flush=True)

        self.prefetch = self.baseline_prefetch() if todo else None
        between = self.prefetch.pump if self.prefetch is not None else None
        results = pretrain_many([c for _, _, c in todo], on_done=done_cb, parent_run_id=self.parent_id, extra_tags=self.tags, between=between) if todo else []
        if self.prefetch is not None and self.prefetch.started:
            print(f"  meanwhile, on CPUs the pretrainings left idle: {self.prefetch.started} of the baselines' head trainings started", flush=True)
        for (_, _, c), r in zip(todo, results):
            self.tracker.set_tags(r.run_id, {"avssl.pretrain_digest": pretrain_digest(c)})
        encoders += [Encoder(o, s, r.run_id, False) for (o, s, _), r in zip(todo, results)]
        order = {o: i for i, o in enumerate(spec.objectives)}
        return sorted(encoders, key=lambda e: (order[e.objective], e.seed))

    def finished_jobs(self) -> frozenset[str]:
        runs = self.tracker.find_runs({"avssl.kind": "evaluate", "avssl.recipe_run_id": self.parent_id})
        return frozenset(r.data.tags["avssl.job"] for r in runs if r.info.status == "FINISHED" and "avssl.job" in r.data.tags)

    def task_data(self):
        """Every task's corpus and labels (loaded once, checked before any compute)."""
        from avssl.evaluate.runner import TaskDataCache

        if self._cache is None:
            r = self.recipe
            self._cache = TaskDataCache(self.cfg)
            for task in sorted({t for t in ((r.evaluate.tasks if r.evaluate else []) + [s.task for s in (r.noise, r.datasize) if s])}):
                self._cache.get(task)
        return self._cache

    def _study_cfg(self, spec: StudySpec, encoders: list[Encoder]) -> Config:
        study_cfg = self.cfg.model_copy(deep=True)
        study_cfg.study.methods = _expand(spec.methods, encoders)
        study_cfg.study.task = spec.task
        return study_cfg

    def _main_jobs(self, methods: list[str], sources: list, encoders: list[Encoder], done: frozenset[str]) -> list:
        """The main table's evaluations (task x method), less the noise study's (its heads train on
        clean audio: they are the main table's cells) and those finished earlier."""
        from avssl.evaluate.runner import EvalJob

        r = self.recipe
        in_noise = {(r.noise.task, m) for m in _expand(r.noise.methods, encoders)} if r.noise else set()
        return [EvalJob(source, task, extra_tags={"avssl.job": f"main/{task}/{source.name}", **self.tags})
                for task in r.evaluate.tasks for spec, source in zip(methods, sources)
                if (task, spec) not in in_noise and f"main/{task}/{source.name}" not in done]

    def baseline_prefetch(self):
        """The baselines' evaluations do not wait for the encoders: their head trainings start on
        the CPUs the pretrainings leave idle (`HeadPrefetch`). None when evaluation is not run as
        parallel CPU tasks or the recipe has no baseline to evaluate."""
        from avssl.config.loader import apply_overrides, config_from_dict
        from avssl.evaluate.runner import HeadPrefetch
        from avssl.evaluate.sources import resolve_source
        from avssl.evaluate.studies import datasize_jobs, noise_jobs

        r, cfg = self.recipe, self.cfg
        if not cfg.evaluate.parallel or cfg.evaluate.use_gpu:
            return None
        # scratch takes the architecture of the encoders it is compared with: the pretrainings'.
        overrides = r.pretrain.overrides if r.pretrain else []
        arch = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), overrides)).model.audio_encoder

        def baselines(methods: list[str]) -> tuple[list[str], list]:
            names = [m for m in _expand(methods, []) if m in BASELINE_NAMES]
            like = arch if any(m not in BASELINE_NAMES and not m.startswith("models:/") for m in methods) else None
            return names, [resolve_source(m, cfg, self.tracker, cfg.seed, like=like) for m in names]

        done = self.finished_jobs()
        jobs = []
        if r.evaluate:
            jobs += self._main_jobs(*baselines(r.evaluate.methods), [], done)
        for spec, make in ((r.noise, noise_jobs), (r.datasize, datasize_jobs)):
            if spec is not None:
                jobs += make(self._study_cfg(spec, []), baselines(spec.methods)[1], None, self.tags, done)
        return HeadPrefetch(jobs, cfg, self.task_data()) if jobs else None

    def evaluate(self, encoders: list[Encoder]) -> None:
        from avssl.evaluate.runner import format_row
        from avssl.evaluate.sources import resolve_sources
        from avssl.evaluate.studies import plan_datasize_study, plan_noise_study, run_studies

        r, cfg = self.recipe, self.cfg
        done = self.finished_jobs()
        cache = self.task_data()
        plans = [planner(self._study_cfg(spec, encoders), self.tracker, cache, self.parent_id, self.tags, done)
                 for spec, planner in ((r.noise, plan_noise_study), (r.datasize, plan_datasize_study)) if spec is not None]
        extra = []
        if r.evaluate:
            methods = _expand(r.evaluate.methods, encoders)
            extra = self._main_jobs(methods, resolve_sources(methods, cfg, self.tracker, cfg.seed), encoders, done)
        n_jobs = sum(len(p.jobs) for p in plans) + len(extra)
        print(f"{n_jobs} evaluations to run ({len(done)} finished earlier, reused); {len(cfg.evaluate.seeds)} head seeds each", flush=True)
        _, others = run_studies(plans, cfg, self.tracker, cache, extra_jobs=tuple(extra), prefetch=self.prefetch)
        for s in others:
            print(format_row(s))

    def search(self) -> Optional[str]:
        from avssl.tune.driver import print_result, run_search
        from avssl.tune.space import load_space

        spec = self.recipe.search
        overrides = [f"data.corpus={self.cfg.data.corpus}", f"train.storage_path={self.cfg.train.storage_path}",
                     f"tracking.experiment={self.cfg.tracking.experiment}"] + [f"evaluate.corpora.{t}={p}" for t, p in self.cfg.evaluate.corpora.items()]
        if self.cfg.tracking.uri:
            overrides.append(f"tracking.uri={self.cfg.tracking.uri}")
        space, base = load_space(spec.space, overrides + spec.overrides)
        res = run_search(space, base, name=f"{self.recipe.name}-{space.name}")
        self.tracker.set_tags(res.parent_run_id, self.tags)
        print_result(res, space, self.tracker.uri)
        return res.parent_run_id

    def report(self, search_run: Optional[str]) -> dict[str, Any]:
        from avssl.evaluate.report import build_report

        cfg = self.cfg.model_copy(deep=True)
        cfg.report.search_run = search_run
        return build_report(cfg, self.tracker, parent_run_id=self.parent_id)

    # -- all of it --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from avssl.evaluate.report import claims_summary

        t_all = time.perf_counter()
        synth = self.recipe.synth and Path(self.cfg.data.corpus).resolve().is_relative_to(Path(self.cfg.synth.out).resolve())
        if self.recipe.synth and not synth:
            print(f"data.corpus {self.cfg.data.corpus} is not under synth.out: the recipe's synthetic corpora are not generated")
        steps = [s for s in ("synth", "pretrain", "evaluate", "search", "report") if s != "synth" or synth]
        n = len(steps)
        print(f"recipe '{self.recipe.name}': MLflow parent run {self.parent_id}" + (" (resuming)" if self.resumed else ""), flush=True)
        try:
            encoders: list[Encoder] = []
            search_run = None
            for i, name in enumerate(steps, 1):
                if name == "synth":
                    t = self.step(f"{i}/{n} synthetic corpora: an unlabelled pretraining pool and one labelled corpus per task, speakers disjoint")
                    self.synth()
                elif name == "pretrain":
                    t = self.step(f"{i}/{n} pretraining ({', '.join(self.recipe.pretrain.objectives) if self.recipe.pretrain else 'none'}) on {self.cfg.data.corpus}")
                    encoders = self.pretrain()
                elif name == "evaluate":
                    t = self.step(f"{i}/{n} evaluation on the downstream corpora")
                    if self.recipe.evaluate or self.recipe.noise or self.recipe.datasize:
                        self.evaluate(encoders)
                elif name == "search":
                    t = self.step(f"{i}/{n} search")
                    if self.recipe.search:
                        search_run = self.search()
                    else:
                        print("  none in this recipe")
                else:
                    t = self.step(f"{i}/{n} report (from MLflow)")
                    report = self.report(search_run)
                self.timings[name] = time.perf_counter() - t
        except BaseException:
            self.tracker.end_run(self.parent_id, "FAILED")
            raise
        total = time.perf_counter() - t_all
        self.tracker.log_metrics(self.parent_id, {f"time/{k}_s": v for k, v in self.timings.items()} | {"time/total_s": total})
        self.tracker.end_run(self.parent_id, "FINISHED")
        for section in report["sections"]:
            print(section)
        print(f"recipe '{self.recipe.name}' finished in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in self.timings.items())})")
        if report["claims"]:
            print("the paper's claims on this run:\n" + claims_summary(report["claims"]))
        print(f"report: {report['out']}/report.md ({len(report['figures'])} figures); MLflow parent run {self.parent_id}")
        print(f"browse everything: {mlflow_ui_hint(self.tracker.uri, self.tracker.experiment_id)}")
        return {"report": report, "timings": self.timings, "total_s": total, "parent_run_id": self.parent_id}


def experiment_command(path: str, config: Optional[str], overrides: list[str]) -> int:
    recipe = load_recipe(path)
    cfg = recipe_config(recipe, config, overrides)
    RecipeRun(recipe, cfg).run()
    return 0
