"""The MFCC gap: a frozen audio-pretrained encoder (its pretext task is to regress MFCCs, log-mel and
prosody) against MFCC features, on the word task, as the pretraining budget grows (pool size x
steps), for every representation a head can read (evaluate.layer: the conv code, each GRU layer,
the top layer, all layers side by side, a learned weighted sum).

    python benchmarks/mfcc_gap.py                       # pools of 1000 and 4000 clips x 0/200/600/1800 steps
    python benchmarks/mfcc_gap.py --steps 0,200 --pools 1.0 --seeds 2   # a quick look

Everything runs through the product: `generate` for the corpora, `pretrain` (Ray Train) for the
encoders, `run_jobs` for the frozen heads (features computed once per encoder and layer), and the
report's bootstrap for the intervals. Prints a table, saves benchmarks/results/mfcc_gap.json and
benchmarks/results/mfcc_gap.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine

LAYERS = ["code", "gru1", "last", "concat", "weighted"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(RESULTS / "mfcc_gap_work"))
    ap.add_argument("--pool-speakers", type=int, default=40)
    ap.add_argument("--pool-clips", type=int, default=100, help="clips per pool speaker (the full pool)")
    ap.add_argument("--pools", default="0.25,1.0", help="fractions of the pool's training clips used to pretrain")
    ap.add_argument("--steps", default="0,200,600,1800", help="pretraining steps (0 = the encoder at random init)")
    ap.add_argument("--seeds", type=int, default=3, help="head seeds per cell")
    ap.add_argument("--word-speakers", type=int, default=16)
    ap.add_argument("--word-clips", type=int, default=60)
    ap.add_argument("--name", default="mfcc_gap", help="results file stem (and encoder run-name prefix)")
    ap.add_argument("--layers", default=",".join(LAYERS), help="representations to evaluate")
    ap.add_argument("overrides", nargs="*", help="config overrides of the encoder, e.g. model.audio_encoder.base_channels=32")
    args = ap.parse_args()
    layers = args.layers.split(",")

    from avssl.config import load_config
    from avssl.data.synthetic.generator import generate
    from avssl.evaluate.runner import EvalJob, TaskDataCache, run_jobs
    from avssl.evaluate.sources import resolve_source
    from avssl.evaluate.stats import cell_interval
    from avssl.models import build_audio_encoder, save_encoder
    from avssl.runtime import ensure_ray
    from avssl.tracking import Tracker
    from avssl.train.trainer import pretrain_many

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pool, word = work / "pool", work / "word"
    base = [f"data.corpus={pool}", f"evaluate.corpora.word={word}", f"train.storage_path={work / 'runs'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=mfcc-gap", "synth.clip_seconds=1.2", "synth.baseline=false"]
    t0 = time.perf_counter()
    if not (pool / "corpus.json").exists():
        c = load_config("tiny", base + [f"synth.out={pool}", f"synth.speakers={args.pool_speakers}", f"synth.clips_per_speaker={args.pool_clips}",
                                        "synth.labelled=false", "synth.video=false", "synth.vocabulary=broad", "synth.split=[0.9,0.05,0.05]", "synth.name=pool"])
        generate(c.synth, c.seed)
    if not (word / "corpus.json").exists():
        c = load_config("tiny", base + [f"synth.out={word}", f"synth.speakers={args.word_speakers}", f"synth.clips_per_speaker={args.word_clips}",
                                        f"synth.speaker_offset={args.pool_speakers}", "synth.video=false", "synth.vocabulary=commands",
                                        "synth.split=[0.5,0.19,0.31]", "synth.name=synth-word"])
        generate(c.synth, c.seed)
    synth_s = time.perf_counter() - t0

    cfg = load_config("tiny", base + args.overrides + ["objective.name=audio", "train.probe.enabled=false", "train.epochs=1000", "train.figure_every_epochs=0",
                                      "train.checkpoint_every_steps=1000", f"evaluate.seeds={list(range(args.seeds))}", "evaluate.tasks=[word]"])
    ensure_ray(cfg.train.ray_address)
    pools = [float(p) for p in args.pools.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    encoders: dict[tuple[float, int], str] = {}
    todo = []
    for frac in pools:
        for n in steps:
            name = f"{'gap' if args.name == 'mfcc_gap' else args.name}-pool{frac:g}-steps{n}"
            path = work / "runs" / name / "encoder.pt"
            if n == 0:  # the same architecture at random init (seed 0, as pretraining starts)
                import torch

                from avssl.data.corpus import Corpus
                from avssl.data.loader import iterate_rows, rows_for_pretraining
                from avssl.models import recalibrate_batchnorm

                torch.manual_seed(cfg.seed)
                enc = build_audio_encoder(cfg.model.audio_encoder)
                corpus = Corpus(pool)  # BatchNorm statistics recomputed as after pretraining
                recalibrate_batchnorm(enc, [b["wave"] for _, b in iterate_rows(corpus, rows_for_pretraining(corpus, 1.0, cfg.seed, max_clips=256), 32)])
                save_encoder(enc, cfg.model.audio_encoder, path, extra={"run_name": name, "objective": "none"})
            if not path.exists():
                c = cfg.model_copy(deep=True)
                c.run_name, c.train.max_steps, c.data.pretrain_fraction = name, n, frac
                todo.append(c)
            encoders[(frac, n)] = str(path)
    t1 = time.perf_counter()
    pretrain_many(todo, on_done=lambda r: print(f"  {r.run_name}: {r.metrics.get('step')} steps in {r.seconds:.0f} s", flush=True))
    pretrain_s = time.perf_counter() - t1

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    cache = TaskDataCache(cfg)
    data = cache.get("word")
    jobs = [EvalJob(resolve_source("mfcc", cfg), "word")]
    keys: list[tuple] = [("mfcc", None, None)]
    for (frac, n), path in encoders.items():
        for layer in layers:
            c = cfg.model_copy(deep=True)
            c.evaluate.layer = layer
            src = resolve_source(path, c)
            src.name = f"{Path(path).parent.name}-{layer}"
            jobs.append(EvalJob(src, "word"))
            keys.append((layer, frac, n))
    t2 = time.perf_counter()
    summaries = run_jobs(jobs, cfg, tracker, cache, on_done=lambda s: print(f"  {s.method}: {s.metrics['test/accuracy_mean']:.3f}", flush=True))
    eval_s = time.perf_counter() - t2

    y = np.asarray(data.test.targets)
    rows = []
    for key, s in zip(keys, summaries):
        preds = np.stack([r.predictions["clean"] for r in s.results])
        iv = cell_interval(y, preds, "accuracy", n_boot=2000)
        rows.append({"layer": key[0], "pool_fraction": key[1], "steps": key[2], "accuracy": iv.estimate, "low": iv.low, "high": iv.high,
                     "val": s.metrics.get("val/accuracy_mean")})
    mfcc = rows[0]
    pool_train = sum(1 for r in __import__("avssl.data.corpus", fromlist=["Corpus"]).Corpus(pool).rows if r["split"] == "train")
    print(f"\nword accuracy on {len(y)} test clips of {len(set(data.test.speakers))} unseen speakers, {args.seeds} head seeds, 95 % intervals over seeds x clips")
    print(f"MFCC (+ deltas, same GRU head): {mfcc['accuracy']:.3f} [{mfcc['low']:.3f}, {mfcc['high']:.3f}]")
    print(f"{'pool clips':>10} {'steps':>6} " + " ".join(f"{layer:>22}" for layer in layers))
    for frac in pools:
        for n in steps:
            cells = {r["layer"]: r for r in rows[1:] if r["pool_fraction"] == frac and r["steps"] == n}
            print(f"{int(round(frac * pool_train)):>10} {n:>6} " + " ".join(f"{cells[lay]['accuracy']:.3f} [{cells[lay]['low']:.3f},{cells[lay]['high']:.3f}]" for lay in layers))
    out = {"machine": machine(), "args": vars(args), "model": cfg.model.audio_encoder.model_dump(), "pool_train_clips": pool_train, "test_clips": len(y), "rows": rows,
           "seconds": {"synth": synth_s, "pretrain": pretrain_s, "evaluate": eval_s}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    figure(rows, pools, steps, pool_train, layers, RESULTS / f"{args.name}.png")
    print(f"saved {RESULTS / args.name}.json and .png (synth {synth_s:.0f} s, pretrain {pretrain_s:.0f} s, evaluate {eval_s:.0f} s)")


def figure(rows, pools, steps, pool_train, layers, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mfcc = rows[0]
    fig, axes = plt.subplots(1, len(pools), figsize=(4.6 * len(pools), 3.4), sharey=True, squeeze=False)
    x = np.arange(len(steps))
    for ax, frac in zip(axes[0], pools):
        ax.axhspan(mfcc["low"], mfcc["high"], color="0.8", label="MFCC (95 % interval)")
        ax.axhline(mfcc["accuracy"], color="0.4", lw=1)
        for i, layer in enumerate(layers):
            cells = [next(r for r in rows[1:] if r["layer"] == layer and r["pool_fraction"] == frac and r["steps"] == n) for n in steps]
            est = [c["accuracy"] for c in cells]
            ax.errorbar(x + (i - 2) * 0.06, est, yerr=[[e - c["low"] for e, c in zip(est, cells)], [c["high"] - e for e, c in zip(est, cells)]],
                        marker="o", ms=3, capsize=2, label=layer)
        ax.set_xticks(x, [str(n) for n in steps])
        ax.set_xlabel("pretraining steps (audio objective)")
        ax.set_title(f"pool of {int(round(frac * pool_train))} training clips", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("word accuracy (frozen encoder)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
