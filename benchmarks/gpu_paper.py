"""The `paper` preset on one GPU: pretraining throughput and memory, and downstream evaluation on
the GPU against the same work on the machine's CPUs.

    python benchmarks/gpu_paper.py --pool DIR --emotion DIR [--steps 40]

Pretraining: each objective (visual, audio, av) at the paper preset's sizes (96x96 frames, batch
32), mixed precision as the preset sets it (`auto`: bf16 where the GPU has it), plus the av
objective in float32 and at batch 128. Batches are decoded once and replayed, so samples/s is the
model's training step (forward, backward, optimiser), not the loader; the loader's own rate is
measured separately. Peak memory is torch's allocator high-water mark for that configuration.

Evaluation: an encoder of the paper architecture (taken from the av run above) read frozen by the
emotion task's GRU head, as one evaluation task runs it: with `evaluate.use_gpu` (features
extracted into the feature store and the head trained on the GPU) and without it (one CPU thread,
what a Ray evaluation task holds), one seed each; then a scratch encoder trained end to end with
its head on the GPU.

Runs without Ray or MLflow: what it measures is the work a Ray Train worker or an evaluation task
does on its GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gib(n: float) -> float:
    return n / 2**30


def pretrain(pool: str, objective: str, batch: int, precision: str, steps: int, device) -> dict:
    import torch

    from avssl.config import load_config
    from avssl.train.loop import build_parts, train_step

    cfg = load_config("paper", [f"data.corpus={pool}", f"objective.name={objective}", f"data.batch_size={batch}",
                                f"train.mixed_precision={precision}", "train.epochs=50", "data.prefetch_batches=0"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    parts = build_parts(cfg, 0, 1, device)
    t = time.perf_counter()
    batches, epoch = [], 0
    while len(batches) < min(steps, 8):
        batches += list(parts.stream.epoch(epoch))
        epoch += 1
    load_s = (time.perf_counter() - t) / len(batches)
    batches = batches[:8]
    model = parts.model.train()
    for b in batches[:3]:  # warm-up: cuDNN autotuning, allocator growth
        train_step(parts, model, model, b, cfg.train.grad_clip)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    losses = []
    for i in range(steps):
        loss, _, _ = train_step(parts, model, model, batches[i % len(batches)], cfg.train.grad_clip)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / steps
    finite = bool(torch.isfinite(torch.stack([x.detach().float() for x in losses])).all())
    return {"objective": objective, "batch": batch, "precision": str(parts.dtype or torch.float32).replace("torch.", ""),
            "samples_per_s": batch / step_s, "step_ms": 1000 * step_s, "loader_samples_per_s": batch / load_s,
            "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()) if cuda else 0.0,
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else 0.0,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]), "finite": finite,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "model": model, "cfg": cfg}


def evaluate(emotion: str, encoder_file: Path, use_gpu: bool, spec: str, epochs: int) -> dict:
    """One evaluation task as Ray runs it (`extract_features`, then `fit_seeds` for one seed: one CPU
    thread, or the GPU with evaluate.use_gpu), without Ray."""
    import torch

    from avssl.config import load_config
    from avssl.data.corpus import Corpus
    from avssl.evaluate.downstream import CLEAN, load_task_data
    from avssl.evaluate.features import FeatureStore
    from avssl.evaluate.runner import extract_features, fit_seeds, make_task
    from avssl.evaluate.sources import resolve_source

    cfg = load_config("paper", [f"evaluate.corpora.emotion={emotion}", f"evaluate.epochs={epochs}", "evaluate.min_steps=0",
                                f"evaluate.use_gpu={str(use_gpu).lower()}"])
    corpus = Corpus(emotion)
    data = load_task_data(corpus, make_task("emotion", corpus), store=FeatureStore(tempfile.mkdtemp()))  # each run extracts its own
    source = resolve_source(str(encoder_file) if spec == "pretrained" else spec, cfg, None, 0,
                            like=cfg.model.audio_encoder if spec == "scratch" else None)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    n = len(data.train) + len(data.val) + len(data.test)
    extract_s, features = 0.0, None
    if not source.trainable:
        t = time.perf_counter()
        features = extract_features(source, data, cfg.evaluate, (CLEAN,))
        extract_s = time.perf_counter() - t
    t = time.perf_counter()
    result = fit_seeds(source, data, cfg.evaluate, 1.0, (CLEAN,), (), [0], features)[0]
    fit_s = time.perf_counter() - t
    out = {"source": spec, "device": "cuda" if use_gpu else "cpu (1 thread, as one Ray task)", "clips": n, "extract_s": extract_s,
           "extract_clips_per_s": n / extract_s if extract_s else None, "fit_s": fit_s, "epochs_run": len(result.curves["train_loss"]),
           "test_uar": result.test["clean"]["uar"]}
    if use_gpu:
        out["peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated())
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--emotion", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--head-epochs", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="a few steps on the CPU, to check the script itself")
    args = ap.parse_args()

    import torch

    from avssl.models import save_encoder

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA device: this benchmark measures the paper preset on a GPU (--smoke runs it on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if gpu else "CPU (smoke)"
    print(f"{name}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    keep = None
    grid = (("visual", 32, "auto"), ("audio", 32, "auto"), ("av", 32, "auto"), ("av", 32, "off"), ("av", 128, "auto"))
    for objective, batch, precision in (grid[2:3] if args.smoke else grid):
        r = pretrain(args.pool, objective, batch, precision, args.steps, device)
        if objective == "av" and batch == 32 and precision == "auto":
            keep = (r["model"], r["cfg"])
        r.pop("model"), r.pop("cfg")
        rows.append(r)
        print(f"pretrain {objective:<6} batch {batch:<4} {r['precision']:<8} {r['samples_per_s']:8.1f} samples/s  "
              f"{r['step_ms']:7.1f} ms/step  peak {r['peak_alloc_gib']:.2f} GiB alloc / {r['peak_reserved_gib']:.2f} GiB reserved  "
              f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  loader {r['loader_samples_per_s']:.0f} samples/s (1 thread)", flush=True)
        if gpu:
            torch.cuda.empty_cache()
    model, cfg = keep
    enc = Path(tempfile.mkdtemp()) / "encoder.pt"
    save_encoder(model.audio_encoder.cpu(), cfg.model.audio_encoder, enc, extra={"run_name": "paper-av-gpu", "objective": "av"})
    del model
    if gpu:
        torch.cuda.empty_cache()
    evals = []
    for spec, use_gpu in ((("pretrained", False), ("scratch", False)) if args.smoke else (("pretrained", True), ("pretrained", False), ("scratch", True))):
        r = evaluate(args.emotion, enc, use_gpu, spec, args.head_epochs)
        evals.append(r)
        print(f"evaluate {spec:<10} on {r['device']}: {r['clips']} clips, extraction {r['extract_s']:.1f} s"
              + (f" ({r['extract_clips_per_s']:.0f} clips/s)" if r["extract_clips_per_s"] else "")
              + f", head {r['fit_s']:.1f} s for {r['epochs_run']} epochs, test UAR {r['test_uar']:.3f}"
              + (f", peak {r['peak_alloc_gib']:.2f} GiB" if "peak_alloc_gib" in r else ""), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_paper.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                               "pretrain": rows, "evaluate": evals}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
