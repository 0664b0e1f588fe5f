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
from avssl.evaluate.tasks import TASKS
from avssl.models.heads import length_mask


@torch.no_grad()
def pooled_embeddings(encoder: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> np.ndarray:
    """Mean and std over valid frames of each clip's embeddings."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for batch in batches:
        emb = encoder(batch["wave"].to(device)).float()
        mask = length_mask(batch["lengths"].to(device), emb.shape[1]).unsqueeze(-1).float()
        n = mask.sum(1).clamp_min(1.0)
        mean = (emb * mask).sum(1) / n
        std = (((emb - mean[:, None]) ** 2 * mask).sum(1) / n).sqrt()
        out.append(torch.cat([mean, std], 1).cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(out)


class QuickProbe:
    def __init__(self, corpus: Corpus, task_name: str, max_clips: int, seed: int = 0, batch_size: int = 32):
        task_cls = TASKS.get(task_name)
        self.task = task_cls(corpus.label_values(task_cls.labels[0]) if task_cls.kind == "classification" else None)
        train = corpus.select("train", require=self.task.labels, max_clips=max_clips, seed=seed)
        val = corpus.select("val", require=self.task.labels, max_clips=max(10, max_clips // 2), seed=seed)
        self.available = bool(train) and bool(val)
        if not self.available:
            return
        self.y_train = np.array([self.task.target(r) for r in train])
        self.y_val = np.array([self.task.target(r) for r in val])
        # Decoded once and kept: the probe runs every epoch on the same clips.
        self.train_batches = [b for _, b in iterate_rows(corpus, train, batch_size)]
        self.val_batches = [b for _, b in iterate_rows(corpus, val, batch_size)]

    def __call__(self, encoder: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """Scores a copy of the encoder with recomputed BatchNorm statistics (as it will be saved)."""
        if not self.available:
            return {}
        import copy

        from avssl.models import recalibrate_batchnorm

        encoder = copy.deepcopy(encoder)
        recalibrate_batchnorm(encoder, [b["wave"] for b in self.train_batches[:8]], device)
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x_tr = pooled_embeddings(encoder, self.train_batches, device)
        x_va = pooled_embeddings(encoder, self.val_batches, device)
        if self.task.kind == "classification":
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.5))
            clf.fit(x_tr, self.y_train)
            pred = clf.predict(x_va)
            return {
                "probe/val_uar": unweighted_average_recall(self.y_val, pred, len(self.task.classes)),
                "probe/val_accuracy": float((pred == self.y_val).mean()),
            }
        reg = make_pipeline(StandardScaler(), Ridge(alpha=10.0)).fit(x_tr, self.y_train)
        pred = reg.predict(x_va)
        return {"probe/val_ccc": float(np.nanmean([ccc(self.y_val[:, i], pred[:, i]) for i in range(pred.shape[1])]))}

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
    produced = ("probe/val_uar", "probe/val_accuracy") if task_cls.kind == "classification" else ("probe/val_ccc",)
    if metric.startswith("probe/") and metric not in produced:
        raise ConfigError(f"metric '{metric}' is not produced by a '{probe.task}' probe (it reports {', '.join(produced)})")
