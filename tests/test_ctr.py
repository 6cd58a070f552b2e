"""RF²'s CTR metrics (rated_auc / rated_ap / rated_logloss) against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rf2.eval.ctr import average_precision, ctr_metrics, grouped_ctr_metrics, log_loss, roc_auc

# labels and scores: positives at 0.9, 0.4, 0.4; negatives at 0.8, 0.4, 0.1
Y = np.array([1, 0, 1, 1, 0, 0])
S = np.array([0.9, 0.8, 0.4, 0.4, 0.4, 0.1])


def test_auc_by_hand() -> None:
    # pairs (pos, neg): 0.9 beats all 3 -> 3; each 0.4 loses to 0.8, ties 0.4 (1/2), beats 0.1
    # -> 2 x 1.5 = 3; total 6 of 9.
    assert roc_auc(Y, S) == pytest.approx(6 / 9)
    assert math.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_ap_by_hand() -> None:
    # thresholds 0.9: P=1, R=1/3; 0.8: no new positive; 0.4 (tie block of 3): tp=3 of 5
    # -> P=3/5, recall gain 2/3; AP = 1/3 * 1 + 2/3 * 3/5 = 0.7333...
    assert average_precision(Y, S) == pytest.approx(1 / 3 + 2 / 3 * 3 / 5)
    assert average_precision(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(1.0)


def test_logloss_by_hand() -> None:
    p = np.array([0.8, 0.25])
    assert log_loss(np.array([1, 0]), p) == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2)


def test_grouped_pools_each_tier_and_uses_sigmoid_of_logits() -> None:
    logits = np.array([2.0, -1.0, 0.5, 0.0])
    labels = np.array([1, 0, 0, 1])
    group = np.array([0, 0, 1, 1])
    out = grouped_ctr_metrics(labels, logits, group, ["low", "high"])
    assert out["tier/low/rated_auc"] == 1.0 and out["tier/high/rated_auc"] == 0.0
    assert out["rated_auc"] == pytest.approx(3 / 4)
    sig = 1 / (1 + np.exp(-logits))
    assert out["tier/low/rated_logloss"] == pytest.approx(
        -(math.log(sig[0]) + math.log(1 - sig[1])) / 2)
    assert out["tier/high/rated_samples"] == 2
    assert ctr_metrics(labels, logits)["rated_ap"] == pytest.approx(out["rated_ap"])
