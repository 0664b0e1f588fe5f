"""A quick frozen-encoder probe, run at each pretraining eval: pooled embeddings -> a linear model
fitted on training speakers, scored on validation speakers. It is the downstream signal that
searches optimise, cheap enough (seconds) to run every epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from avssl.data.corpus import Corpus
from avssl.data.loader import iterate_rows
from avssl.evaluate.metrics import ccc, unweighted_average_recall
from avssl.evaluate.stats import bootstrap_se
from avssl.evaluate.tasks import TASKS
from avssl.models.heads import masked_time_mean


@torch.no_grad()
def pooled_embeddings(encoder: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> np.ndarray:
    """Mean and std over valid frames of each clip's embeddings."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for batch in batches:
        emb = encoder(batch["wave"].to(device)).float()
        lengths = batch["lengths"].to(device)
        mean = masked_time_mean(emb, lengths)
        std = masked_time_mean((emb - mean[:, None]) ** 2, lengths).sqrt()
        out.append(torch.cat([mean, std], 1).cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(out)


class QuickProbe:
    """With `folds` 0: fit on training speakers, score on validation speakers. With `folds` k >= 2:
    speaker-grouped k-fold over the training and validation speakers together, so every one of
    those clips gets a held-out-speaker prediction and the score has the resolution of all of them
    (test speakers are never touched either way)."""

    def __init__(self, corpus: Corpus, task_name: str, max_clips: int, seed: int = 0, batch_size: int = 32,
                 val_max_clips: int = 0, folds: int = 0):
        task_cls = TASKS.get(task_name)
        self.task = task_cls(corpus.label_values(task_cls.labels[0]) if task_cls.kind == "classification" else None)
        self.seed = seed
        train = corpus.select("train", require=self.task.labels, max_clips=max_clips, seed=seed)
        val = corpus.select("val", require=self.task.labels, max_clips=val_max_clips, seed=seed)
        self.available = bool(train) and bool(val)
        if not self.available:
            return
        rows = train + val
        self.y = np.array([self.task.target(r) for r in rows])
        # The same clips every epoch, so the same splits: fixed here, with the clips they score.
        if folds:
            from sklearn.model_selection import GroupKFold

            groups = np.unique([r["speaker"] for r in rows], return_inverse=True)[1]
            self.splits = list(GroupKFold(n_splits=min(folds, int(groups.max()) + 1)).split(self.y, groups=groups))
        else:
            self.splits = [(np.arange(len(train)), np.arange(len(train), len(rows)))]
        self.held_out = np.concatenate([te for _, te in self.splits])
        # Decoded once and kept: the probe runs every epoch on the same clips.
        self.batches = [b for _, b in iterate_rows(corpus, rows, batch_size)]

    def __call__(self, encoder: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """Scores a copy of the encoder with recomputed BatchNorm statistics (as it will be saved)."""
        if not self.available:
            return {}
        import copy

        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from avssl.models import recalibrate_batchnorm

        encoder = copy.deepcopy(encoder)
        recalibrate_batchnorm(encoder, [b["wave"] for b in self.batches[:8]], device)
        x = pooled_embeddings(encoder, self.batches, device)
        held_out = self.held_out
        y = self.y[held_out]
        out: dict[str, Any] = {"probe/val_clips": float(len(held_out))}
        if self.task.kind == "classification":
            n_classes = len(self.task.classes)
            proba = np.zeros((len(self.y), n_classes))
            for tr, te in self.splits:
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.5)).fit(x[tr], self.y[tr])
                proba[np.ix_(te, clf.classes_.astype(int))] = clf.predict_proba(x[te])
            proba = proba[held_out]
            pred = proba.argmax(1)
            p_true = proba[np.arange(len(y)), y.astype(int)]
            return out | {
                "probe/val_uar": unweighted_average_recall(y, pred, n_classes),
                "probe/val_uar_se": bootstrap_se(lambda i: unweighted_average_recall(y[i], pred[i], n_classes), len(y), self.seed),
                "probe/val_accuracy": float((pred == y).mean()),
                "probe/val_nll": float(-np.log(np.clip(p_true, 1e-7, 1.0)).mean()),
            }
        pred = np.zeros(self.y.shape)
        for tr, te in self.splits:
            pred[te] = make_pipeline(StandardScaler(), Ridge(alpha=10.0)).fit(x[tr], self.y[tr]).predict(x[te])
        pred = pred[held_out]

        def mean_ccc(i: np.ndarray) -> float:
            return float(np.nanmean([ccc(y[i, d], pred[i, d]) for d in range(pred.shape[1])]))

        return out | {"probe/val_ccc": mean_ccc(np.arange(len(y))), "probe/val_ccc_se": bootstrap_se(mean_ccc, len(y), self.seed)}

    @property
    def metric(self) -> str:
        return "probe/val_uar" if self.task.kind == "classification" else "probe/val_ccc"


def check_probe(cfg, metric: str = "") -> None:
    """Fail before any compute when the probe (or a search metric read from it) cannot be computed:
    its corpus must exist and label its task on training and validation speakers."""
    from avssl.config.schema import probe_corpus
    from avssl.errors import ConfigError, DataError

    probe = cfg.train.probe
    if metric.startswith("probe/") and not probe.enabled:
        raise ConfigError(f"metric '{metric}' comes from the pretraining probe, but train.probe.enabled is false")
    if not probe.enabled:
        return
    path = probe_corpus(cfg)
    corpus = Corpus(path)
    task_cls = TASKS.get(probe.task)
    for split in ("train", "val"):
        if not corpus.select(split, require=task_cls.labels):
            raise DataError(
                f"the pretraining probe (task '{probe.task}') needs '{split}' clips labelled with {', '.join(task_cls.labels)}; "
                f"corpus {corpus.root} has none. Point train.probe.corpus at a labelled corpus, or set train.probe.enabled=false"
            )
    produced = ("probe/val_uar", "probe/val_accuracy", "probe/val_nll") if task_cls.kind == "classification" else ("probe/val_ccc",)
    if metric.startswith("probe/") and metric not in produced:
        raise ConfigError(f"metric '{metric}' is not produced by a '{probe.task}' probe (it reports {', '.join(produced)})")
