"""`avssl prepare`: a real corpus in its published layout -> the corpus format.

Bad clips are skipped and counted by reason (or, with --strict, stop the run naming the path and
reason). The output corpus is built aside and renamed into place, so nothing already written is
lost or left half-done.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from avssl.config.schema import Config, PrepareConfig
from avssl.data.corpus import Clip, CorpusWriter
from avssl.data.readers import READERS
from avssl.data.readers.base import Item, Reader, Skip, speaker_splits
from avssl.errors import BadClipError, DataError
from avssl.progress import Progress

_WORKER_READER: Optional[Reader] = None


def _init_worker(dataset: str, root: str, cfg: PrepareConfig) -> None:
    global _WORKER_READER
    import torch

    torch.set_num_threads(1)
    _WORKER_READER = READERS.get(dataset)(Path(root), cfg)


def _load(item: Item) -> Union[list[Clip], BadClipError]:
    assert _WORKER_READER is not None
    try:
        return _WORKER_READER.load_many(item)
    except BadClipError as e:
        return e


def prepare(
    dataset: str,
    root: str | Path,
    out: str | Path,
    cfg: PrepareConfig,
    seed: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    reader = READERS.get(dataset)(Path(root), cfg)
    found = list(reader.items())
    items = [x for x in found if isinstance(x, Item)]
    skips: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def skip(reason: str, message: str) -> None:
        if strict:
            raise DataError(f"--strict: {message} [{reason}]")
        skips[reason] += 1
        examples.setdefault(reason, message)

    for s in (x for x in found if isinstance(x, Skip)):
        skip(s.reason, s.message)
    if not items:
        if skips:
            raise DataError(f"{reader.empty_error()}; every candidate was skipped: {dict(skips)}")
        raise reader.empty_error()
    if cfg.max_clips:
        items = items[: cfg.max_clips]
    split_of = speaker_splits([i.speaker for i in items if i.split is None], cfg.split, seed)
    for i in items:
        if i.split is None:
            i.split = split_of[i.speaker]

    writer = CorpusWriter(out, name=dataset, shard_size=cfg.shard_size, overwrite=overwrite)
    progress = Progress(f"prepare {dataset}", len(items), "files") if not quiet else None
    workers = min(cfg.workers or os.cpu_count() or 1, len(items))
    kept = 0

    def consume(results: Iterable[tuple[Item, Union[list[Clip], BadClipError]]]) -> None:
        nonlocal kept
        for item, result in results:
            if progress:
                progress.update()
            if isinstance(result, BadClipError):
                skip(result.reason, str(result))
                continue
            for clip in result:
                clip.split = item.split or clip.split
                writer.add(clip)
                kept += 1

    try:
        if workers <= 1:
            _init_worker(dataset, str(root), cfg)
            consume((item, _load(item)) for item in items)
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(dataset, str(root), cfg)) as pool:
                consume(zip(items, pool.map(_load, items, chunksize=8)))
        labels = dict(getattr(reader, "labels", {}) or {})
        path = writer.finish({"source": {"dataset": dataset, "root": str(Path(root).resolve())}, "labels": labels, "skipped": dict(skips)})
    except BaseException:
        import shutil

        shutil.rmtree(writer.partial, ignore_errors=True)
        raise
    if progress:
        progress.close()
    return {"out": str(path), "clips": kept, "files": len(items), "skipped": dict(skips), "examples": examples}


def prepare_command(cfg: Config, dataset: str, root: str, out: str, strict: bool, overwrite: bool) -> int:
    from avssl.data.pipeline import summarise
    from avssl.data.summary import format_summary

    result = prepare(dataset, root, out, cfg.prepare, cfg.seed, strict=strict, overwrite=overwrite)
    print(format_summary(summarise(result["out"], baseline=False)))
    total_skipped = sum(result["skipped"].values())
    print(f"  kept {result['clips']} clips from {result['files']} files; skipped {total_skipped}")
    for reason, n in sorted(result["skipped"].items(), key=lambda kv: -kv[1]):
        print(f"    {reason}: {n}  (e.g. {result['examples'][reason]})")
    return 0
