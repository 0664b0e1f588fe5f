"""Downstream evaluation, studies and the report, on the tiny corpus with a real MLflow store."""

import pytest
from mlflow.tracking import MlflowClient

from avssl.evaluate.report import build_report
from avssl.evaluate.runner import TaskDataCache, evaluate_source
from avssl.evaluate.sources import resolve_source
from avssl.evaluate.studies import datasize_study, noise_study
from avssl.tracking import Tracker
from tests.conftest import tiny_cfg


@pytest.fixture
def setup(workdir, synth_corpus):
    cfg = tiny_cfg(workdir, synth_corpus, "evaluate.seeds=[0,1]", "evaluate.epochs=3")
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    return cfg, tracker, TaskDataCache(cfg)


@pytest.mark.parametrize("task", ["emotion", "word", "affect"])
def test_each_task_is_one_mlflow_run_with_seeds(setup, task):
    cfg, tracker, cache = setup
    s = evaluate_source(resolve_source("mfcc", cfg), task, cfg, tracker, cache)
    run = MlflowClient(tracker.uri).get_run(s.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["avssl.task"] == task
    primary = {"emotion": "uar", "word": "accuracy", "affect": "ccc"}[task]
    assert f"test/{primary}_mean" in run.data.metrics and f"test/{primary}_std" in run.data.metrics
    assert len(MlflowClient(tracker.uri).get_metric_history(s.run_id, "seed1/val_score")) >= 1
    arts = {a.path for a in MlflowClient(tracker.uri).list_artifacts(s.run_id)}
    assert "curves.png" in arts and (("confusion.png" in arts) == (task != "affect"))
    if task == "affect":
        assert "test/ccc_arousal_frames_mean" in run.data.metrics  # per-frame sequences scored too


def test_scratch_trains_the_encoder_and_frozen_sources_do_not(setup, tmp_path):
    import torch

    from avssl.evaluate.downstream import HeadTrainer
    from avssl.models import build_audio_encoder, save_encoder

    cfg, tracker, cache = setup
    data = cache.get("emotion")
    scratch = resolve_source("scratch", cfg, seed=0)
    before = {k: v.clone() for k, v in scratch.module.state_dict().items()}
    trained = []
    fresh = scratch.factory
    scratch.factory = lambda s: trained.append(fresh(s)) or trained[-1]
    HeadTrainer(scratch, data, cfg.evaluate).fit(0)
    init = fresh(0).state_dict()
    changed = [k for k, v in trained[0].state_dict().items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert any("weight" in k for k in changed), "the scratch encoder must learn with its head"
    assert all(torch.equal(before[k], v) for k, v in scratch.module.state_dict().items()), "seeds must train copies"

    path = save_encoder(build_audio_encoder(cfg.model.audio_encoder), cfg.model.audio_encoder, tmp_path / "enc.pt")
    frozen = resolve_source(str(path), cfg)
    before = {k: v.clone() for k, v in frozen.module.state_dict().items()}
    HeadTrainer(frozen, data, cfg.evaluate).fit(0)
    assert not frozen.trainable and all(torch.equal(before[k], v) for k, v in frozen.module.state_dict().items())


def test_early_stopping_waits_for_min_steps(setup):
    """A head whose validation score never improves (a learning rate too small to move it) is
    stopped by patience, but only once it has taken `min_steps` optimiser steps."""
    from avssl.evaluate.downstream import HeadTrainer

    cfg, tracker, cache = setup
    data = cache.get("emotion")
    mfcc = resolve_source("mfcc", cfg)
    batches = -(-len(data.train) // cfg.evaluate.batch_size)
    for min_steps, expected_epochs in ((0, 2), (batches * 7, 7)):
        ev = cfg.evaluate.model_copy(update={"epochs": 20, "patience": 1, "lr": 1e-12, "min_steps": min_steps})
        result = HeadTrainer(mfcc, data, ev).fit(0)
        assert len(result.curves["val_score"]) == expected_epochs, (min_steps, result.curves["val_score"])


def test_scratch_takes_the_compared_encoders_architecture(setup, tmp_path):
    from avssl.errors import ConfigError
    from avssl.evaluate.sources import resolve_sources
    from avssl.models import build_audio_encoder, save_encoder

    cfg, _, _ = setup
    wide = cfg.model.audio_encoder.model_copy(update={"code_dim": 24, "gru_hidden": 20})
    a = save_encoder(build_audio_encoder(wide), wide, tmp_path / "a.pt")
    pre, scratch = resolve_sources([str(a), "scratch"], cfg)
    assert scratch.encoder_config == wide and scratch.dim == 20 and cfg.model.audio_encoder.gru_hidden != 20
    b = save_encoder(build_audio_encoder(cfg.model.audio_encoder), cfg.model.audio_encoder, tmp_path / "b.pt")
    with pytest.raises(ConfigError, match="different architectures"):
        resolve_sources([str(a), str(b), "scratch"], cfg)


def test_studies_and_report_read_from_mlflow(setup):
    cfg, tracker, cache = setup
    cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update={"methods": ["mfcc", "logmel"]})})
    cfg.study.noise.snrs = ["clean", 10.0, 0.0]
    cfg.study.datasize.fractions = [0.5, 1.0]
    for m in ("mfcc", "logmel"):
        evaluate_source(resolve_source(m, cfg), "emotion", cfg, tracker, cache)
    noise = noise_study(cfg, tracker, cache)
    assert set(noise["table"]["mfcc"]) == {"clean", "white_10dB", "white_0dB", "babble_10dB", "babble_0dB"}
    size = datasize_study(cfg, tracker, cache)
    assert set(size["table"]["logmel"]) == {0.5, 1.0}
    client = MlflowClient(tracker.uri)
    children = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{size['run_id']}'")
    assert len(children) == 4 and all("overfit/gap_mean" in c.data.metrics for c in children)
    r = build_report(cfg, tracker)
    out = r["out"]
    for name in ("methods_x_tasks", "methods_x_snr", "methods_x_fraction"):
        md = open(f"{out}/{name}.md").read()
        assert "mfcc" in md and " [" in md and "95 %" in md  # every cell: estimate [low, high]
        assert open(f"{out}/{name}.csv").read().startswith("method,")
    assert "snr_white.png" in r["figures"] and "fraction.png" in r["figures"]


