"""A recipe end to end on tiny protocol corpora: one MLflow parent run, the report with intervals
and the claims' verdicts, and a rerun that reuses every finished pretraining and evaluation."""

from pathlib import Path

import pytest
import yaml

TINY_PROTOCOL = [
    "synth.clip_seconds=1.0", "synth.frame_size=32", "synth.workers=1", "synth.baseline=false",
    "synth.corpora.pool.speakers=6", "synth.corpora.pool.clips_per_speaker=6", "synth.corpora.pool.split=[0.67,0.17,0.16]",
    "synth.corpora.emotion.speakers=6", "synth.corpora.emotion.clips_per_speaker=8", "synth.corpora.emotion.split=[0.5,0.17,0.33]",
    "synth.corpora.word.enabled=false", "synth.corpora.affect.enabled=false",
]


@pytest.mark.slow
def test_a_recipe_runs_reports_claims_and_resumes(workdir, ray_local):
    from mlflow.tracking import MlflowClient

    from avssl.experiment import RecipeRun, load_recipe, recipe_config
    from tests.conftest import TINY_TRAIN

    root = workdir / "synth"
    recipe_file = workdir / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "tiny-protocol",
        "config": "tiny",
        "synth": True,
        "scale": TINY_PROTOCOL + [t for t in TINY_TRAIN if not t.startswith("evaluate.seeds")] + ["evaluate.seeds=[0,1]", "train.epochs=1"],
        "overrides": [f"synth.out={root}", f"data.corpus={root / 'pool'}", f"evaluate.corpora.emotion={root / 'emotion'}",
                      f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", f"train.storage_path={workdir / 'runs'}", f"report.out={workdir / 'report'}",
                      "study.noise.snrs=[clean,5.0]", "study.noise.types=[white]", "study.datasize.fractions=[0.5,1.0]", "report.bootstrap=200"],
        "pretrain": {"objectives": ["visual", "audio", "av"], "seeds": [0]},
        "evaluate": {"tasks": ["emotion"], "methods": ["pretrained", "scratch", "mfcc"]},
        "noise": {"task": "emotion", "methods": ["pretrained", "scratch", "mfcc"]},
        "datasize": {"task": "emotion", "methods": ["av", "scratch"]},
    }))
    recipe = load_recipe(recipe_file)
    cfg = recipe_config(recipe, None, [])
    first = RecipeRun(recipe, cfg)
    out = first.run()
    assert first.prefetch is not None, "the baselines' head trainings may start while the encoders pretrain"
    assert not first.prefetch.trainings, "every training started during pretraining was taken by the evaluation (none trained twice)"
    client = MlflowClient(cfg.tracking.uri)
    tracker_exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {parent.data.tags[f"avssl.claim{n}"] for n in range(1, 5)} <= {"supported", "contradicted", "unresolved", "not run"}
    evals = client.search_runs([tracker_exp], f"tags.`avssl.kind` = 'evaluate' and tags.`avssl.recipe_run_id` = '{parent.info.run_id}'")
    # noise study: 3 encoders + scratch + mfcc; datasize: (av, scratch) x 2 fractions; main: nothing left (emotion is the noise task)
    assert len(evals) == 5 + 4 and all(r.info.status == "FINISHED" for r in evals)
    assert all("predictions.npz" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in evals)
    md = (Path(out["report"]["out"]) / "report.md").read_text()
    assert "[" in md and "synth-emotion" in md and "The paper's claims" in md and "resolved" in md
    assert any(f.startswith("claim_") for f in out["report"]["figures"]) and "snr_white.png" in out["report"]["figures"]

    again = RecipeRun(recipe, cfg).run()  # resumes: nothing pretrained or evaluated twice
    assert again["parent_run_id"] == parent.info.run_id
    pretrains = client.search_runs([tracker_exp], "tags.`avssl.kind` = 'pretrain'")
    assert len(pretrains) == 3
    evals2 = client.search_runs([tracker_exp], f"tags.`avssl.kind` = 'evaluate' and tags.`avssl.recipe_run_id` = '{parent.info.run_id}'")
    assert len(evals2) == len(evals)


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")))
def test_every_shipped_recipe_loads_and_resolves_on_both_bases(path):
    from avssl.experiment import load_recipe, recipe_config

    recipe = load_recipe(path)
    own = recipe_config(recipe, None, [])
    paper = recipe_config(recipe, "paper", [])
    assert own.evaluate.corpora and paper.preset == "paper" and own.preset == recipe.config
    assert len(own.evaluate.seeds) >= 5 or recipe.evaluate is None and recipe.noise is None and recipe.datasize is None


def test_a_bad_recipe_names_every_problem(tmp_path):
    from avssl.errors import ConfigError
    from avssl.experiment import load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nevaluate: {tasks: [emotoin], methods: [pretrainde]}\npretrain: {objectives: [avv]}\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    assert "emotoin" in str(e.value) and "pretrainde" in str(e.value) and "avv" in str(e.value)
