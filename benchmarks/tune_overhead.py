"""What `avssl tune` adds per trial, for both ways a trial can train: in its own process (one
worker; the default) and on a nested Ray Train `TorchTrainer` (several workers, or
`trial.in_process: false`), side by side with the same pretrainings run directly (`avssl pretrain`).

    python benchmarks/tune_overhead.py [--trials 1,2,4]

Each trial is one epoch of the av objective with the quick probe, tracked in MLflow, exactly what
`avssl pretrain` runs. Searches run their trials one at a time, so the per-trial overhead is
(search wall - trials x direct run) / trials; a search's own start-up and wrap-up are in it too.
Target: <= 2 s per in-process trial.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import TRAIN_ARGS, config, corpus, save, table, verdict  # noqa: E402

TRIAL_ARGS = ["objective.name=av", "train.epochs=1", "train.probe.enabled=true", "train.probe.max_clips=60"]


def trial_args(work: Path) -> list[str]:
    return TRIAL_ARGS + [f"train.probe.corpus={corpus(work)}"]


def weights(n: int) -> list[float]:
    return [round(0.5 + i * 0.5, 2) for i in range(n)]


def search(work: Path, n: int, concurrent: int, tag: str, in_process: bool = True) -> float:
    from avssl.tune.driver import run_search
    from avssl.tune.space import load_space

    space = {
        "name": f"bench-{tag}",
        "base": {"config": "tiny", "overrides": TRAIN_ARGS + trial_args(work) + [f"data.corpus={corpus(work)}"]},
        "metric": "probe/val_uar",
        "mode": "max",
        "space": {"objective.w_visual": {"grid": weights(n)}},
        "trial": {"workers": 1, "cpus_per_worker": 1, "in_process": in_process},
        "max_concurrent_trials": concurrent,
    }
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(space))
    sp, cfg = load_space(path, [f"train.storage_path={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"])
    t = time.perf_counter()
    run_search(sp, cfg)
    return time.perf_counter() - t


def direct(work: Path, n: int) -> list[float]:
    from avssl.train.trainer import pretrain

    walls = []
    for i, w in enumerate(weights(n)):
        cfg = config(work, *trial_args(work), f"objective.w_visual={w}", f"run_name=direct-{i}-{time.time_ns()}", "train.checkpoint_every_steps=1000000000")
        t = time.perf_counter()
        pretrain(cfg)
        walls.append(time.perf_counter() - t)
    return walls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", default="1,2,4", help="comma-separated search sizes (trials, run one at a time)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.trials.split(",")]

    from avssl.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    work = Path(tempfile.mkdtemp(prefix="avssl-bench-"))
    corpus(work)
    direct(work, 1)  # warm caches (imports, corpus pages) before anything is timed
    direct_walls = direct(work, max(sizes))
    direct_mean = sum(direct_walls) / len(direct_walls)
    print(f"direct: {len(direct_walls)} runs, mean {direct_mean:.1f} s", flush=True)
    rows, results = [], []
    for n in sizes:
        for mode, in_process in (("in-process", True), ("nested", False)):
            wall = search(work, n, 1, f"{mode}-{n}", in_process)
            over = (wall - n * direct_mean) / n
            results.append({"trials": n, "mode": mode, "wall_s": wall, "overhead_per_trial_s": over})
            print(f"{n} trial(s), {mode}: {wall:.1f} s, {over:+.1f} s per trial over direct", flush=True)
    by = {(r["trials"], r["mode"]): r for r in results}
    for n in sizes:
        ip, ne = by[(n, "in-process")], by[(n, "nested")]
        rows.append([n, n * direct_mean, ip["wall_s"], ne["wall_s"], ip["overhead_per_trial_s"], ne["overhead_per_trial_s"],
                     verdict(ip["overhead_per_trial_s"], 2.0, False)])
    print()
    print(table(
        "Tune overhead per trial: one-epoch av trials (tiny preset, quick probe, MLflow), one at a time; "
        f"direct = avssl pretrain, mean of {len(direct_walls)} runs {direct_mean:.1f} s",
        ["trials", "direct s", "in-process s", "nested s", "in-process overhead s/trial", "nested overhead s/trial", "<= 2 s"],
        rows,
    ))
    save("tune_overhead", {"direct_walls_s": direct_walls, "direct_mean_s": direct_mean, "searches": results, "target_s": 2.0},
         "python benchmarks/tune_overhead.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
