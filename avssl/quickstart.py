"""`avssl quickstart`: the offline protocol end to end, as a built-in recipe.

synth (an unlabelled pool + labelled emotion, word and affect corpora of other speakers) ->
pretrain three encoders on the pool (visual, audio, av) with Ray Train -> evaluate them and the
baselines (scratch, MFCC, log-mel) on each task's own corpus; the emotion heads also face white
and babble noise (the noise study) -> dataset-size study -> optionally a small loss-weight search
with Ray Tune -> the report with intervals and the paper's claims, read back from MLflow. Rerunning
reuses the corpora, the finished pretrainings and the finished evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

from avssl.config.schema import Config, SynthConfig


def _corpus_matches(synth: SynthConfig, seed: int) -> bool:
    meta = Path(synth.out) / "corpus.json"
    if not meta.is_file():
        return False
    gen = json.loads(meta.read_text()).get("generator", {})
    wanted = {"seed": seed, **synth.model_dump(mode="json")}
    return all(gen.get(k) == v for k, v in wanted.items() if k not in ("workers", "baseline", "out", "corpora"))


def protocol_matches(cfg: Config) -> bool:
    """The protocol's corpora under synth.out exist and were generated with these settings."""
    from avssl.data.synthetic.generator import protocol_corpora

    return all(_corpus_matches(one, cfg.seed) for _, one in protocol_corpora(cfg.synth))


def quickstart_recipe(with_search: bool):
    from avssl.experiment import EvalSpec, PretrainSpec, Recipe, SearchSpec, StudySpec
    from avssl.tune.driver import quick_space_path

    return Recipe(
        name="quickstart",
        description="the offline protocol in minutes: pool -> three encoders -> emotion (with noise), word, affect; dataset size",
        config="quickstart",
        synth=True,
        pretrain=PretrainSpec(objectives=["visual", "audio", "av"], seeds=[0]),
        evaluate=EvalSpec(tasks=["emotion", "word", "affect"], methods=["pretrained", "scratch", "mfcc", "logmel"]),
        noise=StudySpec(task="emotion", methods=["pretrained", "scratch", "mfcc"]),
        datasize=StudySpec(task="emotion", methods=["av", "scratch", "mfcc"]),
        search=SearchSpec(space=str(quick_space_path())) if with_search else None,
    )


def protocol_paths(cfg: Config) -> Config:
    """Point the pretraining corpus and each task's corpus at the protocol's folders under synth.out."""
    root = Path(cfg.synth.out)
    cfg = cfg.model_copy(deep=True)
    cfg.data.corpus = str(root / "pool")
    cfg.evaluate.corpora = {**cfg.evaluate.corpora, **{t: str(root / t) for t in ("emotion", "word", "affect") if getattr(cfg.synth.corpora, t).enabled}}
    return cfg


def quickstart_command(cfg: Config, skip_tune: bool = True) -> int:
    from avssl.errors import ConfigError
    from avssl.experiment import RecipeRun

    if not cfg.synth.protocol:
        raise ConfigError("the quick start runs the offline protocol: synth.protocol must be true")
    RecipeRun(quickstart_recipe(not skip_tune), protocol_paths(cfg)).run()
    return 0
