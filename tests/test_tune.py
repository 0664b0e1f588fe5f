"""Ray Tune searches: space validation, ASHA, Optuna, kill-and-resume, one MLflow child per trial,
in-process and nested trials, and a search that must rank a good configuration above a broken one."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from avssl.errors import ConfigError
from avssl.tune.space import load_space, sampled_overrides
from tests.conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]


def test_tie_rate_and_summary():
    from avssl.tune.driver import search_summary, tie_rate

    rows = [{"best": 0.3337, "se": 0.05, "error": None}, {"best": 0.3337, "se": 0.05, "error": None},
            {"best": 0.41, "se": 0.02, "error": None}, {"best": 0.3337, "se": 0.05, "error": None},
            {"best": None, "se": None, "error": "boom"}]
    assert tie_rate(rows) == pytest.approx(0.75)  # three of four finished trials share a score
    summary = search_summary(rows, "max")
    assert summary["search/finished"] == 4 and summary["search/errored"] == 1
    assert summary["search/spread"] == pytest.approx(0.41 - 0.3337)
    assert summary["search/lead_over_runner_up_in_se"] == pytest.approx((0.41 - 0.3337) / (0.02**2 + 0.05**2) ** 0.5)
    assert tie_rate([{"best": 0.2}, {"best": 0.3}]) == 0.0


def test_optuna_searches_reject_grids_and_in_process_needs_fixed_resources(tmp_path):
    with pytest.raises(ConfigError, match="grids run with searcher: random"):
        load_space(write_space(tmp_path / "s.yaml", searcher="optuna", space={"objective.w_visual": {"grid": [0.1, 1.0]}}))
    space, _ = load_space(write_space(tmp_path / "s.yaml", searcher="optuna"))
    assert space.in_process
    space, _ = load_space(write_space(tmp_path / "s.yaml", trial={"workers": 2}))
    assert not space.in_process
    space, _ = load_space(write_space(tmp_path / "s.yaml", space={"trial.cpus_per_worker": {"choice": [1, 2]}}))
    assert not space.in_process


def write_space(path: Path, **fields) -> Path:
    base = {"name": "t", "metric": "probe/val_uar", "space": {"objective.w_visual": {"uniform": [0.1, 1.0]}}}
    base.update(fields)
    path.write_text(yaml.safe_dump(base))
    return path


def test_shipped_spaces_are_valid():
    for name in ("quick", "loss_weights", "dataset_size"):
        space, cfg = load_space(ROOT / "tune_spaces" / f"{name}.yaml")
        assert space.name == name
    space, _ = load_space(ROOT / "tune_spaces" / "dataset_size.yaml")
    assert space.scheduler.name == "none" and space.total_trials == 16 and space.trial.downstream
    space, _ = load_space(ROOT / "tune_spaces" / "loss_weights.yaml")
    assert space.scheduler.name == "asha" and "objective.audio.w_log_f0" in space.space


@pytest.mark.parametrize(
    "space, message",
    [
        ({"objective.w_visul": {"uniform": [0, 1]}}, "did you mean 'objective.w_visual'"),
        ({"objective.w_visual": {"uniform": [2, 1]}}, "low must be below high"),
        ({"objective.w_visual": {"loguniform": [0, 1]}}, "bounds must be positive"),
        ({"objective.w_visual": {"normal": [0, 1]}}, "give exactly one of choice, uniform"),
        ({"x": {"grid": [{"trial.encoderr": "scratch"}]}}, "'trial' has no field 'encoderr'"),
    ],
)
def test_bad_spaces_fail_with_the_field_named(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write_space(tmp_path / "s.yaml", space=space))


def test_bad_sampled_value_is_caught_by_the_config_tree(tmp_path):
    from avssl.config.loader import apply_overrides, config_from_dict
    from avssl.config import load_config

    overrides, trial = sampled_overrides({"setup": {"trial.encoder": "scratch", "data.pretrain_fraction": 0.5}, "train.lr": 0.01})
    assert trial == {"encoder": "scratch"} and "data.pretrain_fraction=0.5" in overrides
    tree = apply_overrides(load_config("tiny").model_dump(mode="json"), ["data.pretrain_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.pretrain_fraction"):
        config_from_dict(tree)


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_optuna_search_survives_a_killed_driver_and_asha_stops_trials(tmp_path, synth_corpus):
    """SIGKILL of the driver mid-search, then --resume: the Optuna searcher's state is restored (no
    seventh trial is proposed), no finished trial runs again, one MLflow child per trial."""
    db = tmp_path / "mlflow.db"
    overrides = TINY_TRAIN + [
        f"data.corpus={synth_corpus}", f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{db}",
        "train.epochs=3", "train.probe.enabled=false", "objective.name=av",
    ]
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        name: killme
        base: {{config: tiny, overrides: {overrides!r}}}
        metric: loss
        mode: min
        space:
          objective.w_audio: {{uniform: [0.5, 4.0]}}
        searcher: optuna
        num_samples: 6
        scheduler: {{name: asha, time_attr: epoch, grace_period: 1, reduction_factor: 2}}
        max_concurrent_trials: 2
    """))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "avssl", "tune", str(space)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = MlflowClient(f"sqlite:///{db}")
    finished_before = {}
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        if not db.exists():
            continue
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avssl.kind` = 'trial'")
        except Exception:
            continue
        done = [r for r in runs if r.info.status in ("FINISHED", "FAILED")]
        if len(done) >= 2 and len(runs) < 6:
            finished_before = {r.data.tags["avssl.trial_id"]: r.info.end_time for r in done}
            break
    assert proc.poll() is None, "the search ended before it could be interrupted:\n" + (tmp_path / "first.log").read_text()[-3000:]
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray runtime it started: a crashed machine
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    assert finished_before, "no trial had finished when the driver was killed"

    out = subprocess.run([sys.executable, "-m", "avssl", "tune", str(space), "--resume"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "restored and finished" in out.stdout
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avssl.kind` = 'search'")
    assert len(parents) == 1, "the search's parent run must be reopened, not duplicated"
    children = _children(client, parents[0].info.run_id)
    trial_ids = [c.data.tags["avssl.trial_id"] for c in children]
    assert len(children) == 6 and len(set(trial_ids)) == 6, trial_ids  # one child per trial
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)
    stopped = [c for c in children if c.data.tags.get("avssl.trial_status") == "stopped_early"]
    assert stopped, "ASHA stopped no trial early"
    by_id = {c.data.tags["avssl.trial_id"]: c for c in children}
    for tid, end in finished_before.items():
        assert by_id[tid].info.end_time == end, f"trial {tid} finished before the kill but was run again"
    assert parents[0].data.tags.get("avssl.best_trial_id") in by_id
    assert {c.data.tags.get("avssl.trial_mode") for c in children} == {"in-process"}
    # A trial that trained to the last epoch exported its encoder before ASHA could end it.
    full = [c for c in children if c.data.tags.get("avssl.trial_status") == "finished"]
    assert full and all(Path(c.data.tags["avssl.encoder_path"]).is_file() for c in full)
    sampled = [float(c.data.params["space.objective.w_audio"]) for c in children]
    assert len(set(sampled)) == 6 and all(0.5 <= w <= 4.0 for w in sampled), sampled


