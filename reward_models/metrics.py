"""Reward-model metrics in plain numpy: AUROC, calibration (ECE, reliability bins),
pairwise accuracy, and segment classification scores against a majority baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties count half
    (the Mann-Whitney U statistic with average ranks)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability_bins(labels: Sequence[int], probs: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1]: count, mean predicted probability, observed positive rate.
    A probability of exactly 1.0 falls in the last bin."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        n = int(mask.sum())
        out.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "mean_prob": float(p[mask].mean()) if n else float("nan"),
                "positive_rate": float(y[mask].mean()) if n else float("nan"),
            }
        )
    return out


def expected_calibration_error(labels: Sequence[int], probs: Sequence[float], bins: int = 10) -> float:
    """ECE = sum over bins of (n_bin / N) * |observed positive rate - mean predicted probability|."""
    total = len(labels)
    if total == 0:
        return float("nan")
    return float(
        sum(
            b["count"] / total * abs(b["positive_rate"] - b["mean_prob"])
            for b in reliability_bins(labels, probs, bins)
            if b["count"]
        )
    )


def quantile_buckets(labels: Sequence[int], probs: Sequence[float], buckets: int = 5) -> list[dict[str, float]]:
    """P[Love] vs observed positive rate in equal-count buckets (sorted by predicted probability)."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    order = np.argsort(p, kind="mergesort")
    out = []
    for chunk in np.array_split(order, min(buckets, len(order))):
        if len(chunk):
            out.append(
                {
                    "count": int(len(chunk)),
                    "min_prob": float(p[chunk].min()),
                    "max_prob": float(p[chunk].max()),
                    "mean_prob": float(p[chunk].mean()),
                    "positive_rate": float(y[chunk].mean()),
                }
            )
    return out


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs where the chosen reply scores higher; ties count half."""
    c = np.asarray(chosen, dtype=float)
    r = np.asarray(rejected, dtype=float)
    if len(c) == 0:
        return float("nan")
    return float(((c > r).sum() + 0.5 * (c == r).sum()) / len(c))


def classification_scores(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """Accuracy, F1 of the error class (label 1) and macro-F1 over {0, 1}."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(preds, dtype=int)

    def f1(cls: int) -> float:
        tp = int(((p == cls) & (y == cls)).sum())
        fp = int(((p == cls) & (y != cls)).sum())
        fn = int(((p != cls) & (y == cls)).sum())
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    return {
        "accuracy": float((y == p).mean()) if len(y) else float("nan"),
        "f1_error": f1(1),
        "macro_f1": (f1(0) + f1(1)) / 2,
        "segments": int(len(y)),
    }


def majority_baseline(train_labels: Sequence[int], eval_labels: Sequence[int]) -> dict[str, float]:
    """Predict the training set's most frequent label for every held-out segment."""
    majority = int(np.mean(np.asarray(train_labels, dtype=float)) > 0.5) if len(train_labels) else 0
    scores = classification_scores(eval_labels, [majority] * len(eval_labels))
    scores["label"] = majority
    return scores
