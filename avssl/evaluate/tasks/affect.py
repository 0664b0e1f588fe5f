"""Continuous affect: arousal and valence, scored by CCC per clip and over frame sequences."""

from __future__ import annotations

import numpy as np

from avssl.evaluate.metrics import ccc
from avssl.evaluate.tasks.base import TASKS, Task


@TASKS.register("affect")
class AffectTask(Task):
    name = "affect"
    kind = "regression"
    labels = ("arousal", "valence")
    primary = "ccc"

    def score(self, y_true, y_pred, frames=None):
        out = {f"ccc_{k}": ccc(y_true[:, i], y_pred[:, i]) for i, k in enumerate(self.labels)}
        if frames is not None:
            true_f, pred_f = frames
            if true_f:
                t, p = np.concatenate(true_f), np.concatenate(pred_f)
                for i, k in enumerate(self.labels):
                    out[f"ccc_{k}_frames"] = ccc(t[:, i], p[:, i])
        out["ccc"] = float(np.nanmean([out[f"ccc_{k}"] for k in self.labels]))
        return out