@pytest.mark.slow
def test_a_search_ranks_a_working_configuration_above_a_broken_one(tmp_path):
    """lr 2e-3 (the default) against lr 1e-9 (an encoder that never leaves its random init), on the
    protocol in miniature (unlabelled pool, labelled word corpus of other speakers). The metric is
    the probe's held-out-speaker UAR; the working setting must come first, resolved by its
    standard errors, in every run."""
    from avssl.tune.driver import run_search
    from tests.test_science import make_corpora

    pool, labelled = make_corpora(tmp_path, seed=0, pool_speakers=10, probe_speakers=12, pool_clips=96)
    overrides = [f"data.corpus={pool}", "objective.name=audio", "data.batch_size=16", "train.epochs=9", "train.max_steps=420",
                 "train.probe.task=word", f"train.probe.corpus={labelled}", "train.probe.max_clips=10000",
                 "train.figure_every_epochs=0", "train.log_every_steps=20"]
    space = write_space(tmp_path / "rank.yaml", name="rank", base={"config": "tiny", "overrides": overrides},
                        space={"train.lr": {"grid": [1e-9, 2e-3]}}, trial={"workers": 1, "cpus_per_worker": 1}, max_concurrent_trials=2)
    sp, cfg = load_space(space, [f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    res = run_search(sp, cfg)
    scores = {r["config"]["train.lr"]: r for r in res.trials}
    good, broken = scores[2e-3], scores[1e-9]
    assert res.best["config"]["train.lr"] == 2e-3, f"working {good['best']} vs broken {broken['best']}"
    assert good["best"] - broken["best"] > 2 * (good["se"] ** 2 + broken["se"] ** 2) ** 0.5, (good, broken)
    assert res.summary["search/tie_rate"] == 0.0
