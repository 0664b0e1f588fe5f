"""Batches for pretraining and evaluation, streamed from shards.

`RankStream` gives each Ray Train worker its own part of the corpus: whole shards per rank when
there are enough of them (each worker decodes only its own shards), otherwise every rank takes
every W-th clip. The order is a pure function of (seed, epoch, rank, world size), so a resumed run
skips exactly the batches it had done, and every rank yields the same number of batches (DDP
needs that).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from avssl.data.constants import HOP
from avssl.data.corpus import Clip, Corpus


def collate(clips: list[Clip], crop_frames: int, rng: np.random.Generator, still: str = "random", with_video: bool = True) -> dict[str, torch.Tensor]:
    """Pad (or randomly crop to `crop_frames`) a list of clips into one batch.

    wave [B, T*HOP] float32, frames [B, T, H, W] uint8, still [B, H, W] uint8, lengths [B].
    """
    spans = []
    for c in clips:
        n = c.n_frames
        if crop_frames and n > crop_frames:
            start = int(rng.integers(0, n - crop_frames + 1))
            spans.append((start, crop_frames))
        else:
            spans.append((0, n))
    t = max(n for _, n in spans)
    wave = np.zeros((len(clips), t * HOP), np.float32)
    lengths = np.zeros(len(clips), np.int64)
    for i, (c, (s, n)) in enumerate(zip(clips, spans)):
        wave[i, : n * HOP] = c.audio[s * HOP : (s + n) * HOP]
        lengths[i] = n
    batch = {"wave": torch.from_numpy(wave), "lengths": torch.from_numpy(lengths)}
    if with_video and all(c.frames is not None for c in clips):
        h, w = clips[0].frames.shape[1:]
        frames = np.zeros((len(clips), t, h, w), np.uint8)
        stills = np.zeros((len(clips), h, w), np.uint8)
        for i, (c, (s, n)) in enumerate(zip(clips, spans)):
            frames[i, :n] = c.frames[s : s + n]
            k = int(rng.integers(0, c.n_frames)) if still == "random" else 0
            stills[i] = c.frames[k]
        batch["frames"] = torch.from_numpy(frames)
        batch["still"] = torch.from_numpy(stills)
    return batch


class RankStream:
    def __init__(
        self,
        corpus: Corpus,
        rows: list[dict[str, Any]],
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        crop_frames: int = 0,
        still: str = "random",
        with_video: bool = True,
        prefetch: int = 2,
        transform: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None,
    ):
        """`transform` runs on each batch in the prefetch thread (e.g. computing pretext targets),
        overlapping with the training step."""
        if not rows:
            raise ValueError("no clips to stream")
        self.corpus, self.batch_size = corpus, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.crop_frames, self.still, self.with_video, self.prefetch = crop_frames, still, with_video, prefetch
        self.transform = transform
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_shard.setdefault(r["shard"], []).append(r)
        self.shards = sorted(by_shard)
        self.by_shard = by_shard
        self.shard_level = len(self.shards) >= 2 * world
        self.window = max(2 * max(len(v) for v in by_shard.values()), batch_size)
        if self.batches_in_epoch(0) == 0:
            smallest = min(len(a) for a in self._assignment(0))
            raise ValueError(
                f"{smallest} clips for a worker cannot fill one batch of {batch_size}; "
                "lower data.batch_size or train.num_workers"
            )

    def _assignment(self, epoch: int) -> list[list[dict[str, Any]]]:
        """Every rank's clips for this epoch, before shuffling within windows."""
        rng = np.random.default_rng([self.seed, epoch, 97])
        shards = [self.shards[i] for i in rng.permutation(len(self.shards))]
        if self.shard_level:
            return [[r for s in shards[k :: self.world] for r in self.by_shard[s]] for k in range(self.world)]
        rows = [r for s in shards for r in self.by_shard[s]]
        return [rows[k :: self.world] for k in range(self.world)]

    def batches_in_epoch(self, epoch: int) -> int:
        """The same on every rank (DDP needs it): the smallest rank's share decides."""
        return min(len(a) for a in self._assignment(epoch)) // self.batch_size

    def _order(self, epoch: int) -> list[dict[str, Any]]:
        rows = self._assignment(epoch)[self.rank]
        # Shuffle within windows of about two shards: random enough, and shards decode once each.
        rng = np.random.default_rng([self.seed, epoch, self.rank, 98])
        out = []
        for i in range(0, len(rows), self.window):
            chunk = rows[i : i + self.window]
            out.extend(chunk[j] for j in rng.permutation(len(chunk)))
        return out

    def _batches(self, epoch: int, start_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order(epoch)
        for b in range(start_batch, self.batches_in_epoch(epoch)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            clips = [self.corpus.load(r) for r in rows]
            batch_rng = np.random.default_rng([self.seed, epoch, self.rank, b])
            batch = collate(clips, self.crop_frames, batch_rng, self.still, self.with_video)
            yield self.transform(batch) if self.transform is not None else batch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of one epoch, from `start_batch` on, decoded ahead in a background thread."""
        if self.prefetch <= 0:
            yield from self._batches(epoch, start_batch)
            return
        q: "queue.Queue[Any]" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for batch in self._batches(epoch, start_batch):
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # surface loader errors in the training loop
                q.put(e)

        thread = threading.Thread(target=produce, name="avssl-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def iterate_rows(corpus: Corpus, rows: list[dict[str, Any]], batch_size: int, with_video: bool = False) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """Every row once, in order, padded into batches (evaluation)."""
    rng = np.random.default_rng(0)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        yield chunk, collate([corpus.load(r) for r in chunk], 0, rng, "first", with_video)


def rows_for_pretraining(corpus: Corpus, fraction: float, seed: int, max_clips: Optional[int] = None) -> list[dict[str, Any]]:
    return corpus.select("train", fraction=fraction, seed=seed, max_clips=max_clips or 0)
