"""Model efficiency: FLOPs per sample of the audio encoder + frame decoder (the `av` objective's
whole model) for the tiny and paper presets, counted with torch's FLOP counter, and the FLOP/s a
training step achieves on this machine vs its measured float32 matmul peak.

    python benchmarks/model_efficiency.py [--threads 1]

Counts are per clip of the synthetic corpus (1.6 s, 40 video frames; 64x64 frames for tiny,
96x96 for paper). Matmul and convolution FLOPs are counted (2 per multiply-add); elementwise work
is not, so achieved FLOP/s is a lower bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save, table  # noqa: E402


def matmul_peak(threads: int, n: int = 1024, reps: int = 20) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def corpus_for(preset: str, frame_size: int) -> Path:
    from avssl.config import load_config
    from avssl.data.synthetic.generator import generate

    out = Path(tempfile.mkdtemp(prefix=f"avssl-{preset}-")) / "synth"
    cfg = load_config(preset, [f"synth.out={out}", "synth.speakers=4", "synth.clips_per_speaker=8", "synth.baseline=false",
                               f"synth.frame_size={frame_size}", "synth.workers=2", "synth.split=[0.5,0.25,0.25]"])
    generate(cfg.synth, cfg.seed, quiet=True)
    return out


def measure(preset: str, frame_size: int, batch_size: int, threads: int, reps: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from avssl.config import load_config
    from avssl.train.loop import build_parts, train_step

    corpus = corpus_for(preset, frame_size)
    cfg = load_config(preset, [f"data.corpus={corpus}", "objective.name=av", f"data.batch_size={batch_size}", "train.use_gpu=false",
                               "train.epochs=1", "data.prefetch_batches=0"])
    torch.set_num_threads(threads)
    parts = build_parts(cfg, 0, 1, torch.device("cpu"))
    model = parts.model.train()
    batch = next(iter(parts.stream.epoch(0)))
    n = int(batch["wave"].shape[0])
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}

    with FlopCounterMode(display=False) as counter:
        inputs = parts.objective.model_inputs(batch, parts.generator)
        outputs = model(**inputs)
        loss, _ = parts.objective.loss(outputs, batch, inputs, model)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    backward = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        model.audio_encoder(batch["wave"])
    encoder = counter.get_total_flops()

    train_step(parts, model, model, batch, cfg.train.grad_clip)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        train_step(parts, model, model, batch, cfg.train.grad_clip)
    step_s = (time.perf_counter() - t) / reps
    return {
        "preset": preset, "frame_size": frame_size, "batch_size": n, "params": params,
        "encoder_forward_flops_per_clip": encoder / n, "forward_flops_per_clip": forward / n, "train_flops_per_clip": (forward + backward) / n,
        "step_s": step_s, "achieved_flops_per_s": (forward + backward) / step_s, "samples_per_s": n / step_s,
        "frames_decoded_per_clip": int(inputs["frame_of"].numel()) / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = what one Ray worker uses by default)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    peak = matmul_peak(args.threads)
    rows, results = [], []
    for preset, size, bs in (("tiny", 64, 16), ("paper", 96, 8)):
        m = measure(preset, size, bs, args.threads, args.reps if preset == "tiny" else max(2, args.reps // 2))
        results.append(m)
        rows.append([preset, f"{size}x{size}", f"{sum(m['params'].values()):,}", m["encoder_forward_flops_per_clip"] / 1e9,
                     m["forward_flops_per_clip"] / 1e9, m["train_flops_per_clip"] / 1e9, m["samples_per_s"],
                     m["achieved_flops_per_s"] / 1e9, f"{m['achieved_flops_per_s'] / peak:.1%}"])
        print(f"{preset}: {m['samples_per_s']:.1f} samples/s", flush=True)
    print()
    print(table(
        f"Model efficiency (av objective: audio encoder + identity encoder + U-Net decoder + attribute heads), {args.threads} thread(s); "
        f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s",
        ["preset", "frames", "params", "encoder fwd GFLOP/clip", "model fwd GFLOP/clip", "train GFLOP/clip", "samples/s",
         "achieved GFLOP/s", "of peak"],
        rows,
    ))
    save("model_efficiency", {"threads": args.threads, "matmul_peak_flops_per_s": peak, "presets": results},
         "python benchmarks/model_efficiency.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
