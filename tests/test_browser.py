"""The MLflow UI in a real browser (Debian's chromium, headless, all on 127.0.0.1), over a small
store written by avssl's own tracking code: the experiment opens on its runs, pretraining runs are
listed with their evaluations nested under them, and the Dataset column names the corpora."""

from __future__ import annotations

import re

import pytest

from scripts.browser import dump_dom, ensure_chromium, mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def make_store(root, corpus) -> tuple[str, list[str], list[str]]:
    from avssl.data.corpus import Corpus
    from avssl.tracking import Tracker

    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", "avssl", artifact_root=str(root / "mlruns"))
    pool = Corpus(corpus)
    pretrain, evals = [], []
    for objective in ("visual", "av"):
        run_id = tracker.start_run(f"pretrain-{objective}", {"avssl.kind": "pretrain", "avssl.objective": objective})
        tracker.log_corpus(run_id, pool, "pretraining")
        tracker.log_metrics(run_id, {"train/loss": 1.0, "probe/val_uar": 0.3})
        tracker.end_run(run_id)
        pretrain.append(f"pretrain-{objective}")
        child = tracker.start_run(f"eval-{objective}-emotion", {"avssl.kind": "evaluate", "avssl.task": "emotion"}, parent_id=run_id)
        tracker.log_corpus(child, pool, "evaluation")
        tracker.log_metrics(child, {"test/uar": 0.25})
        tracker.end_run(child)
        evals.append(f"eval-{objective}-emotion")
    return tracker.experiment_id, pretrain, evals


def test_the_runs_page_lists_pretrainings_with_nested_evaluations_and_datasets(tmp_path, synth_corpus):
    from avssl.data.corpus import Corpus
    from avssl.tracking import runs_page_url

    ensure_chromium()
    experiment_id, pretrain, evals = make_store(tmp_path, synth_corpus)
    corpus = Corpus(synth_corpus)
    with mlflow_server(tmp_path / "mlflow.db", tmp_path / "mlruns") as url:
        page = runs_page_url(url, experiment_id)
        dom = dump_dom(page, tmp_path / "profile")
    title = re.search(r"<title>([^<]*)</title>", dom).group(1)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<style[^>]*>.*?</style>", " ", dom, flags=re.S)))
    table = text[text.find("Run Name"):]
    print(f"{page}\n  title: {title}\n  table: {table[:400]}")
    assert title.startswith("Runs - "), f"the experiment opened on '{title}', not on its runs"
    for name in pretrain:
        assert name in table, f"pretraining run {name} not listed"
    for name in evals:
        assert name not in table, f"evaluation {name} is a top-level row, not nested under its pretraining"
    assert f"{len(pretrain) + len(evals)} matching runs" in table
    expanders = dom.count("runnamecellrenderer.tsx_46")  # the +/- button of a row with child runs
    assert expanders == len(pretrain), f"{expanders} expandable rows, expected one per pretraining"
    assert f"{corpus.name} ({corpus.digest()}) pretraining" in table, "the Dataset column does not name the corpus"
