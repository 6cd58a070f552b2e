"""RF²'s CTR metrics, pooled over a group's test *ratings*: AUC, AP, log-loss (NumPy).

RF² evaluates a click-through-rate model: every test rating of a tier's users is one
sample (label = click), all of them pooled, and AUC/AP/log-loss are computed over that
pool (a *global* ranking across users, unlike the per-user ranking ``auc`` of
:mod:`rf2.eval.ranking`). These functions take the pool's labels and scores; which score
a model gives a (user, item) pair is the caller's choice (rf2's evaluation uses the
retrieval logit, see :mod:`rf2.eval.evaluation`). No torch: plain arrays in and out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["average_precision", "ctr_metrics", "grouped_ctr_metrics", "log_loss",
           "roc_auc", "sigmoid"]

CTR_METRICS = ("rated_auc", "rated_ap", "rated_logloss")
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] in the log-loss


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties count 1/2.

    Mann-Whitney U from average ranks. NaN when either class is empty.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average rank (1-based) of each tie block
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Sum over distinct score thresholds (high to low) of (recall gain) x precision.

    The step-wise definition (as scikit-learn's ``average_precision_score``): tied scores
    form one threshold. NaN when there is no positive.
    """
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # end of each tie block
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0.0, tp]) / n_pos
    return float(np.sum(recall_gain * precision))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0:
        return math.nan
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ctr_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """``rated_auc``, ``rated_ap``, ``rated_logloss`` of one pool; P(click) = sigmoid(logit)."""
    return {"rated_auc": roc_auc(labels, logits),
            "rated_ap": average_precision(labels, logits),
            "rated_logloss": log_loss(labels, sigmoid(logits))}


def grouped_ctr_metrics(labels: np.ndarray, logits: np.ndarray, group: np.ndarray,
                        names: Sequence[str], prefix: str = "tier") -> dict[str, float]:
    """Overall metrics plus ``{prefix}/<name>/rated_*`` pooled within each group.

    ``group`` holds per sample an index into ``names``; also ``{prefix}/<name>/rated_samples``.
    """
    out = ctr_metrics(labels, logits)
    out["rated_samples"] = float(np.asarray(labels).size)
    g = np.asarray(group)
    for i, name in enumerate(names):
        m = g == i
        for key, value in ctr_metrics(labels[m], logits[m]).items():
            out[f"{prefix}/{name}/{key}"] = value
        out[f"{prefix}/{name}/rated_samples"] = float(m.sum())
    return out
