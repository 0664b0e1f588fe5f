"""`avssl synth` and `avssl corpus`: generate or inspect a corpus and print what it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avssl.config.schema import Config, SynthConfig
from avssl.data.corpus import CORPUS_META, Corpus, atomic_write_bytes
from avssl.data.summary import format_summary, mfcc_baseline


def summarise(root: str | Path, baseline: bool, seed: int = 0) -> dict[str, Any]:
    corpus = Corpus(root)
    summary = corpus.summary()
    if baseline:
        summary["baseline"] = {
            label: mfcc_baseline(corpus, label, seed) for label in ("emotion", "word") if label in summary["labels"]
        }
    return summary


def synth_command(cfg: Config, overwrite: bool = False) -> int:
    """`avssl synth`: the protocol's corpora under synth.out (pool + one per downstream task), or one corpus."""
    if not cfg.synth.protocol:
        return synth_one(cfg, cfg.synth, overwrite)
    from avssl.data.synthetic.generator import protocol_corpora

    corpora = protocol_corpora(cfg.synth)
    print(f"synth: the offline protocol under {cfg.synth.out}: " + ", ".join(
        f"{name} ({c.speakers} speakers{'' if c.labelled else ', unlabelled'})" for name, c in corpora))
    for name, one in corpora:
        print(f"\n--- {name} ---")
        synth_one(cfg, one, overwrite)
    return 0


def synth_one(cfg: Config, synth: SynthConfig, overwrite: bool = False) -> int:
    from avssl.data.synthetic.generator import contact_sheet, generate

    print(f"synth: {synth.speakers} speakers x {synth.clips_per_speaker} clips of {synth.clip_seconds} s -> {synth.out}")
    stats = generate(synth, cfg.seed, overwrite=overwrite)
    summary = summarise(stats["out"], synth.baseline and synth.labelled, cfg.seed)
    summary["generation"] = stats
    meta_path = Path(stats["out"]) / CORPUS_META
    meta = json.loads(meta_path.read_text())
    meta["summary"] = {k: v for k, v in summary.items() if k in ("baseline", "generation")}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    sheet = contact_sheet(Path(stats["out"]))
    print(format_summary(summary))
    print(
        f"  generated {stats['clips']} clips in {stats['seconds']:.1f} s: {stats['clips_per_s']:.0f} clips/s "
        f"with {stats['workers']} processes ({stats['clips_per_s_per_worker']:.0f} clips/s per process)"
    )
    print(f"  contact sheet: {sheet}")
    return 0


def corpus_command(path: str, baseline: bool = False, upload: str | None = None) -> int:
    if upload:
        from avssl import storage
        from avssl.errors import ConfigError

        if not storage.is_remote(upload):
            raise ConfigError(f"--upload {upload}: give an object-store prefix such as s3://bucket/corpora/name")
        Corpus(path)  # a whole corpus, before anything is copied
        print(f"uploading {path} to {upload} ...", flush=True)
        storage.upload(Path(path), upload)
        path = upload
    print(format_summary(summarise(path, baseline)))
    return 0
