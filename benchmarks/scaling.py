"""Scaling: 1 vs 2 Ray Train workers (DDP, gloo) on this machine, with each step split into data
wait, forward, backward (DDP's gradient allreduce overlaps it), optimiser, plus a standalone
allreduce of the model's gradient size, and how many cores each worker process really used.

    python benchmarks/scaling.py [--objective av] [--steps 30]

The workers run avssl's own `build_parts` / `train_step` (what `avssl pretrain` runs), timed
per phase. Target: 2 workers >= 1.6x the samples/s of 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import config, save, table, verdict  # noqa: E402

WARMUP = 3


def timed_worker(loop_config: dict) -> None:
    import os

    import psutil
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from avssl.config.loader import config_from_dict
    from avssl.train.loop import build_parts, train_step

    cfg = config_from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.threads_per_worker or 1)
    device = ray.train.torch.get_device()
    parts = build_parts(cfg, rank, world, device)
    model = ray.train.torch.prepare_model(parts.model)
    raw = model.module if hasattr(model, "module") else model
    timings: dict[str, float] = {}
    proc = psutil.Process(os.getpid())
    steps, samples, data_wait = 0, 0, 0.0
    t_start = cpu_start = None
    epoch = 0
    while steps < loop_config["steps"] + WARMUP:
        t = time.perf_counter()
        for batch in parts.stream.epoch(epoch):
            if steps == WARMUP:  # start the clocks after warm-up steps
                timings.clear()
                data_wait, samples = 0.0, 0
                t_start, cpu_start = time.perf_counter(), proc.cpu_times()
                t = time.perf_counter()
            waited = time.perf_counter() - t
            _, _, n = train_step(parts, model, raw, batch, cfg.train.grad_clip, timings)
            data_wait += waited
            samples += n
            steps += 1
            if steps >= loop_config["steps"] + WARMUP:
                break
            t = time.perf_counter()
        epoch += 1
    wall = time.perf_counter() - t_start
    cpu = proc.cpu_times()
    cores = (cpu.user - cpu_start.user + cpu.system - cpu_start.system) / wall
    allreduce_ms = 0.0
    n_params = sum(p.numel() for p in raw.parameters())
    if world > 1:
        flat = torch.zeros(n_params)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(flat)
        allreduce_ms = (time.perf_counter() - t) / 20 * 1000
    n = loop_config["steps"]
    result = {
        "rank": rank, "world": world, "samples": samples, "wall_s": wall, "cores_used": cores, "params": n_params,
        "data_ms": data_wait / n * 1000, "forward_ms": timings["forward"] / n * 1000, "backward_ms": timings["backward"] / n * 1000,
        "optimizer_ms": timings["optimizer"] / n * 1000, "step_ms": wall / n * 1000, "allreduce_ms": allreduce_ms,
    }
    if rank == 0:
        import json

        Path(loop_config["out"]).write_text(json.dumps(result))


def plain_steps(cfg_tree: dict, steps: int) -> float:
    """Samples/s of the same steps in a plain process (no Ray, no DDP)."""
    import torch

    from avssl.config.loader import config_from_dict
    from avssl.train.loop import build_parts, train_step

    cfg = config_from_dict(cfg_tree)
    torch.set_num_threads(1)
    parts = build_parts(cfg, 0, 1, torch.device("cpu"))
    model = parts.model.train()
    done, samples, epoch, t = 0, 0, 0, None
    while done < steps + WARMUP:
        for batch in parts.stream.epoch(epoch):
            if done == WARMUP:
                t, samples = time.perf_counter(), 0
            _, _, n = train_step(parts, model, model, batch, cfg.train.grad_clip)
            samples += n
            done += 1
            if done >= steps + WARMUP:
                break
        epoch += 1
    return samples / (time.perf_counter() - t)


def machine_ceiling(cfg, steps: int) -> tuple[float, float]:
    """What this machine gives two independent single-thread trainers vs one: the best that any
    2-worker data-parallel run can reach here, before Ray or gradient exchange."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    tree = cfg.model_dump(mode="json")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        one = pool.submit(plain_steps, tree, steps).result()
        two = sum(f.result() for f in [pool.submit(plain_steps, tree, steps) for _ in range(2)])
    return one, two


def run(cfg, workers: int, steps: int) -> dict:
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(cfg.train.storage_path) / f"timings-{workers}-{time.time_ns()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        timed_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "steps": steps, "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"scaling-{workers}-{time.time_ns()}", storage_path=cfg.train.storage_path),
    )
    trainer.fit()
    m = json.loads(out.read_text())
    # Rank 0's report; every rank ran the same number of steps with the same batch size.
    m["samples_per_s"] = m["samples"] * m["world"] / m["wall_s"]
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", default="av", choices=["visual", "audio", "av"])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per worker (after warm-up)")
    ap.add_argument("--batch-size", type=int, default=16, help="per worker")
    args = ap.parse_args()

    from avssl.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    work = Path(tempfile.mkdtemp(prefix="avssl-bench-"))
    cfg = config(work, f"objective.name={args.objective}", f"data.batch_size={args.batch_size}", "train.epochs=50")
    results = {}
    for workers in (1, 2, 1, 2):  # interleaved; the better of two runs each
        m = run(cfg, workers, args.steps)
        print(f"{workers} worker(s): {m['samples_per_s']:.1f} samples/s", flush=True)
        if workers not in results or m["samples_per_s"] > results[workers]["samples_per_s"]:
            results[workers] = m
    speedup = results[2]["samples_per_s"] / results[1]["samples_per_s"]
    one, two = machine_ceiling(cfg, args.steps)
    ceiling = two / one
    print(f"two independent plain processes: {two:.1f} samples/s vs one alone {one:.1f}: {ceiling:.2f}x", flush=True)
    rows = []
    for w in (1, 2):
        m = results[w]
        rows.append([w, m["samples_per_s"], m["step_ms"], m["data_ms"], m["forward_ms"], m["backward_ms"], m["optimizer_ms"],
                     m["allreduce_ms"] or "-", m["cores_used"]])
    print()
    print(table(
        f"Scaling: objective {args.objective}, tiny preset, batch {args.batch_size} per worker, 1 CPU + 1 thread per worker, "
        f"{args.steps} timed steps (rank 0 shown)",
        ["workers", "samples/s", "step ms", "data wait ms", "forward ms", "backward+allreduce ms", "optimizer ms",
         "allreduce alone ms", "cores used by rank 0"],
        rows,
    ))
    print(f"speedup 2 vs 1 workers: {speedup:.2f}x ({verdict(speedup, 1.6, True)} >= 1.6x); model parameters: {results[1]['params']:,}")
    print(f"machine ceiling: two independent plain single-thread trainers give {ceiling:.2f}x one alone "
          f"({two:.1f} vs {one:.1f} samples/s); Ray + DDP reach {speedup / ceiling:.0%} of that")
    save("scaling", {"objective": args.objective, "steps": args.steps, "batch_size": args.batch_size, "results": {str(k): v for k, v in results.items()},
                     "speedup": speedup, "target": 1.6, "independent_1proc_samples_per_s": one, "independent_2proc_samples_per_s": two,
                     "machine_ceiling": ceiling, "meets_target": speedup >= 1.6}, "python benchmarks/scaling.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
