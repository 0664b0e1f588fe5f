"""The audio encoder's training step: `frame_codes` as computed (shared leading layers over the
whole clip, the next layer at stride 1, the code conv as a strided, dilated convolution over the
clip when that layer is the last, else one matrix product over the windows) against the same
function as the architecture defines it (every 0.2 s window through every conv module), forward
and forward + backward, side by side in one process.

    python benchmarks/audio_encoder_step.py [--threads 1] [--reps 10]

The encoder's per-frame codes are the part of the scratch baseline's training step, of frozen
feature extraction and of the audio objectives that the windows make expensive.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save, table  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def measure(preset: str, batch: int, seconds: float, threads: int, reps: int) -> dict:
    import torch

    from avssl.config import load_config
    from avssl.data.constants import SAMPLE_RATE
    from avssl.models.pretrain import build_audio_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = build_audio_encoder(load_config(preset).model.audio_encoder).train()
    wave = torch.randn(batch, int(seconds * SAMPLE_RATE)) * 0.1
    ways = {"as computed": enc.frame_codes, "by definition": enc.frame_codes_by_definition}
    out: dict = {"preset": preset, "batch": batch, "clip_s": seconds}
    for _ in range(2):  # interleaved, so drift on a noisy machine hits both
        for name, fn in ways.items():
            with torch.no_grad():
                out.setdefault(f"{name} forward_s", []).append(timed(lambda: fn(wave), reps))
            out.setdefault(f"{name} train_s", []).append(timed(lambda: fn(wave).sum().backward(), reps))
    return {k: (min(v) if isinstance(v, list) else v) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = what one Ray worker or evaluation task uses)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    rows, results = [], []
    for preset, batch in (("tiny", 32), ("paper", 8)):
        m = measure(preset, batch, 1.2, args.threads, args.reps)
        results.append(m)
        rows.append([preset, batch, m["by definition forward_s"] * 1e3, m["as computed forward_s"] * 1e3,
                     m["by definition forward_s"] / m["as computed forward_s"], m["by definition train_s"] * 1e3,
                     m["as computed train_s"] * 1e3, m["by definition train_s"] / m["as computed train_s"]])
    print(table(f"Audio encoder per-frame codes, 1.2 s clips, {args.threads} thread(s), best of 2 interleaved rounds of {args.reps}",
                ["preset", "batch", "fwd ms (definition)", "fwd ms (computed)", "fwd speed-up",
                 "fwd+bwd ms (definition)", "fwd+bwd ms (computed)", "fwd+bwd speed-up"], rows))
    save("audio_encoder_step", {"threads": args.threads, "results": results}, "python benchmarks/audio_encoder_step.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
