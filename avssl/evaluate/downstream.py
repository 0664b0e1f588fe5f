"""Training and testing one downstream head (one method x task x seed).

Audio stays in the corpus shards and is read when a batch needs it (`ClipAudio`). Frozen sources
(hand features, frozen pretrained encoders) are computed once per split and noise condition into
the feature store and read back by every seed, head and study; trainable ones (scratch, fine-tuned)
run end to end with the head, streaming clips shard by shard. Memory is a few shards and a batch,
whatever the corpus size. Early stopping keeps the epoch with the best validation score; test
metrics are computed once, with that state, on every requested condition.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from avssl.config.schema import EvaluateConfig
from avssl.data.constants import HOP
from avssl.data.corpus import ClipAudio, Corpus
from avssl.data.loader import collate
from avssl.evaluate.features import FeatureSet, FeatureStore, FrameMoments, feature_set_key
from avssl.evaluate.metrics import confusion_matrix
from avssl.evaluate.noise import BabblePool, Condition, condition_name, mix
from avssl.evaluate.sources import FeatureSource
from avssl.evaluate.tasks.base import Task
from avssl.models.heads import DownstreamHead, length_mask, masked_mean

CLEAN: Condition = ("clean", None)



@dataclass
class SplitData:
    rows: list[dict[str, Any]]
    waves: Sequence[np.ndarray]  # a ClipAudio (read from the shards when indexed), or waves in memory
    targets: np.ndarray  # [N] class ids or [N, K] values
    frame_targets: Optional[list[np.ndarray]] = None  # per clip [T, K] (continuous affect)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def clips_digest(self) -> str:
        import hashlib

        if getattr(self, "_clips_digest", None) is None:
            self._clips_digest = hashlib.sha256("\n".join(self.clip_ids).encode()).hexdigest()[:16]
        return self._clips_digest

    @property
    def clip_ids(self) -> list[str]:
        return [r["clip_id"] for r in self.rows]

    @property
    def speakers(self) -> list[str]:
        return [str(r["speaker"]) for r in self.rows]

    def subset(self, idx: np.ndarray) -> "SplitData":
        ft = [self.frame_targets[i] for i in idx] if self.frame_targets is not None else None
        waves = self.waves.subset(idx) if isinstance(self.waves, ClipAudio) else [self.waves[i] for i in idx]
        return SplitData([self.rows[i] for i in idx], waves, self.targets[idx], ft)

    def training_order(self, rng: np.random.Generator) -> np.ndarray:
        """One shuffled pass: shard by shard when the audio is read from shards (each decoded once)."""
        if isinstance(self.waves, ClipAudio):
            return self.waves.shard_windows(rng)
        return rng.permutation(len(self))


@dataclass
class TaskData:
    task: Task
    train: SplitData
    val: SplitData
    test: SplitData
    babble_pool: Optional[BabblePool] = None
    babble_talkers: int = 4
    corpus_name: str = ""
    corpus_path: str = ""
    corpus_digest: str = ""
    store: FeatureStore = field(default_factory=FeatureStore)
    cache: dict[str, FeatureSet] = field(default_factory=dict)  # feature sets this process has opened, by key


def test_noise_seed(cond: Condition) -> int:
    """The noise seed of a test condition: fixed by the condition alone, so every method, study and
    rerun tests on the same noisy audio."""
    import zlib

    return 10_000 + zlib.crc32(condition_name(cond).encode()) % 1_000_000


def load_task_data(corpus: Corpus, task: Task, max_clips: int = 0, seed: int = 0, babble_talkers: int = 4,
                   store: Optional[FeatureStore] = None) -> TaskData:
    """The labelled clips of the three splits: rows, targets and per-frame targets in memory, audio
    left in the shards (read when a batch needs it). `store`: where frozen features go (default: a
    temporary folder of this process)."""

    def split(name: str) -> SplitData:
        rows = corpus.select(name, require=task.labels, max_clips=max_clips, seed=seed)
        if not rows:
            from avssl.errors import DataError

            raise DataError(f"corpus {corpus.root} has no '{name}' clips labelled with {', '.join(task.labels)} for task '{task.name}'")
        targets = np.array([task.target(r) for r in rows])
        frame_targets = None
        if task.kind == "regression":  # per-frame labels (continuous affect): small, read clip by clip
            per_clip = []
            for r in rows:
                labels = corpus.load(r).frame_labels
                if not all(k in labels for k in task.labels):
                    per_clip = None
                    break
                per_clip.append(np.stack([labels[k] for k in task.labels], 1))
            frame_targets = per_clip
        return SplitData(rows, ClipAudio(corpus, rows), targets, frame_targets)

    data = TaskData(task, split("train"), split("val"), split("test"), babble_talkers=babble_talkers,
                    corpus_name=corpus.name, corpus_path=str(corpus.root), corpus_digest=corpus.digest(), store=store or FeatureStore())
    # Babble: training and validation speakers' utterances (never the test split); a clip's own
    # speaker is left out when its babble is drawn.
    data.babble_pool = BabblePool.from_split(ClipAudio(corpus, data.train.rows + data.val.rows), data.train.speakers + data.val.speakers,
                                             data.train.clip_ids + data.val.clip_ids)
    return data


def applied_snrs(data: TaskData, cond: Condition) -> np.ndarray:
    """The SNR (dB) each test clip gets under a condition, measured on the mixed audio over the clip's
    own length: the noise is a function of (condition, clip), so this is what every method heard."""
    from avssl.evaluate.noise import measured_snr

    test = data.test
    out = np.zeros(len(test))
    for i in range(0, len(test), 32):
        idx = np.arange(i, min(i + 32, len(test)))
        batch = _batch_waves(test, idx)
        lengths = batch["lengths"] * HOP
        noisy = mix(batch["wave"], lengths, cond, test_noise_seed(cond), [test.rows[k]["clip_id"] for k in idx],
                    [str(test.rows[k]["speaker"]) for k in idx], data.babble_pool, data.babble_talkers)
        for j, k in enumerate(idx):
            out[k] = measured_snr(batch["wave"][j], noisy[j], int(lengths[j]))
    return out


def fraction_of(split: SplitData, fraction: float, seed: int) -> SplitData:
    """A seeded subset of the labelled clips, the same fraction from every speaker."""
    if fraction >= 1.0:
        return split
    rng = np.random.default_rng([seed, 5])
    by_spk: dict[str, list[int]] = {}
    for i, r in enumerate(split.rows):
        by_spk.setdefault(r["speaker"], []).append(i)
    keep: list[int] = []
    for spk in sorted(by_spk):
        idx = by_spk[spk]
        keep += list(rng.permutation(idx)[: max(1, int(round(len(idx) * fraction)))])
    return split.subset(np.array(sorted(keep)))


def feature_key(source: FeatureSource, data: TaskData, split: SplitData, cond: Condition, noise_seed: int) -> str:
    """The feature store's key of a frozen source's features of some clips under a condition:
    everything that decides them (the babble settings only when there is babble)."""
    babble = f"babble x{data.babble_talkers}" if cond[0] == "babble" and cond[1] is not None else ""
    return feature_set_key(source.digest(), data.corpus_digest, split.clips_digest, condition_name(cond), noise_seed, babble)


def _batch_waves(split: SplitData, idx: np.ndarray) -> dict[str, torch.Tensor]:
    from avssl.data.corpus import Clip

    clips = [Clip(str(i), "x", "x", split.waves[i]) for i in idx]
    return collate(clips, 0, np.random.default_rng(0), with_video=False)


@dataclass
class HeadResult:
    curves: dict[str, list[float]]
    best_epoch: int
    val: dict[str, float]
    test: dict[str, dict[str, float]]
    confusion: Optional[np.ndarray]
    seconds: float
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> test predictions (classes or values)


class HeadTrainer:
    def __init__(self, source: FeatureSource, data: TaskData, cfg: EvaluateConfig, device: Optional[torch.device] = None):
        self.source, self.data, self.cfg = source, data, cfg
        self.task = data.task
        self.device = device or torch.device("cpu")
        self._norm: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def feature_norm(self, module: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean/std of the source's features over the clean training clips: an encoder's
        scale is arbitrary, and the head should not have to learn it. Frozen sources use their stored
        features' statistics; a trainable encoder (scratch, fine-tuned) is measured once, at its
        initial weights, and keeps that fixed normalisation while it trains (the same input as the
        frozen path). Both are running sums: nothing of the size of the split is held."""
        if module is not None:
            moments = FrameMoments()
            for feats in self._features(module, self.data.train, CLEAN, 0):
                for x in feats:
                    moments.add(x)
            return moments.mean_std()
        if self._norm is None:
            fs = self.frozen_features("train", self.data.train, CLEAN, 0)
            self._norm = (torch.tensor(fs.mean), torch.tensor(fs.std))  # (copies: arrays from Ray are read-only)
        return self._norm

    # -- features ---------------------------------------------------------------------------
    def _noisy(self, batch: dict[str, torch.Tensor], split: SplitData, idx: np.ndarray, cond: Condition, noise_seed: int) -> torch.Tensor:
        return mix(batch["wave"], batch["lengths"] * HOP, cond, noise_seed, [split.rows[i]["clip_id"] for i in idx],
                   [str(split.rows[i]["speaker"]) for i in idx], self.data.babble_pool, self.data.babble_talkers)

    @torch.no_grad()
    def _features(self, module: torch.nn.Module, split: SplitData, cond: Condition, noise_seed: int) -> Iterator[list[torch.Tensor]]:
        """[T, D] per clip, a batch at a time, in the split's order (each shard decoded once)."""
        was_training = module.training
        module = module.to(self.device).eval()
        bs = 32
        try:
            for i in range(0, len(split), bs):
                idx = np.arange(i, min(i + bs, len(split)))
                batch = _batch_waves(split, idx)
                feats = module(self._noisy(batch, split, idx, cond, noise_seed).to(self.device)).float().cpu()
                yield [feats[j, : int(batch["lengths"][j])].clone() for j in range(len(idx))]
        finally:
            module.train(was_training)

    def frozen_features(self, split_name: str, split: SplitData, cond: Condition, noise_seed: int) -> FeatureSet:
        """A frozen source's features of a split under a condition: from this process's sets, else the
        feature store, else computed once into the store. A label fraction of the training split is a
        view of the whole split's clean features."""
        key = self._cache_key(split, cond, noise_seed)
        if key in self.data.cache:
            return self.data.cache[key]
        train = self.data.train
        if split is not train and split_name == "train" and cond == CLEAN and noise_seed == 0 and len(split) < len(train):
            full = self.frozen_features("train", train, CLEAN, 0)
            pos = {cid: i for i, cid in enumerate(train.clip_ids)}
            if all(c in pos for c in split.clip_ids):
                self.data.cache[key] = full.subset(pos[c] for c in split.clip_ids)
                return self.data.cache[key]
        fs = self.data.store.get(key)
        if fs is None:
            fs = self.data.store.write(key, self._features(self.source.module, split, cond, noise_seed))
        self.data.cache[key] = fs
        return fs

    def _cache_key(self, split: SplitData, cond: Condition, noise_seed: int) -> str:
        return feature_key(self.source, self.data, split, cond, noise_seed)

    def _targets(self, split: SplitData, idx: np.ndarray) -> torch.Tensor:
        y = torch.as_tensor(split.targets[idx])
        return y.long() if self.task.kind == "classification" else y.float()

    def _frame_targets(self, split: SplitData, idx: np.ndarray, t: int) -> Optional[torch.Tensor]:
        if split.frame_targets is None:
            return None
        out = torch.zeros(len(idx), t, len(self.task.labels))
        for j, i in enumerate(idx):
            ft = torch.tensor(split.frame_targets[i][:t])  # arrays from the object store are read-only
            out[j, : len(ft)] = ft
        return out

    # -- one pass -----------------------------------------------------------------------------
    def _forward(self, encoder, head, split: SplitData, idx: np.ndarray, feats: Optional[FeatureSet], cond: Condition, noise_seed: int,
                 norm: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        if feats is not None:
            mean, std = self.feature_norm()
            seq = [(feats.clip(i) - mean) / std for i in idx]
            lengths = torch.tensor([len(x) for x in seq])
            x = torch.nn.utils.rnn.pad_sequence(seq, batch_first=True)
        else:
            batch = _batch_waves(split, idx)
            x = encoder(self._noisy(batch, split, idx, cond, noise_seed).to(self.device))
            if norm is not None:  # the trainable encoder's fixed input normalisation (as the frozen path)
                x = (x - norm[0].to(self.device)) / norm[1].to(self.device)
            lengths = batch["lengths"]
        x, lengths = x.to(self.device), lengths.to(self.device)
        clip, frames = head(x, lengths, per_frame=split.frame_targets is not None)
        return clip, frames, lengths

    def _loss(self, clip, frames, lengths, split: SplitData, idx: np.ndarray) -> torch.Tensor:
        y = self._targets(split, idx).to(self.device)
        if self.task.kind == "classification":
            return torch.nn.functional.cross_entropy(clip, y)
        loss = torch.nn.functional.mse_loss(clip, y)
        if frames is not None:
            ft = self._frame_targets(split, idx, frames.shape[1]).to(self.device)
            loss = loss + masked_mean((frames - ft) ** 2, length_mask(lengths, frames.shape[1]))
        return loss

    @torch.no_grad()
    def predict(self, encoder, head, split_name: str, split: SplitData, cond: Condition, noise_seed: int, norm=None) -> tuple[np.ndarray, Optional[tuple[list, list]]]:
        head.eval()
        if encoder is not None:
            encoder.eval()
        feats = None if encoder is not None else self.frozen_features(split_name, split, cond, noise_seed)
        preds, ft_true, ft_pred = [], [], []
        for i in range(0, len(split), self.cfg.batch_size):
            idx = np.arange(i, min(i + self.cfg.batch_size, len(split)))
            clip, frames, lengths = self._forward(encoder, head, split, idx, feats, cond, noise_seed, norm)
            preds.append(clip.float().cpu().numpy())
            if frames is not None:
                for j, k in enumerate(idx):
                    n = int(lengths[j])
                    ft_true.append(split.frame_targets[k][:n])
                    ft_pred.append(frames[j, :n].float().cpu().numpy())
        head.train()
        if encoder is not None:
            encoder.train()
        return np.concatenate(preds), ((ft_true, ft_pred) if ft_true else None)

    def score(self, encoder, head, split_name: str, split: SplitData, cond: Condition, noise_seed: int, norm=None) -> tuple[dict[str, float], np.ndarray]:
        pred, frames = self.predict(encoder, head, split_name, split, cond, noise_seed, norm)
        return self.task.score(split.targets, pred, frames), pred

    # -- training -----------------------------------------------------------------------------
    def _recalibrate(self, encoder: torch.nn.Module, train: SplitData) -> None:
        """Precise BatchNorm for a trainable encoder before it is scored: running averages lag the
        weights, and with few labelled clips (a handful of steps per epoch) they barely leave their
        initial values, so an encoder scored in eval mode would see statistics of other weights."""
        from avssl.models import recalibrate_batchnorm

        waves = (_batch_waves(train, np.arange(i, min(i + 32, len(train))))["wave"] for i in range(0, len(train), 32))
        recalibrate_batchnorm(encoder, waves, self.device)

    def _optimizer(self, head: torch.nn.Module, encoder: Optional[torch.nn.Module]) -> torch.optim.Optimizer:
        """The head at `lr`; a scratch encoder (random init) at `lr` too; a fine-tuned pretrained
        encoder at its own, lower `encoder_lr`."""
        groups = [{"params": list(head.parameters()), "lr": self.cfg.lr}]
        if encoder is not None:
            enc_lr = self.cfg.lr if self.source.kind == "scratch" else self.cfg.encoder_lr
            groups.append({"params": list(encoder.parameters()), "lr": enc_lr})
        return torch.optim.AdamW(groups, weight_decay=1e-3)

    def fit(self, seed: int, train: Optional[SplitData] = None, test_conditions: tuple[Condition, ...] = (CLEAN,), train_conditions: tuple[Condition, ...] = (),
            val_se: bool = False) -> HeadResult:
        """Train one head; with `train_conditions`, each epoch's audio gets the next noise condition;
        with `val_se`, also the bootstrap standard error of its validation score (what a search
        reports next to the score it selects on)."""
        t0 = time.perf_counter()
        train = train or self.data.train
        torch.manual_seed(seed)
        encoder = self.source.for_seed(seed).to(self.device) if self.source.trainable else None
        norm = self.feature_norm(encoder) if encoder is not None else None
        head = DownstreamHead(self.cfg.head, self.source.dim, self.task.out_dim, self.cfg.hidden, n_layers=self.source.n_layers).to(self.device)
        opt = self._optimizer(head, encoder)
        params = [p for g in opt.param_groups for p in g["params"]]
        warmup = self.cfg.frozen_warmup_epochs if (encoder is not None and self.source.kind == "pretrained") else 0
        rng = np.random.default_rng([seed, 17])
        curves: dict[str, list[float]] = {"train_loss": [], "train_score": [], "val_score": []}
        best = (-np.inf, 0, None)
        bad_epochs = 0
        primary = self.task.primary
        # A small label fraction gets several passes per epoch, so every fraction trains for at least
        # `min_steps` optimiser steps (the same budget in steps, not in passes over fewer clips).
        batches = -(-len(train) // self.cfg.batch_size)
        passes = max(1, -(-self.cfg.min_steps // (self.cfg.epochs * batches)))
        steps = 0  # early stopping waits for min_steps: a slow start (a scratch encoder's plateau at chance) is not the end
        for epoch in range(self.cfg.epochs):
            train_cond = train_conditions[epoch % len(train_conditions)] if train_conditions else CLEAN
            noisy_training = train_cond != CLEAN
            noise_seed = seed * 1000 + epoch if noisy_training else 0  # fresh noise each epoch
            if encoder is not None:
                encoder.requires_grad_(epoch >= warmup)
            feats = None
            if encoder is None:
                feats = self.frozen_features("train", train, train_cond, noise_seed)
            # Trainable sources read audio: shard by shard. Frozen ones read stored features: any order.
            order = np.concatenate([train.training_order(rng) if encoder is not None else rng.permutation(len(train)) for _ in range(passes)])
            losses, preds = [], np.zeros((len(train), self.task.out_dim), np.float32)
            for i in range(0, len(order), self.cfg.batch_size):
                idx = order[i : i + self.cfg.batch_size]
                clip, frames, lengths = self._forward(encoder, head, train, idx, feats, train_cond, noise_seed, norm)
                loss = self._loss(clip, frames, lengths, train, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                steps += 1
                losses.append(float(loss.detach()))
                preds[idx] = clip.detach().float().cpu().numpy()
            if encoder is not None:
                self._recalibrate(encoder, train)
            if noisy_training and encoder is None:  # one-off noisy features: do not keep them
                key = self._cache_key(train, train_cond, noise_seed)
                self.data.cache.pop(key, None)
                self.data.store.discard(key)
            train_score = self.task.score(train.targets, preds)[primary]
            val_metrics, _ = self.score(encoder, head, "val", self.data.val, CLEAN, 0, norm)
            curves["train_loss"].append(float(np.mean(losses)))
            curves["train_score"].append(float(train_score))
            curves["val_score"].append(float(val_metrics[primary]))
            if val_metrics[primary] > best[0]:
                state = {"head": copy.deepcopy(head.state_dict()), "encoder": copy.deepcopy(encoder.state_dict()) if encoder is not None else None}
                best = (val_metrics[primary], epoch, state)
                bad_epochs = 0
            else:
                bad_epochs += 1
                if bad_epochs >= self.cfg.patience and epoch >= warmup and steps >= self.cfg.min_steps:
                    break
        _, best_epoch, state = best
        head.load_state_dict(state["head"])
        if encoder is not None:
            encoder.load_state_dict(state["encoder"])
        val_metrics, val_pred = self.score(encoder, head, "val", self.data.val, CLEAN, 0, norm)
        if val_se and self.task.kind == "classification":  # the selection score's resolution
            from avssl.evaluate.stats import bootstrap_se

            y_val, p_val = np.asarray(self.data.val.targets), val_pred
            val_metrics[f"{primary}_se"] = bootstrap_se(lambda i: self.task.score(y_val[i], p_val[i])[primary], len(y_val), seed)
        tests: dict[str, dict[str, float]] = {}
        predictions: dict[str, np.ndarray] = {}
        confusion = None
        for cond in test_conditions:
            metrics, pred = self.score(encoder, head, "test", self.data.test, cond, test_noise_seed(cond), norm)
            tests[condition_name(cond)] = metrics
            predictions[condition_name(cond)] = pred.argmax(-1).astype(np.int16) if self.task.kind == "classification" else pred.astype(np.float32)
            if cond == CLEAN and self.task.kind == "classification":
                confusion = confusion_matrix(self.data.test.targets, pred.argmax(-1), len(self.task.classes))
        return HeadResult(curves, best_epoch + 1, val_metrics, tests, confusion, time.perf_counter() - t0, predictions)
