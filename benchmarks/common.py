"""Shared by the benchmarks: the machine they ran on, a synthetic corpus made once, result tables
printed and saved as JSON under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The corpus every benchmark reads: default synthetic clip length and frame size, fewer speakers.
CORPUS_ARGS = ["synth.speakers=10", "synth.clips_per_speaker=24", "synth.baseline=false", "synth.workers=2"]

# A training setup small enough for minutes on 2 CPU cores, large enough that steps dominate.
TRAIN_ARGS = ["data.batch_size=16", "train.probe.enabled=false", "train.checkpoint_every_steps=1000", "train.log_every_steps=10",
              "train.figure_every_epochs=0", "train.threads_per_worker=1"]


def machine() -> dict[str, Any]:
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        info["cpu_model"] = model
    except (OSError, StopIteration):
        pass
    return info


def corpus(workdir: Path) -> Path:
    """The benchmark corpus, generated once and reused (same settings -> same clips)."""
    from avssl.config import load_config
    from avssl.data.synthetic.generator import generate

    out = RESULTS / "corpus"
    if not (out / "corpus.json").exists():
        cfg = load_config("tiny", CORPUS_ARGS + [f"synth.out={out}"])
        print(f"generating the benchmark corpus in {out} ...", flush=True)
        generate(cfg.synth, cfg.seed, quiet=True)
    return out


def config(workdir: Path, *extra: str):
    from avssl.config import load_config

    return load_config("tiny", TRAIN_ARGS + [f"data.corpus={corpus(workdir)}", f"train.storage_path={workdir / 'runs'}",
                                             f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"] + list(extra))


def table(title: str, header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def save(name: str, results: dict[str, Any], command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": command, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **results}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"\nsaved {path.relative_to(ROOT)}")
    return path


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "meets target" if ok else "MISSES target"
