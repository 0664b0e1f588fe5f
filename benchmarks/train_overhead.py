"""What Ray Train costs: `avssl pretrain` on 1 Ray worker vs a plain single-process PyTorch loop
over the same model, data stream, batch and step function, interleaved in one run.

    python benchmarks/train_overhead.py [--objective av] [--epochs 4] [--repeats 2]

Two figures per side:
- steady state: samples / seconds spent in training steps (data wait included), the throughput
  both loops measure the same way;
- end to end: wall time of the whole command for the same schedule (Ray Train start-up, per-epoch
  validation, checkpoints, MLflow logging, encoder export on the Ray side).
Target: Ray's steady-state time per sample <= 1.10x the plain loop's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import config, save, table, verdict  # noqa: E402


def plain_loop(cfg) -> dict[str, float]:
    import torch

    from avssl.train.loop import build_parts, train_step

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.train.threads_per_worker or 1)
    parts = build_parts(cfg, 0, 1, torch.device("cpu"))
    model = parts.model.train()
    samples, step_seconds = 0, 0.0
    for epoch in range(cfg.train.epochs):
        t = time.perf_counter()
        for batch in parts.stream.epoch(epoch):
            _, _, n = train_step(parts, model, model, batch, cfg.train.grad_clip)
            samples += n
        step_seconds += time.perf_counter() - t
    return {"samples": samples, "samples_per_s": samples / step_seconds, "wall_s": time.perf_counter() - t0}


def ray_run(cfg) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from avssl.train.trainer import pretrain

    t0 = time.perf_counter()
    r = pretrain(cfg)
    wall = time.perf_counter() - t0
    metrics = MlflowClient(r.tracking_uri).get_run(r.run_id).data.metrics
    return {"samples": metrics["final/steps"] * cfg.data.batch_size, "samples_per_s": metrics["final/samples_per_s"], "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", default="av", choices=["visual", "audio", "av"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from avssl.runtime import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="avssl-bench-"))
    t = time.perf_counter()
    ensure_ray(num_cpus=2)
    ray_init_s = time.perf_counter() - t
    plain, ray_ = [], []
    for i in range(args.repeats):
        base = config(work, f"objective.name={args.objective}", f"train.epochs={args.epochs}", "train.num_workers=1")
        plain.append(plain_loop(base))
        print(f"repeat {i + 1}: plain loop {plain[-1]['samples_per_s']:.1f} samples/s", flush=True)
        ray_.append(ray_run(base.model_copy(update={"run_name": f"overhead-{i}"})))
        print(f"repeat {i + 1}: ray train  {ray_[-1]['samples_per_s']:.1f} samples/s", flush=True)

    def med(xs, k):
        return statistics.median(x[k] for x in xs)

    p_sps, r_sps = med(plain, "samples_per_s"), med(ray_, "samples_per_s")
    ratio = p_sps / r_sps  # Ray's time per sample over the plain loop's
    p_wall, r_wall = med(plain, "wall_s"), med(ray_, "wall_s")
    print()
    print(table(
        f"Ray Train overhead: objective {args.objective}, tiny preset, batch {base.data.batch_size}, {args.epochs} epochs, 1 worker x 1 thread "
        f"(median of {args.repeats}, interleaved)",
        ["", "plain loop", "Ray Train (avssl pretrain)", "ratio Ray/plain"],
        [
            ["steady-state samples/s", p_sps, r_sps, ""],
            ["time per sample (ms)", 1000 / p_sps, 1000 / r_sps, f"{ratio:.3f}x ({verdict(ratio, 1.10, False)} <= 1.10x)"],
            ["end-to-end wall (s)", p_wall, r_wall, f"{r_wall / p_wall:.2f}x"],
            ["extra wall per run (s)", "", r_wall - p_wall, "Train start-up, validation, checkpoints, MLflow, export"],
        ],
    ))
    print(f"ray.init (once per process, not in the walls above): {ray_init_s:.1f} s")
    save("train_overhead", {
        "objective": args.objective, "epochs": args.epochs, "repeats": args.repeats, "ray_init_s": ray_init_s,
        "plain": plain, "ray": ray_, "time_per_sample_ratio": ratio, "target": 1.10, "meets_target": ratio <= 1.10,
        "wall_ratio": r_wall / p_wall,
    }, "python benchmarks/train_overhead.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
