"""`avssl quickstart`: the whole pipeline on the synthetic corpus, end to end.

synth -> pretrain three encoders (visual, audio, av) with Ray Train -> evaluate them and the
baselines (scratch, MFCC) on emotion, word and affect; the emotion heads also face white and babble
noise (the noise study) -> dataset-size study -> a small loss-weight search with Ray Tune -> the
report, read back from MLflow. Rerunning reuses the corpus and the finished pretrainings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from avssl.config.schema import Config
from avssl.tracking import Tracker, mlflow_ui_hint

OBJECTIVES = ("visual", "audio", "av")


def _corpus_matches(synth, seed: int) -> bool:
    meta = Path(synth.out) / "corpus.json"
    if not meta.is_file():
        return False
    gen = json.loads(meta.read_text()).get("generator", {})
    wanted = {"seed": seed, **synth.model_dump(mode="json")}
    return all(gen.get(k) == v for k, v in wanted.items() if k not in ("workers", "baseline", "out", "corpora"))


def _protocol_matches(cfg: Config) -> bool:
    from avssl.data.synthetic.generator import protocol_corpora

    return all(_corpus_matches(one, cfg.seed) for _, one in protocol_corpora(cfg.synth))


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def quickstart_command(cfg: Config, skip_tune: bool = False) -> int:
    from avssl.data.pipeline import synth_command
    from avssl.evaluate.report import build_report
    from avssl.evaluate.runner import EvalJob, TaskDataCache, format_row
    from avssl.evaluate.sources import resolve_sources
    from avssl.evaluate.studies import plan_datasize_study, plan_noise_study, run_studies
    from avssl.train.trainer import pretrain_many

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if not cfg.synth.protocol:
        from avssl.errors import ConfigError

        raise ConfigError("the quick start runs the offline protocol: synth.protocol must be true")
    root = Path(cfg.synth.out)
    cfg = cfg.model_copy(deep=True)
    cfg.data.corpus = str(root / "pool")
    cfg.evaluate.corpora = {**cfg.evaluate.corpora, **{t: str(root / t) for t in ("emotion", "word", "affect") if getattr(cfg.synth.corpora, t).enabled}}
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root, timeout=cfg.tracking.connect_timeout_s)

    t = _step("1/5 synthetic corpora: an unlabelled pretraining pool and one labelled corpus per task, speakers disjoint")
    if _protocol_matches(cfg):
        print(f"reusing {cfg.synth.out} (same generator settings)")
    else:
        synth_command(cfg, overwrite=True)
    timings["synth"] = time.perf_counter() - t

    t = _step("2/5 pretraining on the pool: visual, audio and audio-visual objectives (Ray Train, run side by side)")
    run_cfgs = [
        cfg.model_copy(update={"run_name": f"{cfg.preset}-{objective}", "objective": cfg.objective.model_copy(update={"name": objective})})
        for objective in OBJECTIVES
    ]

    def done(r: Any) -> None:
        print(f"  {r.run_name}: {r.metrics.get('step')} steps, val loss {r.metrics.get('val/loss', float('nan')):.4f}, "
              f"probe UAR {r.metrics.get('probe/val_uar', float('nan')):.3f}, {r.seconds:.0f} s, run {r.run_id}", flush=True)

    encoders = dict(zip(OBJECTIVES, pretrain_many(run_cfgs, on_done=done)))
    timings["pretrain"] = time.perf_counter() - t

    methods = [encoders[o].run_id for o in OBJECTIVES] + ["scratch", "mfcc", "logmel"]
    cache = TaskDataCache(cfg)

    t = _step("3/5 evaluation on the downstream corpora: emotion (with the noise study), word, affect; dataset-size study")
    # Every evaluation job goes out in one batch of Ray tasks: the cores stay busy to the end.
    noise_cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update={"methods": methods, "task": "emotion"})})
    size_cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update={"methods": [encoders["av"].run_id, encoders["audio"].run_id, "scratch", "mfcc"], "task": "emotion"})})
    plans = [plan_noise_study(noise_cfg, tracker, cache), plan_datasize_study(size_cfg, tracker, cache)]
    sources = resolve_sources(methods, cfg, tracker, cfg.seed)
    extra = [EvalJob(source, task) for task in cfg.evaluate.tasks if task != "emotion" for source in sources]
    (noise, _), others = run_studies(plans, cfg, tracker, cache, extra_jobs=tuple(extra))
    for s in others:
        print(format_row(s))
    timings["evaluate"] = time.perf_counter() - t

    search_run = None
    if not skip_tune:
        t = _step("4/5 loss-weight search (Ray Tune, tune_spaces/quick.yaml)")
        from avssl.tune.driver import run_quick_search

        search_run = run_quick_search(cfg)
        timings["tune"] = time.perf_counter() - t
    else:
        _step("4/5 loss-weight search: skipped (--skip-tune)")

    t = _step("5/5 report (from MLflow)")
    report_cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"search_run": search_run})})
    r = build_report(report_cfg, tracker)
    timings["report"] = time.perf_counter() - t
    for section in r["sections"]:
        print(section)
    total = time.perf_counter() - t_start
    print(f"quickstart finished in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"report: {r['out']}/report.md ({len(r['figures'])} figures)")
    print(f"noise study run {noise['run_id']}; pretraining runs: {', '.join(f'{o} {encoders[o].run_id}' for o in OBJECTIVES)}")
    print(f"browse everything: {mlflow_ui_hint(tracker.uri)}")
    return 0
