"""Entry script for `ray submit cluster.yaml scripts/cluster_job.py -- COMMAND [ARGS...]`.

`ray submit` copies this file to the head node's home folder and runs it there with the head's
Python (the avssl venv that cluster.yaml installs). It joins the running cluster instead of
starting a local Ray runtime, picks up the tracking URI and shared storage path that cluster.yaml
exports (~/.avssl_env), and hands the rest of the command line to the avssl CLI, e.g.

    ray submit cluster.yaml scripts/cluster_job.py -- synth 'synth.out=$AVSSL_SHARED/data/synth'
    ray submit cluster.yaml scripts/cluster_job.py -- pretrain --config paper train.num_workers=4 \
        'data.corpus=$AVSSL_SHARED/data/synth/pool'
    ray submit cluster.yaml scripts/cluster_job.py -- tune tune_spaces/loss_weights.yaml

`$VARS` in the arguments (single-quoted on your machine) are expanded on the head, after
~/.avssl_env is loaded: `$AVSSL_SHARED` is the shared storage every node mounts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _own_folder_off_sys_path() -> None:
    """Python puts this script's folder first on sys.path: for `ray submit` that is the home
    folder, which may hold a checkout named avssl; the installed package is the one to import."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def _load_cluster_env(path: Path = Path.home() / ".avssl_env") -> None:
    """`ray submit` runs through a login shell, but be explicit: the settings cluster.yaml wrote."""
    if not path.is_file():
        return
    import shlex
    import subprocess

    out = subprocess.run(["bash", "-c", f"source {shlex.quote(str(path))} && env -0"], capture_output=True, check=False).stdout
    for item in out.split(b"\0"):
        key, _, value = item.decode(errors="replace").partition("=")
        if key.startswith(("AVSSL_", "MLFLOW_", "RAY_", "GLOO_")) and key not in os.environ:
            os.environ[key] = value


def main(argv: list[str]) -> int:
    _own_folder_off_sys_path()
    _load_cluster_env()
    os.environ.setdefault("RAY_ADDRESS", "auto")  # join the cluster this head runs
    from avssl.cli import main as avssl_main

    return avssl_main([os.path.expandvars(a) for a in argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
