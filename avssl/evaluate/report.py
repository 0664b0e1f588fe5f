"""`avssl report`: paper-style tables and figures, read from MLflow (not from local files).

Tables (Markdown + CSV): methods x tasks, methods x SNR, methods x data fraction, and a search's
trials when one is given or found. Figures are redrawn from the logged metrics and the studies'
own figures are downloaded next to them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

import numpy as np

from avssl.config.schema import Config
from avssl.evaluate.tasks import TASKS
from avssl.tracking import Tracker

KIND_ORDER = {"pretrained": 0, "scratch": 1, "mfcc": 2, "logmel": 3}


def _cell(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}"


def _latest(runs: list[Any], key) -> dict[Any, Any]:
    """The most recent finished run per key."""
    out: dict[Any, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        if r.info.status == "FINISHED":
            out[key(r)] = r
    return out


def _method_order(runs: dict[Any, Any]) -> list[str]:
    kinds = {}
    for r in runs.values():
        kinds[r.data.tags.get("avssl.method")] = r.data.tags.get("avssl.method_kind", "pretrained")
    return sorted(kinds, key=lambda m: (KIND_ORDER.get(kinds[m], 9), m))


def write_table(path: Path, header: list[str], rows: list[list[str]], title: str) -> str:
    md = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    path.with_suffix(".md").write_text(text)
    with path.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return text


def main_table(tracker: Tracker, out: Path) -> tuple[str, dict[str, Any]]:
    runs = tracker.find_runs({"avssl.kind": "evaluate"})
    # Plain evaluations, and noise-study heads trained on clean audio (the same protocol), at 100% labels.
    runs = [
        r for r in runs
        if r.data.tags.get("avssl.label_fraction") == "1"
        and (r.data.tags.get("avssl.study") is None or (r.data.tags.get("avssl.study") == "noise" and r.data.tags.get("avssl.train_with_noise") == "false"))
    ]
    latest = _latest(runs, lambda r: (r.data.tags["avssl.method"], r.data.tags["avssl.task"]))
    if not latest:
        return "", {}
    tasks = sorted({t for _, t in latest}, key=lambda t: ["emotion", "word", "affect"].index(t) if t in ("emotion", "word", "affect") else 9)
    methods = _method_order(latest)
    header = ["method"] + [f"{t} ({TASKS.get(t).primary})" for t in tasks]
    rows, data = [], {}
    for m in methods:
        row = [m]
        for t in tasks:
            r = latest.get((m, t))
            p = TASKS.get(t).primary
            mean = r.data.metrics.get(f"test/{p}_mean") if r else None
            std = r.data.metrics.get(f"test/{p}_std") if r else None
            row.append(_cell(mean, std))
            data[(m, t)] = (mean, std)
        rows.append(row)
    seeds = {r.data.tags.get("avssl.seeds", "") for r in latest.values()}
    title = f"Methods x tasks (test, mean ± std over seeds {', '.join(sorted(seeds))}; head: {', '.join(sorted({r.data.tags.get('avssl.head', '') for r in latest.values()}))})"
    text = write_table(out / "methods_x_tasks", header, rows, title)
    _bars(out / "figures" / "methods_x_tasks.png", methods, tasks, data)
    return text, {"methods": methods, "tasks": tasks, "cells": data}


def _bars(path: Path, methods: list[str], tasks: list[str], data: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        means = [data.get((m, t), (None, None))[0] or 0 for m in methods]
        stds = [data.get((m, t), (None, None))[1] or 0 for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3)
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{t} ({TASKS.get(t).primary})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latest_study(tracker: Tracker, study: str) -> Optional[Any]:
    runs = [r for r in tracker.find_runs({"avssl.kind": "study", "avssl.study": study}) if r.info.status == "FINISHED"]
    return runs[-1] if runs else None


def _download_figures(tracker: Tracker, run_id: str, out: Path) -> list[str]:
    got = []
    for a in tracker.client.list_artifacts(run_id):
        if a.path.endswith(".png"):
            got.append(str(tracker.download(run_id, a.path, out / "figures")))
    return got


def noise_table(tracker: Tracker, out: Path) -> str:
    study = _latest_study(tracker, "noise")
    if study is None:
        return ""
    children = tracker.find_runs({"avssl.study_run_id": study.info.run_id})
    latest = _latest(children, lambda r: r.data.tags["avssl.method"])
    task = study.data.tags.get("avssl.task", "emotion")
    p = TASKS.get(task).primary
    snrs = study.data.params.get("study.noise.snrs", "")
    conds = ["clean"]
    for kind in ("white", "babble"):
        conds += sorted({k.split("/")[1] for r in latest.values() for k in r.data.metrics if k.startswith(f"noise/{kind}_")},
                        key=lambda c: -float(c.split("_")[1].rstrip("dB")))
    header = ["method"] + conds
    rows = []
    for m in _method_order(latest):
        r = latest[m]
        row = [m]
        for c in conds:
            prefix = "test/" if c == "clean" else f"noise/{c}/"
            row.append(_cell(r.data.metrics.get(f"{prefix}{p}_mean"), r.data.metrics.get(f"{prefix}{p}_std")))
        rows.append(row)
    _download_figures(tracker, study.info.run_id, out)
    return write_table(out / "methods_x_snr", header, rows, f"Methods x SNR ({task}, test {p}; SNRs {snrs}; study run {study.info.run_id})")


def datasize_table(tracker: Tracker, out: Path) -> str:
    study = _latest_study(tracker, "datasize")
    if study is None:
        return ""
    children = tracker.find_runs({"avssl.study_run_id": study.info.run_id})
    latest = _latest(children, lambda r: (r.data.tags["avssl.method"], float(r.data.tags["avssl.label_fraction"])))
    fractions = sorted({f for _, f in latest})
    task = study.data.tags.get("avssl.task", "emotion")
    p = TASKS.get(task).primary
    header = ["method"] + [f"{100 * f:g}% labels" for f in fractions] + [f"gap at {100 * fractions[0]:g}%", f"gap at {100 * fractions[-1]:g}%"]
    rows = []
    methods = sorted({m for m, _ in latest}, key=lambda m: (KIND_ORDER.get(next(r for (mm, _), r in latest.items() if mm == m).data.tags.get("avssl.method_kind"), 9), m))
    for m in methods:
        row = [m]
        for f in fractions:
            r = latest.get((m, f))
            row.append(_cell(r.data.metrics.get(f"test/{p}_mean"), r.data.metrics.get(f"test/{p}_std")) if r else "-")
        for f in (fractions[0], fractions[-1]):
            r = latest.get((m, f))
            row.append(_cell(r.data.metrics.get("overfit/gap_mean"), r.data.metrics.get("overfit/gap_std")) if r else "-")
        rows.append(row)
    _download_figures(tracker, study.info.run_id, out)
    return write_table(out / "methods_x_fraction", header, rows, f"Methods x labelled-data fraction ({task}, test {p}; gap = best train - best val; study run {study.info.run_id})")


def search_table(tracker: Tracker, out: Path, search_run: Optional[str]) -> str:
    if search_run:
        parent = tracker.get_run(search_run)
    else:
        parents = [r for r in tracker.find_runs({"avssl.kind": "search"}) if r.info.status in ("FINISHED", "RUNNING")]
        if not parents:
            return ""
        parent = parents[-1]
    trials = tracker.find_runs({"avssl.kind": "trial"}, parent_id=parent.info.run_id)
    if not trials:
        return ""
    metric = parent.data.tags.get("avssl.metric", "probe/val_uar")
    mode = parent.data.tags.get("avssl.mode", "max")
    varied = sorted({k for t in trials for k in t.data.params if k.startswith("space.")})
    rows = []
    for t in trials:
        value = t.data.metrics.get(f"best/{metric}")
        rows.append((value, [t.data.tags.get("avssl.trial_id", "?"), t.data.tags.get("avssl.trial_status", t.info.status)]
                     + [t.data.params[k] for k in varied] + [f"{value:.4f}" if value is not None else "-",
                     f"{t.data.metrics.get('epoch', float('nan')):.0f}"]))
    rows.sort(key=lambda x: (x[0] is None, -(x[0] or 0) if mode == "max" else (x[0] or 0)))
    header = ["trial", "status"] + [k[len("space."):] for k in varied] + [f"best {metric}", "epochs"]
    _download_figures(tracker, parent.info.run_id, out)
    return write_table(out / "search", header, [r for _, r in rows], f"Search '{parent.data.tags.get('avssl.search_name', parent.info.run_name)}' ({len(trials)} trials, {mode} {metric}; run {parent.info.run_id})")


def build_report(cfg: Config, tracker: Optional[Tracker] = None) -> dict[str, Any]:
    tracker = tracker or Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root, timeout=cfg.tracking.connect_timeout_s)
    out = Path(cfg.report.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    main, data = main_table(tracker, out)
    sections = [s for s in (main, noise_table(tracker, out), datasize_table(tracker, out), search_table(tracker, out, cfg.report.search_run)) if s]
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    text = f"# avssl report\n\nExperiment '{tracker.experiment_name}' in {tracker.uri}\n\n" + "\n".join(sections)
    if figures:
        text += "\n### Figures\n\n" + "\n".join(f"![{f}](figures/{f})" for f in figures) + "\n"
    (out / "report.md").write_text(text)
    return {"out": str(out), "main": main, "sections": sections, "data": data, "figures": figures}


def report_command(cfg: Config) -> int:
    r = build_report(cfg)
    if not r["sections"]:
        print("no finished evaluations or studies in MLflow yet: run `avssl evaluate` or `avssl study` first")
        return 1
    print(r["main"] or r["sections"][0])
    print(f"report with {len(r['sections'])} tables and {len(r['figures'])} figures: {r['out']}/report.md")
    return 0
