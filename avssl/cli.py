"""The `avssl` command: parse, load the config, call one function. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

from avssl.errors import AvsslError

OVERRIDES_HELP = "config overrides as section.field=value, e.g. train.epochs=2 objective.w_audio=0.5"

EPILOG = """\
typical session (offline, synthetic corpus):
  avssl synth                                   # write data/synth
  avssl pretrain objective.name=av run_name=av  # Ray Train, tracked in ./mlflow.db
  avssl evaluate evaluate.encoder=<run id>      # downstream emotion probe vs baselines
  avssl study noise study.methods=[<run id>,scratch,mfcc]
  avssl report                                  # tables + figures from MLflow
  mlflow ui --backend-store-uri sqlite:///mlflow.db

every command takes --config (a preset: tiny, paper; or a YAML file) and dotted overrides.
`avssl config` prints the resolved config, `avssl config --help` lists the presets.
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="preset name (tiny, paper) or YAML file; default: tiny")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help=OVERRIDES_HELP)


def _load(args: argparse.Namespace):
    from avssl.config import load_config

    return load_config(args.config, args.overrides)


# -- command handlers (thin) ---------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    from avssl.config import dump_yaml

    print(dump_yaml(_load(args)), end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from avssl.data.pipeline import synth_command

    return synth_command(cfg, overwrite=args.overwrite)


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from avssl.data.prepare import prepare_command

    return prepare_command(
        cfg, dataset=args.dataset, root=args.root, out=args.out, strict=args.strict, overwrite=args.overwrite
    )


def cmd_corpus(args: argparse.Namespace) -> int:
    from avssl.data.pipeline import corpus_command

    return corpus_command(args.path, baseline=args.baseline, upload=args.upload)


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from avssl.train.trainer import pretrain_command

    return pretrain_command(cfg)


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from avssl.evaluate.runner import evaluate_command

    return evaluate_command(cfg)


def cmd_study(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from avssl.evaluate.studies import study_command

    return study_command(cfg, args.study)


def cmd_report(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from avssl.evaluate.report import report_command

    return report_command(cfg)


def cmd_tune(args: argparse.Namespace) -> int:
    from avssl.tune.driver import tune_command

    return tune_command(args.space, args.overrides, resume=args.resume, name=args.name, retry_errored=args.retry_errored)


def cmd_cluster(args: argparse.Namespace) -> int:
    from avssl.cluster import cluster_check_command

    return cluster_check_command(args.files)


def cmd_quickstart(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from avssl.quickstart import quickstart_command

    return quickstart_command(cfg, skip_tune=not args.tune)


def cmd_experiment(args: argparse.Namespace) -> int:
    from avssl.experiment import experiment_command

    return experiment_command(args.recipe, args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avssl",
        description="Audio-visual self-supervised speech representation learning on Ray, tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_: str, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description or help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        return p

    from avssl.config.loader import preset_names

    p = add("config", cmd_config, "print the resolved config (preset + file + overrides) as YAML",
            f"Print the resolved config. Presets: {', '.join(preset_names())}.")
    _add_config_args(p)

    p = add("synth", cmd_synth, "generate the synthetic talking-face corpus (the offline default)",
            "Generate espeak-ng speech with drawn talking faces, write it in the corpus format to synth.out,\n"
            "and print a summary with MFCC baselines. Knobs live under synth.* (see `avssl config`).")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus at synth.out")
    _add_config_args(p)

    from avssl.data.readers import READERS

    p = add("prepare", cmd_prepare, "convert a real corpus (LRW, CREMA-D, ...) into the corpus format",
            "Read a corpus in its published layout, resample to 16 kHz mono, crop faces, and write\n"
            "manifest + shards. Bad clips are skipped and counted by reason (or stop with --strict).")
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(READERS.names())}")
    p.add_argument("--root", required=True, help="the corpus as downloaded (its published folder layout)")
    p.add_argument("--out", required=True, help="folder to write the prepared corpus to")
    p.add_argument("--strict", action="store_true", help="stop at the first bad clip, naming its path and reason")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus at --out")
    _add_config_args(p)

    p = add("corpus", cmd_corpus, "summarise a prepared corpus (and optionally its MFCC baselines); copy it to object storage")
    p.add_argument("path", help="prepared corpus folder, or s3://bucket/prefix")
    p.add_argument("--baseline", action="store_true", help="also fit the MFCC-statistics baselines")
    p.add_argument("--upload", metavar="URI", help="copy the corpus to this object-store prefix (s3://bucket/prefix; credentials and "
                   "AWS_ENDPOINT_URL from the environment), then summarise the copy")

    p = add("pretrain", cmd_pretrain, "pretrain an audio encoder with Ray Train (visual / audio / av objective)",
            "Pretrain on data.corpus with objective.name in {visual, audio, av}. Checkpoints go to\n"
            "train.storage_path/<run_name>; rerunning with the same run_name resumes. Tracked in MLflow.")
    _add_config_args(p)

    p = add("evaluate", cmd_evaluate, "evaluate an encoder (MLflow run id, checkpoint, or baseline) on downstream tasks",
            "Train a head on frozen (or fine-tuned) encoder features for each task in evaluate.tasks, over\n"
            "evaluate.seeds; each evaluation is an MLflow run linked to its encoder. Baselines: scratch, mfcc, logmel.")
    _add_config_args(p)

    p = add("study", cmd_study, "the paper's studies: noise robustness, dataset size",
            "noise: heads tested at study.noise.snrs with white and babble noise.\n"
            "datasize: heads trained on study.datasize.fractions of the labels; train/val curves and the overfitting gap.\n"
            "Both compare study.methods (run ids, checkpoints, scratch, mfcc, logmel).")
    p.add_argument("study", choices=["noise", "datasize"])
    _add_config_args(p)

    p = add("report", cmd_report, "paper-style tables and figures, read from MLflow",
            "Write Markdown + CSV tables (methods x tasks, x SNR, x data fraction, searches) and figures to report.out.")
    _add_config_args(p)

    p = add("tune", cmd_tune, "Ray Tune search declared in a tune_spaces/*.yaml file",
            "Run (or resume) a search over config fields. Each trial pretrains and probes; one MLflow\n"
            "parent run per search, one child per trial. Rerunning the same space and name resumes.")
    p.add_argument("space", help="search space YAML (e.g. tune_spaces/quick.yaml)")
    p.add_argument("--name", default=None, help="search name (default: the space's name); same name = same search")
    p.add_argument("--resume", action="store_true", help="require an existing search of this name and restore it")
    p.add_argument("--retry-errored", action="store_true", help="on resume, rerun trials that ended in error")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="overrides of the space's base config")

    p = add("cluster", cmd_cluster, "check a Ray cluster-launcher YAML (cluster.yaml) before `ray up`",
            "Run Ray's own cluster validator on each file, then avssl's checks: avssl installed on every node,\n"
            "MLflow server started and its URI plus the shared storage path exported, dashboard and MLflow\n"
            "on private addresses, token auth on, no credentials in the file.")
    p.add_argument("action", choices=["check"])
    p.add_argument("files", nargs="+", metavar="FILE", help="cluster-launcher YAML files, e.g. cluster.yaml cluster-gpu.yaml")

    p = add("experiment", cmd_experiment, "run a recipe (experiments/*.yaml): one table of the paper's protocol, resumable, one MLflow parent run",
            "Generate corpora if the recipe says so, pretrain its encoders, run its evaluations and studies (reusing\n"
            "what finished in an earlier run), and write the report with 95 % intervals and the paper's claims.\n"
            "--config replaces the recipe's base config (e.g. paper on a GPU cluster) and drops its CPU-sized `scale`.")
    p.add_argument("recipe", help="recipe YAML, e.g. experiments/main.yaml")
    p.add_argument("--config", "-c", default=None, help="base config instead of the recipe's own (e.g. paper)")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help=OVERRIDES_HELP + "; corpus paths, e.g. evaluate.corpora.emotion=data/crema-d")

    p = add("quickstart", cmd_quickstart, "the whole pipeline on the synthetic corpus: synth -> pretrain -> evaluate -> studies -> report",
            "Runs end to end on the tiny preset in minutes on a laptop CPU and prints where the results are.")
    p.add_argument("--tune", action="store_true", help="also run the small loss-weight search (tune_spaces/quick.yaml; about 2.5 more minutes)")
    p.add_argument("--skip-tune", action="store_true", help=argparse.SUPPRESS)  # the search is opt-in now
    p.add_argument("--config", "-c", default="quickstart", help="preset or YAML file; default: quickstart (tiny models, small corpus)")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help=OVERRIDES_HELP)
    return parser


def _version() -> str:
    from avssl import __version__

    return f"avssl {__version__}"


def parse(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> argparse.Namespace:
    """Options and FIELD=VALUE overrides in any order: argparse stops filling a `nargs="*"`
    positional at the first option, so overrides after `--config X` come back as extras."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except AvsslError as e:
        print(f"avssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"avssl {args.command}: interrupted; checkpoints and results written so far are kept", file=sys.stderr)
        return 130


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
