"""The MLflow side that runs in parallel: corpora recorded as datasets by runs started side by side."""

import threading

from avssl.data.corpus import Corpus
from avssl.tracking import Tracker


def test_runs_started_together_record_the_same_corpus_without_failing(tmp_path, synth_corpus):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "avssl")
    corpus = Corpus(synth_corpus)
    runs = [tracker.start_run(f"r{i}", {"avssl.kind": "pretrain"}) for i in range(4)]
    start, errors = threading.Barrier(len(runs)), []

    def record(run_id: str) -> None:
        start.wait()
        try:
            Tracker(tracker.uri, "avssl").log_corpus(run_id, corpus, "pretraining")
        except Exception as e:  # the test fails on any
            errors.append(e)

    threads = [threading.Thread(target=record, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for run_id in runs:
        inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [(corpus.name, corpus.digest())]


def test_encoders_registered_in_two_stores_from_one_process_each_land_in_their_own(tmp_path):
    """MLflow keeps one registry URI per process: registering into a second store must neither
    reach for the first one nor leave the process pointed at it."""
    from avssl.config.schema import AudioEncoderConfig
    from avssl.models import build_audio_encoder
    from avssl.models.pretrain import save_encoder

    cfg = AudioEncoderConfig(gru_hidden=8)
    encoder_file = save_encoder(build_audio_encoder(cfg), cfg, tmp_path / "encoder.pt")
    versions = []
    for store in ("a", "b"):
        tracker = Tracker(f"sqlite:///{tmp_path / f'{store}.db'}", "avssl")
        run_id = tracker.start_run(store, {"avssl.kind": "pretrain"})
        versions.append(tracker.register_encoder(run_id, encoder_file, f"enc-{store}", aliases=["newest"]))
        path, mv = tracker.registered_encoder(f"models:/enc-{store}@newest")
        assert path.is_file() and str(mv.version) == "1"
    assert versions == ["1", "1"]
    b = Tracker(f"sqlite:///{tmp_path / 'b.db'}", "avssl").client
    assert [m.name for m in b.search_registered_models()] == ["enc-b"]


def test_sync_sends_the_buffer_now_and_never_waits_on_a_dead_store(tmp_path):
    """What a training process logged before a checkpoint is in the store when sync returns (a
    node may die right after); an unreachable store makes sync return at once."""
    import time

    from avssl.tracking import RunLogger
    from avssl.runtime import free_port

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "avssl")
    run_id = tracker.start_run("r", {"avssl.kind": "pretrain"})
    logger = RunLogger(tracker.uri, run_id, flush_every_s=3600)
    logger.metrics({"resumed_from_step": 4}, 4)
    assert logger.sync(timeout_s=30)
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "resumed_from_step")] == [(4, 4.0)]
    logger.close()

    dead = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, flush_every_s=0.2, connect_now=False)
    dead.metrics({"train/loss": 1.0}, 1)
    deadline = time.time() + 60
    while not dead.failures and time.time() < deadline:  # the sender has met the dead store once
        time.sleep(0.1)
    t0 = time.perf_counter()
    assert dead.sync(timeout_s=30) is False and time.perf_counter() - t0 < 1.0
    assert dead.close(timeout_s=1)["lost"] == 1


def test_registering_leaves_mlflows_process_wide_uris_as_they_were(tmp_path, monkeypatch):
    import os

    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    from avssl.config.schema import AudioEncoderConfig
    from avssl.models import build_audio_encoder
    from avssl.models.pretrain import save_encoder

    monkeypatch.setattr(tracking_state, "_tracking_uri", None)
    monkeypatch.setattr(registry_state, "_registry_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    cfg = AudioEncoderConfig(gru_hidden=8)
    encoder_file = save_encoder(build_audio_encoder(cfg), cfg, tmp_path / "encoder.pt")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "avssl")
    tracker.register_encoder(tracker.start_run("r", {"avssl.kind": "pretrain"}), encoder_file, "enc")
    tracker.registered_encoder("models:/enc/1")
    assert tracking_state._tracking_uri is None and registry_state._registry_uri is None
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    # A client made afterwards for another store reads that store's registry
    other = f"sqlite:///{tmp_path / 'other.db'}"
    Tracker(other, "avssl")
    assert mlflow.MlflowClient(other).search_registered_models() == []


def test_the_report_lists_trials_that_vary_different_fields(tmp_path):
    """A grid whose bundles set different fields (scratch trials have no pretraining fraction):
    every trial gets a row, '-' where it did not set a field."""
    from avssl.evaluate.report import search_table

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "avssl")
    parent = tracker.start_run("grid", {"avssl.kind": "search", "avssl.metric": "downstream/val_uar", "avssl.mode": "max"})
    for i, (params, value) in enumerate([({"space.trial.encoder": "pretrained", "space.data.pretrain_fraction": 0.5}, 0.4),
                                         ({"space.trial.encoder": "scratch"}, 0.3)]):
        trial = tracker.start_run(f"t{i}", {"avssl.kind": "trial", "avssl.trial_id": f"t{i}"}, params, parent_id=parent)
        tracker.log_metrics(trial, {"best/downstream/val_uar": value, "best/downstream/val_uar_se": 0.03, "epoch": 1})
    (tmp_path / "report" / "figures").mkdir(parents=True)
    text = search_table(tracker, tmp_path / "report", parent)
    rows = [line for line in text.splitlines() if line.startswith("| t") and not line.startswith("| trial")]
    assert len(rows) == 2 and "scratch" in rows[1] and "| - |" in rows[1], text


def test_temporary_files_are_removed_once_sent_and_at_exit(tmp_path):
    """Figures, downloaded artifacts and exported encoders go to a per-process scratch folder: a
    rendered figure is removed once uploaded, and the folder itself when the process exits (repeated
    runs used to leave one temporary folder per figure and per download behind)."""
    import os
    import subprocess
    import sys

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from avssl import scratch
    from avssl.tracking import RunLogger

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "avssl")
    run_id = tracker.start_run("r", {"avssl.kind": "pretrain"})
    logger = RunLogger(tracker.uri, run_id, flush_every_s=3600, fallback_dir=tmp_path / "unsent")
    fig = plt.figure()
    logger.figure(fig, "figs/a.png")
    (rendered,) = logger._rendered
    assert os.path.exists(rendered)
    assert logger.sync(timeout_s=30)
    assert not os.path.exists(rendered), "an uploaded figure's temporary file is removed"
    assert [a.path for a in tracker.client.list_artifacts(run_id, "figs")] == ["figs/a.png"]
    downloaded = tracker.download(run_id, "figs/a.png")
    assert downloaded.is_file() and scratch._ROOTS[os.getpid()] in downloaded.parents
    logger.close()

    code = "from avssl import scratch; d = scratch.folder('x-'); (d / 'f').write_text('1'); print(d)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out and not os.path.exists(out) and not os.path.exists(os.path.dirname(out))
