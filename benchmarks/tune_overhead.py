"""What `avssl tune` adds per trial: a search of N one-epoch trials (grid over w_visual, no
scheduler) vs the same N pretrainings run directly one after another, and search wall time vs
the number of trials, sequential and two at a time.

    python benchmarks/tune_overhead.py [--trials 2]

Each trial is exactly what `avssl pretrain` runs (the av objective with the quick probe, tracked
in MLflow), so the difference is Tune: trial scheduling, the trial's driver task, reporting,
the search's MLflow parent and its state saving. Target: <= 2 s per trial.
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


def weights(n: int) -> list[float]:
    return [round(0.5 + i * 0.5, 2) for i in range(n)]


def search(work: Path, n: int, concurrent: int, tag: str) -> float:
    from avssl.tune.driver import run_search
    from avssl.tune.space import load_space

    space = {
        "name": f"bench-{tag}",
        "base": {"config": "tiny", "overrides": TRAIN_ARGS + TRIAL_ARGS + [f"data.corpus={corpus(work)}"]},
        "metric": "probe/val_uar",
        "mode": "max",
        "space": {"objective.w_visual": {"grid": weights(n)}},
        "trial": {"workers": 1, "cpus_per_worker": 1},
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
        cfg = config(work, *TRIAL_ARGS, f"objective.w_visual={w}", f"run_name=direct-{i}-{time.time_ns()}", "train.checkpoint_every_steps=1000000000")
        t = time.perf_counter()
        pretrain(cfg)
        walls.append(time.perf_counter() - t)
    return walls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2, help="trials in the overhead comparison")
    args = ap.parse_args()

    from avssl.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    work = Path(tempfile.mkdtemp(prefix="avssl-bench-"))
    corpus(work)
    direct(work, 1)  # warm caches (imports, corpus pages) before anything is timed
    direct_walls = direct(work, args.trials)
    tune_wall = search(work, args.trials, 1, f"seq{args.trials}")
    per_trial = (tune_wall - sum(direct_walls)) / args.trials
    print(f"direct {sum(direct_walls):.1f} s, tune {tune_wall:.1f} s for {args.trials} trials", flush=True)

    scaling = []
    for n, conc in ((1, 1), (2, 2), (4, 2)):
        wall = search(work, n, conc, f"n{n}c{conc}")
        scaling.append({"trials": n, "concurrent": conc, "wall_s": wall})
        print(f"{n} trial(s), {conc} at a time: {wall:.1f} s", flush=True)

    # The search's own start-up and wrap-up (Tuner, parent run, figures) are paid once; the marginal
    # cost of one more trial is the slope between the 1-trial and the N-trial sequential searches.
    single = scaling[0]["wall_s"]
    direct_mean = sum(direct_walls) / len(direct_walls)
    marginal = (tune_wall - single) / max(1, args.trials - 1) - direct_mean
    fixed = single - direct_mean
    print()
    print(table(
        f"Tune overhead: {args.trials} one-epoch av trials (tiny preset, quick probe), one at a time",
        ["", "seconds", "note"],
        [
            ["direct pretrain, total", sum(direct_walls), " + ".join(f"{w:.1f}" for w in direct_walls)],
            ["avssl tune, total", tune_wall, "search wall, MLflow parent + children"],
            ["overhead per trial, all in", per_trial, f"{verdict(per_trial, 2.0, False)} <= 2 s (search start-up spread over {args.trials} trials)"],
            ["search start-up + wrap-up, once", fixed, "1-trial search minus one direct run"],
            ["marginal overhead of one more trial", marginal, f"{verdict(marginal, 2.0, False)} <= 2 s (slope, noisy: +-3 s here)"],
        ],
    ))
    print()
    print(table("Search wall time vs trials", ["trials", "at a time", "wall s", "s per trial"],
                [[s["trials"], s["concurrent"], s["wall_s"], s["wall_s"] / s["trials"]] for s in scaling]))
    save("tune_overhead", {"trials": args.trials, "direct_walls_s": direct_walls, "tune_wall_s": tune_wall, "overhead_per_trial_s": per_trial,
                           "search_fixed_s": fixed, "marginal_per_trial_s": marginal,
                           "target_s": 2.0, "meets_target": per_trial <= 2.0, "wall_vs_trials": scaling},
         "python benchmarks/tune_overhead.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
