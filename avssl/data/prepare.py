"""`avssl prepare`: a real corpus in its published layout -> the corpus format.

Listing happens here; decoding (PyAV / soundfile), face cropping and resampling run on Ray Data
across the nodes of the Ray cluster (`prepare.engine=ray`, the default; the local runtime on one
machine) or in a local process pool (`processes`). Either way the decoded clips come back in
listing order and this process cuts them into shards, so a corpus comes out with the same
manifest whatever the engine and the number of workers.

Bad clips are skipped and counted by reason (or, with --strict, stop the run naming the path and
reason). The output corpus is built aside and renamed into place, so nothing already written is
lost or left half-done.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

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


Decoded = Union[list[Clip], BadClipError]


def _decode_in_processes(dataset: str, root: str, cfg: PrepareConfig, items: list[Item]) -> Iterator[Decoded]:
    workers = min(cfg.workers or os.cpu_count() or 1, len(items))
    if workers <= 1:
        _init_worker(dataset, root, cfg)
        yield from (_load(item) for item in items)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(dataset, root, cfg)) as pool:
        yield from pool.map(_load, items, chunksize=cfg.batch_files)


class _RayDecoder:
    """A Ray Data actor: one reader per worker process, a batch of pickled items in, the pickled
    clips (or the clip's error) out."""

    def __init__(self, dataset: str, root: str, cfg: dict[str, Any]):
        _init_worker(dataset, root, PrepareConfig.model_validate(cfg))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = [pickle.dumps(_load(pickle.loads(blob)), protocol=pickle.HIGHEST_PROTOCOL) for blob in batch["item"]]
        return {"index": batch["index"], "decoded": np.array(out, dtype=object)}


class _NoProgressBarNotice(logging.Filter):
    """Ray Data announces that its bars are off; ours is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def _decode_on_ray(dataset: str, root: str, cfg: PrepareConfig, items: list[Item]) -> Iterator[Decoded]:
    """Ray Data: the items spread over actor workers (one CPU each, on every node), results
    streamed back in listing order with bounded memory."""
    import ray.data

    from avssl.runtime import ensure_ray

    resources = ensure_ray()
    workers = cfg.workers or max(1, int(resources.get("CPU", 1)))
    workers = max(1, min(workers, -(-len(items) // cfg.batch_files)))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # the manifest must not depend on which worker finished first
    ctx.enable_progress_bars = False  # one progress line, ours
    quiet = _NoProgressBarNotice()
    logging.getLogger("ray.data._internal.progress").addFilter(quiet)
    try:
        ds = ray.data.from_items([{"index": i, "item": pickle.dumps(item)} for i, item in enumerate(items)],
                                 override_num_blocks=max(1, min(len(items), workers * 4)))
        ds = ds.map_batches(_RayDecoder, fn_constructor_args=(dataset, root, cfg.model_dump(mode="json")), batch_size=cfg.batch_files,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
        expected = 0
        for row in ds.iter_rows():
            if int(row["index"]) != expected:  # a guard on the ordering the manifest relies on
                raise RuntimeError(f"Ray Data returned file {int(row['index'])} where {expected} was due")
            expected += 1
            yield pickle.loads(row["decoded"])
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        logging.getLogger("ray.data._internal.progress").removeFilter(quiet)


ENGINES = {"ray": _decode_on_ray, "processes": _decode_in_processes}


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
    root = Path(root).resolve()  # Ray workers run in other folders (and on other nodes)
    reader = READERS.get(dataset)(root, cfg)
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
    progress = Progress(f"prepare {dataset} ({cfg.engine})", len(items), "files") if not quiet else None
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
        consume(zip(items, ENGINES[cfg.engine](dataset, str(root), cfg, items)))
        labels = dict(getattr(reader, "labels", {}) or {})
        path = writer.finish({"source": {"dataset": dataset, "root": str(root)}, "labels": labels, "skipped": dict(skips)})
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
