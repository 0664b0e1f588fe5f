"""`avssl prepare` clips/s on an LRW-layout fixture: the Ray Data engine with 1 and 2 workers, and
the local process pool with 1 and 2 processes, side by side in one run; every output manifest is
compared byte for byte with the 1-process one.

    python benchmarks/prepare_scaling.py [--words 40] [--per-split 8]

The fixture is LRW's published layout (WORD/{train,val,test}/WORD_NNNNN.mp4, 29 frames of 96x96
video with 16 kHz audio, written by PyAV), made once under benchmarks/results/. The Ray runtime is
started before timing, as on a running cluster. Target: 2 workers >= 1.6x the clips/s of 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, save, table, verdict  # noqa: E402


def fixture(words: int, per_split: int) -> Path:
    import numpy as np

    from avssl.data.media import write_mp4

    root = RESULTS / f"lrw_fixture_{words}x{per_split}"
    done = root / ".complete"
    if done.exists():
        return root
    print(f"writing the LRW-layout fixture ({words * 3 * per_split} clips) in {root} ...", flush=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(29 / 25 * 16000)) / 16000
    for w in range(words):
        word = f"WORD{w:03d}"
        for split in ("train", "val", "test"):
            for k in range(1, per_split + 1):
                p = root / word / split / f"{word}_{k:05d}.mp4"
                p.parent.mkdir(parents=True, exist_ok=True)
                # A moving bright blob on noise: content the codec has to work for, like a face.
                frames = rng.integers(0, 60, (29, 96, 96), dtype=np.uint8)
                for f in range(29):
                    frames[f, 30 + f : 60 + f, 30:66] += 150
                audio = 0.2 * np.sin(2 * np.pi * rng.uniform(120, 260) * t) + 0.01 * rng.standard_normal(len(t))
                write_mp4(p, frames, audio.astype(np.float32))
    done.touch()
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--per-split", type=int, default=8)
    args = ap.parse_args()

    from avssl.config import load_config
    from avssl.data.prepare import prepare
    from avssl.runtime import ensure_ray

    root = fixture(args.words, args.per_split)
    base = load_config("tiny", []).prepare
    ensure_ray()
    runs = [("processes", 1), ("processes", 2), ("ray", 1), ("ray", 2)]
    rows, results, manifests = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine, workers in runs:
            cfg = base.model_copy(update={"engine": engine, "workers": workers})
            t = time.perf_counter()
            r = prepare("lrw", root, Path(tmp) / f"{engine}{workers}", cfg, quiet=True)
            seconds = time.perf_counter() - t
            manifests[(engine, workers)] = (Path(r["out"]) / "manifest.jsonl").read_bytes()
            results[f"{engine}_{workers}"] = {"clips": r["clips"], "seconds": seconds, "clips_per_s": r["clips"] / seconds}
            print(f"  {engine} x{workers}: {r['clips']} clips in {seconds:.1f} s", flush=True)
    reference = manifests[("processes", 1)]
    for (engine, workers), m in manifests.items():
        results[f"{engine}_{workers}"]["manifest_identical_to_processes_1"] = m == reference
        rows.append([engine, workers, results[f"{engine}_{workers}"]["clips"], results[f"{engine}_{workers}"]["seconds"],
                     results[f"{engine}_{workers}"]["clips_per_s"], "yes" if m == reference else "NO"])
    speedup = results["ray_2"]["clips_per_s"] / results["ray_1"]["clips_per_s"]
    results["ray_speedup_2_vs_1"] = speedup
    results["ray_vs_processes_at_2"] = results["ray_2"]["clips_per_s"] / results["processes_2"]["clips_per_s"]
    print()
    print(table(f"avssl prepare, LRW layout, {rows[0][2]} clips", ["engine", "workers", "clips", "seconds", "clips/s", "same manifest"], rows))
    print(f"\nRay Data 2 workers vs 1: {speedup:.2f}x ({verdict(speedup, 1.6, True)}: >= 1.6x); "
          f"Ray Data vs process pool at 2 workers: {results['ray_vs_processes_at_2']:.2f}x")
    save("prepare_scaling", results, "python benchmarks/prepare_scaling.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
