"""`avssl report`: paper-style tables, paired differences, the paper's claims and figures, read
from MLflow (not from local files).

Every cell carries a 95 % interval and every comparison is a paired difference over the same test
clips and noise (see `avssl.evaluate.stats`); differences whose interval excludes 0 are marked
resolved. Tables name their corpus and the head setting (head, layer, frozen or fine-tuned).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

from avssl.config.schema import Config
from avssl.evaluate.claims import Claim, judge
from avssl.evaluate.results import Cell, Record, Results, objective_cells
from avssl.evaluate.stats import Interval, format_difference, format_interval
from avssl.evaluate.tasks import TASKS
from avssl.tracking import Tracker

TASK_ORDER = ["emotion", "word", "affect"]


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


def _cell_text(iv: Optional[Interval]) -> str:
    return "-" if iv is None else format_interval(iv)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _setting_name(setting: tuple[str, str, str]) -> str:
    head, layer, mode = setting
    return f"{head} head, {mode}" + (f", layer {layer}" if layer not in ("-", "last") else "")


def _task_sort(t: str) -> tuple:
    return (TASK_ORDER.index(t) if t in TASK_ORDER else 9, t)


# -- main results ------------------------------------------------------------------------------
def main_tables(res: Results, out: Path) -> tuple[list[str], dict[str, Any]]:
    records = res.main_records()
    settings = sorted({r.setting for r in records if r.setting[1] != "-"}) or sorted({r.setting for r in records})
    texts, data = [], {}
    for k, setting in enumerate(settings):
        rs = [r for r in records if r.in_setting(setting)]
        columns = sorted({(r.task, r.corpus) for r in rs}, key=lambda tc: (_task_sort(tc[0]), tc[1]))
        methods: list[str] = []
        for r in rs:
            if r.method not in methods:
                methods.append(r.method)
        header = ["method"] + [f"{t} ({TASKS.get(t).primary}) on {c}" for t, c in columns]
        rows = []
        for m in methods:
            row = [m]
            for t, c in columns:
                rec = next((r for r in rs if r.method == m and r.task == t and r.corpus == c), None)
                iv = res.interval(Cell(m, [rec]), rec.primary) if rec else None
                data[(m, t, c, setting)] = iv
                row.append(_cell_text(iv))
            rows.append(row)
        suffix = "" if k == 0 else f"_{k + 1}"
        title = f"Methods x tasks, test, 95 % intervals ({_setting_name(setting)}; seeds {', '.join(sorted({r.tags.get('avssl.seeds', '') for r in rs}))})"
        texts.append(write_table(out / f"methods_x_tasks{suffix}", header, rows, title))
        texts.append(differences_table(res, rs, columns, out / f"differences{suffix}", setting))
    return texts, data


COMPARISONS = [("av", "scratch"), ("audio", "scratch"), ("visual", "scratch"), ("av", "mfcc"), ("audio", "mfcc"), ("visual", "mfcc"),
               ("av", "logmel"), ("audio", "logmel"), ("visual", "logmel"), ("av", "audio"), ("av", "visual"), ("audio", "visual")]


def differences_table(res: Results, records: list[Record], columns: list[tuple[str, str]], path: Path, setting) -> str:
    rows, forest = [], []
    per_column = {tc: objective_cells([r for r in records if (r.task, r.corpus) == tc]) for tc in columns}
    for a, b in COMPARISONS:
        row, any_ = [f"{a} - {b}"], False
        for tc in columns:
            cells = per_column[tc]
            iv = res.difference(cells[a], cells[b], TASKS.get(tc[0]).primary) if a in cells and b in cells else None
            row.append("-" if iv is None else format_difference(iv))
            if iv is not None:
                any_ = True
                forest.append((f"{tc[0]}: {a} - {b}", iv))
        if any_:
            rows.append(row)
    if not rows:
        return ""
    from avssl.evaluate.stat_figures import forest_plot

    _save(forest_plot(forest, f"paired differences ({_setting_name(setting)})", "difference in the task's metric"), path.parent / "figures" / f"{path.name}.png")
    header = ["difference"] + [f"{t} ({TASKS.get(t).primary}) on {c}" for t, c in columns]
    return write_table(path, header, rows, f"Paired differences (same test clips; resolved = the 95 % interval excludes 0; {_setting_name(setting)})")


# -- studies -----------------------------------------------------------------------------------
def _latest_study(tracker: Tracker, study: str, parent: Optional[tuple[str, str]]) -> Optional[Any]:
    query = {"avssl.kind": "study", "avssl.study": study}
    if parent:
        query[parent[0]] = parent[1]
    runs = [r for r in tracker.find_runs(query) if r.info.status == "FINISHED"]
    return runs[-1] if runs else None


def _study_records(res: Results, study_id: str) -> list[Record]:
    out: dict[tuple, Record] = {}
    for r in res.records:
        if r.tags.get("avssl.study_run_id") == study_id:
            out[(r.method, r.fraction)] = r
    return sorted(out.values(), key=lambda r: (r.kind != "pretrained", r.method, r.fraction))


def _cond_sort(c: str) -> tuple:
    if c == "clean":
        return (0, "", 0.0)
    kind, snr = c.rsplit("_", 1)
    return (1, kind, -float(snr.rstrip("dB")))


def _study(res: Results, tracker: Tracker, kind: str, parent) -> tuple[Any, list]:
    """The latest study of this kind (under the recipe's parent run, if any) and its evaluations."""
    study = _latest_study(tracker, kind, parent)
    return study, (_study_records(res, study.info.run_id) if study is not None else [])


def noise_section(res: Results, tracker: Tracker, out: Path, parent) -> str:
    study, recs = _study(res, tracker, "noise", parent)
    if not recs:
        return ""
    task, corpus, metric = recs[0].task, recs[0].corpus, recs[0].primary
    conds = sorted({c for r in recs for c in r.conditions()}, key=_cond_sort)
    header = ["method"] + conds
    rows, series = [], {}
    for r in recs:
        ivs = [res.interval(Cell(r.method, [r], c), metric) for c in conds]
        rows.append([r.method] + [_cell_text(iv) for iv in ivs])
        series[r.method] = ivs
    text = write_table(out / "methods_x_snr", header, rows, f"Methods x noise condition ({task} on {corpus}, test {metric}, 95 % intervals; study run {study.info.run_id})")
    snr_lines = []
    arrays = recs[0].arrays() or {}
    for c in conds:
        if f"snr/{c}" in arrays:
            v = arrays[f"snr/{c}"]
            snr_lines.append(f"{c}: {v.mean():.2f} dB (min {v.min():.2f}, max {v.max():.2f})")
    if snr_lines:
        text += f"\nSNR each of the {len(arrays['y_true'])} test clips got, measured over its own length: " + "; ".join(snr_lines) + "\n"
    from avssl.evaluate.stat_figures import band_plot

    kinds = sorted({c.rsplit("_", 1)[0] for c in conds if c != "clean"})
    for kind in kinds:
        cs = ["clean"] + [c for c in conds if c.startswith(kind + "_")]
        idx = [conds.index(c) for c in cs]
        labels = ["clean"] + [c.rsplit("_", 1)[1] for c in cs[1:]]
        _save(band_plot(labels, {m: [v[i] for i in idx] for m, v in series.items()}, "SNR", f"test {metric}", f"{task} with {kind} noise ({corpus})"),
              out / "figures" / f"snr_{kind}.png")
    cells = {c: objective_cells(recs, c) for c in conds}
    diff_rows = []
    for a, b in (("av", "audio"), ("av", "visual"), ("av", "scratch"), ("audio", "scratch"), ("visual", "scratch"), ("av", "mfcc")):
        if a in cells[conds[0]] and b in cells[conds[0]]:
            diff_rows.append([f"{a} - {b}"] + ["-" if (iv := res.difference(cells[c][a], cells[c][b], metric)) is None else format_difference(iv) for c in conds])
    if diff_rows:
        text += "\n" + write_table(out / "differences_x_snr", ["difference"] + conds, diff_rows, f"Paired differences at each noise condition ({task}, same noisy clips for both methods)")
    return text


def datasize_section(res: Results, tracker: Tracker, out: Path, parent) -> str:
    study, recs = _study(res, tracker, "datasize", parent)
    if not recs:
        return ""
    task, corpus, metric = recs[0].task, recs[0].corpus, recs[0].primary
    fractions = sorted({r.fraction for r in recs})
    methods: list[str] = []
    for r in recs:
        if r.method not in methods:
            methods.append(r.method)
    rows, series = [], {}
    for m in methods:
        ivs, gaps = [], []
        for f in fractions:
            r = next((x for x in recs if x.method == m and x.fraction == f), None)
            ivs.append(res.interval(Cell(m, [r]), metric) if r else None)
            g = r.arrays().get("gap") if r is not None and r.arrays() is not None else None
            gaps.append("-" if g is None else f"{g.mean():.2f}")
        series[m] = ivs
        rows.append([m] + [_cell_text(iv) for iv in ivs] + [" / ".join(gaps)])
    header = ["method"] + [f"{100 * f:g}% labels" for f in fractions] + ["overfitting gap (best train - best val) per fraction"]
    text = write_table(out / "methods_x_fraction", header, rows, f"Methods x labelled-data fraction ({task} on {corpus}, test {metric}, 95 % intervals; study run {study.info.run_id})")
    from avssl.evaluate.stat_figures import band_plot

    _save(band_plot([f"{100 * f:g}%" for f in fractions], series, "labelled training data", f"test {metric}", f"{task}: data fraction ({corpus})"), out / "figures" / "fraction.png")
    diff_rows = []
    for a in ("av", "audio", "visual"):
        for b in ("scratch", "mfcc"):
            row, any_ = [f"{a} - {b}"], False
            for f in fractions:
                cells = objective_cells([r for r in recs if r.fraction == f])
                iv = res.difference(cells[a], cells[b], metric) if a in cells and b in cells else None
                any_ = any_ or iv is not None
                row.append("-" if iv is None else format_difference(iv))
            if any_:
                diff_rows.append(row)
    if diff_rows:
        text += "\n" + write_table(out / "differences_x_fraction", ["difference"] + [f"{100 * f:g}%" for f in fractions], diff_rows, f"Paired differences at each label fraction ({task})")
    return text


# -- claims ------------------------------------------------------------------------------------
def claims_section(claims: list[Claim], out: Path) -> str:
    from avssl.evaluate.stat_figures import forest_plot

    lines = ["### The paper's claims on this run", "",
             "A claim is *supported* when each of its primary differences is resolved in its favour (95 % interval "
             "above 0), *contradicted* when any is resolved against it, *unresolved* otherwise.", ""]
    for c in claims:
        lines.append(f"**{c.number}. {c.text}: {c.verdict.upper()}**" + (f" ({c.note})" if c.note else ""))
        for label, iv in c.primary:
            lines.append(f"- {label}: {format_difference(iv)}")
        for label, iv in c.context:
            lines.append(f"- context, {label}: {format_difference(iv)}")
        lines.append("")
        rows = c.primary + [(f"(context) {l}", iv) for l, iv in c.context]
        if rows:
            _save(forest_plot(rows, f"claim {c.number}: {c.verdict}", "difference"), out / "figures" / f"claim_{c.number}.png")
    text = "\n".join(lines) + "\n"
    (out / "claims.md").write_text(text)
    return text


def claims_summary(claims: list[Claim]) -> str:
    return "\n".join(f"  claim {c.number} ({c.text}): {c.verdict}" for c in claims)


def _download_figures(tracker: Tracker, run_id: str, out: Path) -> list[str]:
    got = []
    for a in tracker.client.list_artifacts(run_id):
        if a.path.endswith(".png"):
            got.append(str(tracker.download(run_id, a.path, out / "figures")))
    return got


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
        se = t.data.metrics.get(f"best/{metric}_se")
        cell = "-" if value is None else f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")
        rows.append((value, [t.data.tags.get("avssl.trial_id", "?"), t.data.tags.get("avssl.trial_status", t.info.status)]
                     + [t.data.params.get(k, "-") for k in varied] + [cell,
                     f"{t.data.metrics.get('epoch', float('nan')):.0f}"]))
    rows.sort(key=lambda x: (x[0] is None, -(x[0] or 0) if mode == "max" else (x[0] or 0)))
    header = ["trial", "status"] + [k[len("space."):] for k in varied] + [f"best {metric} ± SE", "epochs"]
    figures = _download_figures(tracker, parent.info.run_id, out)
    m = parent.data.metrics
    note = (f"Tie rate {m['search/tie_rate']:.0%} of finished trials; best-vs-worst spread {m.get('search/spread', float('nan')):.4f}"
            + (f"; the best leads the runner-up by {m['search/lead_over_runner_up_in_se']:.1f} SE" if "search/lead_over_runner_up_in_se" in m else "")
            + ". SE: bootstrap over the metric's validation clips.\n") if "search/tie_rate" in m else ""
    grid = "".join(f"\n![search grid](figures/{Path(f).name})\n" for f in figures if Path(f).name == "search_grid.png")
    return write_table(out / "search", header, [r for _, r in rows], f"Search '{parent.data.tags.get('avssl.search_name', parent.info.run_name)}' ({len(trials)} trials, {mode} {metric}; run {parent.info.run_id})") + note + grid


def build_report(cfg: Config, tracker: Optional[Tracker] = None, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """The report of every finished evaluation in the experiment, or of one recipe's (its parent run)."""
    tracker = tracker or Tracker.from_config(cfg.tracking)
    out = Path(cfg.report.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for old in (out / "figures").glob("*.png"):
        old.unlink()
    parent_run_id = parent_run_id or cfg.report.run
    parent = ("avssl.recipe_run_id", parent_run_id) if parent_run_id else None
    res = Results.load(tracker, parent, n_boot=cfg.report.bootstrap, unit=cfg.report.bootstrap_unit)
    main, data = main_tables(res, out)
    claims = judge(res, cfg.report.claims_task) if res.records else []
    claims_text = claims_section(claims, out) if claims else ""
    sections = [s for s in main + [noise_section(res, tracker, out, parent), datasize_section(res, tracker, out, parent),
                                   claims_text, search_table(tracker, out, cfg.report.search_run)] if s]
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    units = sorted({res.unit_of(r.arrays()["speakers"]) for r in res.records[-50:] if r.arrays() is not None})
    method = (f"Intervals: 95 % percentile bootstrap, {cfg.report.bootstrap} resamples, over head seeds (and pretrained encoders of "
              f"one objective, stacked as seeds) x {' / '.join(units) or 'test clips'}; differences are paired over the same test clips "
              f"and noise. Resolved = the interval excludes 0.")
    text = f"# avssl report\n\nExperiment '{tracker.experiment_name}' in {tracker.uri}\n\n{method}\n\n" + "\n".join(sections)
    if figures:
        text += "\n### Figures\n\n" + "\n".join(f"![{f}](figures/{f})" for f in figures) + "\n"
    (out / "report.md").write_text(text)
    report_run = log_report(tracker, out, claims, parent_run_id)
    return {"out": str(out), "main": main[0] if main else "", "sections": sections, "data": data, "figures": figures,
            "claims": claims, "claims_text": claims_text, "run_id": report_run}


def log_report(tracker: Tracker, out: Path, claims: list[Claim], parent_run_id: Optional[str]) -> Optional[str]:
    """The report as an MLflow run (child of the recipe's parent run, if any) with the claims' verdicts
    as tags, on the report run and on the parent run."""
    if not claims:
        return None
    tags = {"avssl.kind": "report"}
    verdicts = {f"avssl.claim{c.number}": c.verdict for c in claims}
    run_id = tracker.start_run("report", {**tags, **verdicts, **({"avssl.recipe_run_id": parent_run_id} if parent_run_id else {})}, parent_id=parent_run_id)
    for c in claims:
        for label, iv in c.primary:
            key = "".join(ch if ch.isalnum() else "_" for ch in label)[:80]
            tracker.log_metrics(run_id, {f"claim{c.number}/{key}": iv.estimate, f"claim{c.number}/{key}_low": iv.low, f"claim{c.number}/{key}_high": iv.high})
    for path in sorted(out.glob("*.md")) + sorted(out.glob("*.csv")):
        tracker.log_artifact(run_id, path)
    for path in sorted((out / "figures").glob("*.png")):
        tracker.log_artifact(run_id, path, "figures")
    tracker.end_run(run_id, "FINISHED")
    if parent_run_id:
        tracker.set_tags(parent_run_id, verdicts)
    return run_id


def report_command(cfg: Config) -> int:
    r = build_report(cfg)
    if not r["sections"]:
        print("no finished evaluations or studies in MLflow yet: run `avssl evaluate` or `avssl study` first")
        return 1
    print(r["main"] or r["sections"][0])
    if r["claims_text"]:
        print(r["claims_text"])
    print(f"report with {len(r['sections'])} tables and {len(r['figures'])} figures: {r['out']}/report.md")
    return 0
