"""`avssl evaluate` memory and throughput against corpus size: peak RSS and clips/s of one frozen
encoder evaluated on the emotion task of synthetic corpora of 2k, 8k and 32k clips.

    python benchmarks/eval_scaling.py [--sizes 2000,8000,32000]

Each corpus is audio-only (40 speakers, 1.6 s clips), generated once under benchmarks/results/.
The encoder is the tiny preset's architecture at a fixed random init (what is measured is the
pipeline, not the encoder's quality). Each evaluation runs as its own `avssl evaluate` process
(one seed, 2 head epochs, in that process: evaluate.parallel=false), and its peak RSS is the
kernel's high-water mark for that process. Target: peak RSS at the largest size <= 1.5x that at
the smallest, time roughly linear in clips.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, save, table, verdict  # noqa: E402

SPEAKERS = 40


def corpus(n: int) -> Path:
    from avssl.config import load_config
    from avssl.data.synthetic.generator import generate

    out = RESULTS / f"eval_corpus_{n}"
    if not (out / "corpus.json").exists():
        cfg = load_config("tiny", ["synth.protocol=false", f"synth.out={out}", f"synth.speakers={SPEAKERS}",
                                   f"synth.clips_per_speaker={n // SPEAKERS}", "synth.video=false", "synth.baseline=false", "synth.workers=2"])
        print(f"generating {n} clips in {out} ...", flush=True)
        generate(cfg.synth, cfg.seed, quiet=True)
    return out


def encoder(work: Path) -> Path:
    import torch

    from avssl.config import load_config
    from avssl.models import build_audio_encoder, save_encoder

    cfg = load_config("tiny", []).model.audio_encoder
    torch.manual_seed(0)
    return save_encoder(build_audio_encoder(cfg), cfg, work / "encoder.pt", extra={"run_name": "random-init"})


def evaluate(n: int, enc: Path, work: Path) -> dict[str, float]:
    cmd = [str(Path(sys.executable).parent / "avssl"), "evaluate", "--config", "tiny", f"evaluate.encoder={enc}", "evaluate.tasks=[emotion]",
           f"evaluate.corpora.emotion={corpus(n)}", "evaluate.seeds=[0]", "evaluate.epochs=2", "evaluate.parallel=false",
           f"tracking.uri=sqlite:///{work / f'mlflow{n}.db'}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"avssl evaluate failed at {n} clips:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        print(f"  note: the {n}-clip run did not raise the children's high-water mark ({before} KiB)")
    return {"clips": n, "seconds": seconds, "clips_per_s": n / seconds, "peak_rss_gib": peak_kib / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,8000,32000")
    args = ap.parse_args()
    sizes = sorted(int(x) for x in args.sizes.split(","))
    for n in sizes:
        corpus(n)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        enc = encoder(work)
        for n in sizes:  # smallest first: RUSAGE_CHILDREN is a running maximum
            results[str(n)] = evaluate(n, enc, work)
            print(f"  {n} clips: {results[str(n)]['seconds']:.1f} s, peak RSS {results[str(n)]['peak_rss_gib']:.2f} GiB", flush=True)
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    ratio = large["peak_rss_gib"] / small["peak_rss_gib"]
    time_ratio = (large["seconds"] / small["seconds"]) / (sizes[-1] / sizes[0])
    results["rss_ratio_largest_vs_smallest"] = ratio
    results["time_per_clip_ratio_largest_vs_smallest"] = time_ratio
    print()
    print(table("avssl evaluate, one frozen encoder, emotion, 1 seed x 2 epochs", ["clips", "seconds", "clips/s", "peak RSS GiB"],
                [[r["clips"], r["seconds"], r["clips_per_s"], r["peak_rss_gib"]] for r in (results[str(n)] for n in sizes)]))
    print(f"\npeak RSS {sizes[-1]} vs {sizes[0]} clips: {ratio:.2f}x ({verdict(ratio, 1.5, False)}: <= 1.5x); "
          f"time per clip {time_ratio:.2f}x")
    save("eval_scaling", results, "python benchmarks/eval_scaling.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
