"""Corpus summary and the hand-feature baseline printed with it (how hard is this corpus?)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from avssl.data.corpus import Corpus


def mfcc_statistics(corpus: Corpus, rows: list[dict[str, Any]], batch: int = 64) -> np.ndarray:
    """Per clip: mean and std over time of 13 MFCCs and their deltas (a classic utterance vector)."""
    import torch

    from avssl.data.features import mfcc

    feats = []
    for i in range(0, len(rows), batch):
        chunk = [corpus.load(r).audio for r in rows[i : i + batch]]
        n = max(len(a) for a in chunk)
        wave = torch.from_numpy(np.stack([np.pad(a, (0, n - len(a))) for a in chunk]))
        with torch.no_grad():
            m = mfcc(wave)  # [B, T, 13]
        d = m[:, 1:] - m[:, :-1]
        for j, a in enumerate(chunk):
            t = max(2, len(a) // 640)
            mj, dj = m[j, :t], d[j, : t - 1]
            feats.append(torch.cat([mj.mean(0), mj.std(0), dj.mean(0), dj.std(0)]).numpy())
    return np.stack(feats)


def mfcc_baseline(corpus: Corpus, label: str, seed: int = 0) -> dict[str, float]:
    """Logistic regression on MFCC statistics, trained on train speakers, scored on test speakers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = corpus.select("train", require=[label])
    test = corpus.select("test", require=[label])
    if not train or not test:
        return {}
    x_tr, x_te = mfcc_statistics(corpus, train), mfcc_statistics(corpus, test)
    y_tr = [str(r[label]) for r in train]
    y_te = [str(r[label]) for r in test]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    clf.fit(x_tr, y_tr)
    pred = clf.predict(x_te)
    with warnings.catch_warnings():  # a word predicted that no test clip says: expected on small test sets
        warnings.simplefilter("ignore", UserWarning)
        uar = float(balanced_accuracy_score(y_te, pred))
    return {
        "accuracy": float(accuracy_score(y_te, pred)),
        "uar": uar,
        "chance": 1.0 / len(set(y_tr)),
        "train_clips": len(train),
        "test_clips": len(test),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"corpus '{summary['name']}': {summary['clips']} clips, {summary['hours'] * 60:.1f} min of audio"]
    lines.append("  split      clips  speakers")
    for s in ("train", "val", "test"):
        lines.append(f"  {s:<9} {summary['clips_per_split'][s]:>6}  {summary['speakers_per_split'][s]:>8}")
    video = f"{summary['frame_size'][0]}x{summary['frame_size'][1]} grayscale at 25 fps" if summary["has_video"] else "none (audio only)"
    lines.append(f"  video: {video}")
    lines.append(f"  on disk: {summary['bytes_on_disk'] / 2**20:.1f} MiB in {summary['shards']} shards")
    for k, v in summary.get("labels", {}).items():
        lines.append(f"  {k}: {len(v)} classes ({', '.join(map(str, v[:8]))}{', ...' if len(v) > 8 else ''})")
    for label, b in summary.get("baseline", {}).items():
        if b:
            lines.append(
                f"  baseline (MFCC statistics + logistic regression, held-out speakers) {label}: "
                f"accuracy {100 * b['accuracy']:.1f}%, UAR {100 * b['uar']:.1f}% (chance {100 * b['chance']:.1f}%)"
            )
    return "\n".join(lines)
