"""The data pipeline: clips/s the loader delivers (shard read + decode + crop + batch + pretext
targets) vs clips/s the trainer consumes, and synthetic-corpus generation clips/s.

    python benchmarks/data_pipeline.py [--objective av] [--epochs 3]

Measured in one process, one after the other: the loader alone (no training) with its prefetch
thread and synchronously, then the same loader feeding the training step (what a worker does).
Target: loader >= 5x what the trainer consumes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CORPUS_ARGS, config, save, table, verdict  # noqa: E402


def loader_rate(cfg, epochs: int, prefetch: int) -> float:
    import torch

    from avssl.train.loop import build_parts

    torch.set_num_threads(1)
    cfg = cfg.model_copy(deep=True)
    cfg.data.prefetch_batches = prefetch
    stream = build_parts(cfg, 0, 1, torch.device("cpu")).stream
    clips, t = 0, time.perf_counter()
    for e in range(epochs):
        for batch in stream.epoch(e):
            clips += batch["wave"].shape[0]
    return clips / (time.perf_counter() - t)


def trainer_rate(cfg, epochs: int) -> tuple[float, float]:
    """Clips/s the training loop consumes, and the fraction of its time spent waiting for data."""
    import torch

    from avssl.train.loop import build_parts, train_step

    torch.set_num_threads(1)
    parts = build_parts(cfg, 0, 1, torch.device("cpu"))
    model = parts.model.train()
    clips, wait, t0 = 0, 0.0, time.perf_counter()
    for e in range(epochs):
        t = time.perf_counter()
        for batch in parts.stream.epoch(e):
            wait += time.perf_counter() - t
            _, _, n = train_step(parts, model, model, batch, cfg.train.grad_clip)
            clips += n
            t = time.perf_counter()
    total = time.perf_counter() - t0
    return clips / total, wait / total


def synth_rate(workers: int, clips_per_speaker: int = 24, speakers: int = 10) -> float:
    from avssl.config import load_config
    from avssl.data.synthetic.generator import generate

    out = Path(tempfile.mkdtemp(prefix="avssl-synth-")) / "synth"
    args = [a for a in CORPUS_ARGS if not a.startswith(("synth.workers", "synth.speakers", "synth.clips_per_speaker"))]
    cfg = load_config("tiny", args + [f"synth.out={out}", f"synth.workers={workers}", f"synth.speakers={speakers}",
                                      f"synth.clips_per_speaker={clips_per_speaker}", "synth.shard_size=8"])
    t = time.perf_counter()
    generate(cfg.synth, cfg.seed, quiet=True)
    return speakers * clips_per_speaker / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", default="av", choices=["visual", "audio", "av"])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="avssl-bench-"))
    cfg = config(work, f"objective.name={args.objective}", f"train.epochs={args.epochs}")
    loader_alone = loader_rate(cfg, args.epochs, prefetch=cfg.data.prefetch_batches)
    loader_sync = loader_rate(cfg, args.epochs, prefetch=0)
    consumed, wait_fraction = trainer_rate(cfg, args.epochs)
    headroom = loader_alone / consumed
    synth_1 = synth_rate(1)
    synth_2 = synth_rate(2)
    c = cfg.synth
    print()
    print(table(
        f"Data pipeline: objective {args.objective}, batch {cfg.data.batch_size}, {c.clip_seconds:g} s clips at 16 kHz, "
        f"{c.frame_size}x{c.frame_size} frames at 25 fps, 1 thread",
        ["", "clips/s", "note"],
        [
            ["loader alone, prefetch thread", loader_alone, "read shard + decode + crop + batch + pretext targets"],
            ["loader alone, synchronous", loader_sync, ""],
            ["trainer consumes", consumed, f"data wait {wait_fraction:.1%} of training time"],
            ["headroom loader / trainer", f"{headroom:.1f}x", f"{verdict(headroom, 5.0, True)} >= 5x"],
            ["synth generation, 1 process", synth_1, "espeak-ng + faces + noise + shard writing"],
            ["synth generation, 2 processes", synth_2, f"{synth_2 / synth_1:.2f}x of 1 process"],
        ],
    ))
    save("data_pipeline", {"objective": args.objective, "epochs": args.epochs, "loader_clips_per_s": loader_alone,
                           "loader_sync_clips_per_s": loader_sync, "trainer_clips_per_s": consumed, "trainer_data_wait_fraction": wait_fraction,
                           "headroom": headroom, "target": 5.0, "meets_target": headroom >= 5.0,
                           "synth_clips_per_s_1proc": synth_1, "synth_clips_per_s_2proc": synth_2},
         "python benchmarks/data_pipeline.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