def test_jobs_that_train_the_same_head_train_it_once(setup, monkeypatch):
    """The main table's job, the noise study's and the dataset-size study's full-label job of one
    method train identical heads: one training, tested under the union of their conditions, each
    job its own run with its own conditions and the same numbers as if it had trained alone."""
    from mlflow.tracking import MlflowClient

    from avssl.evaluate.downstream import HeadTrainer
    from avssl.evaluate.runner import EvalJob, run_jobs

    cfg, tracker, cache = setup
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"parallel": False, "seeds": [0]})})
    fits = []
    fit = HeadTrainer.fit
    monkeypatch.setattr(HeadTrainer, "fit", lambda self, *a, **k: fits.append(a) or fit(self, *a, **k))
    noisy = (("clean", None), ("white", 10.0))
    jobs = [EvalJob(resolve_source("mfcc", cfg), "emotion"), EvalJob(resolve_source("mfcc", cfg), "emotion", test_conditions=noisy),
            EvalJob(resolve_source("mfcc", cfg), "emotion", label_fraction=0.5)]
    main, noise, half = run_jobs(jobs, cfg, tracker, cache)
    assert len(fits) == 2, "the full-label jobs share one training; the half-label job trains its own"
    client = MlflowClient(tracker.uri)
    assert "noise/white_10dB/uar_mean" in client.get_run(noise.run_id).data.metrics
    assert not any(k.startswith("noise/") for k in client.get_run(main.run_id).data.metrics)
    assert main.metrics["test/uar_mean"] == noise.metrics["test/uar_mean"]
    alone = run_jobs([EvalJob(resolve_source("mfcc", cfg), "emotion")], cfg, tracker, cache)[0]
    assert alone.metrics["test/uar_mean"] == main.metrics["test/uar_mean"]


def test_head_trainings_started_ahead_are_taken_not_trained_again(setup, ray_local):
    """A recipe starts its baselines' head trainings while its encoders pretrain (HeadPrefetch);
    run_jobs takes each of them, trains nothing twice, and logs the numbers a plain run gives."""
    import time

    from avssl.evaluate.runner import EvalJob, HeadPrefetch, run_jobs

    cfg, tracker, cache = setup
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"parallel": True, "seeds": [0, 1]})})

    def jobs():
        return [EvalJob(resolve_source("mfcc", cfg), "emotion"), EvalJob(resolve_source("scratch", cfg), "emotion", label_fraction=0.5)]

    ahead = HeadPrefetch(jobs(), cfg, cache)
    assert ahead.queued == 5  # mfcc's extraction, then 2 jobs x 2 seeds
    ahead.pump(1)
    assert ahead.started == 0 and ahead.queued == 4, "one free CPU: the extraction alone; mfcc's heads wait for its features"
    deadline = time.time() + 300
    while ahead.queued and time.time() < deadline:
        ahead.pump(2)
        time.sleep(0.2)
    assert ahead.started == 4
    taken = run_jobs(jobs(), cfg, tracker, cache, prefetch=ahead)
    assert not ahead.trainings, "every started training was taken"
    plain = run_jobs(jobs(), cfg, tracker, cache)
    for a, b in zip(taken, plain):
        assert a.metrics["test/uar_mean"] == b.metrics["test/uar_mean"] and a.metrics["val/uar_mean"] == b.metrics["val/uar_mean"]
