"""FedBuff's stale updates as array maths: the staleness weight and rebasing a reply.

A client that pulled w_v and replies x_k carries the update Δ_k = x_k − w_v. When the
server uses it at step t > v (staleness s = t − v), the reply is rebased onto the current
model: x'_k = w_t + (1 + s)^(−a) · Δ_k, so any aggregation rule that reads replies
(FedAvg's mean, HeteroFL's slices, per-row averaging, sparse rows) sees the
down-weighted delta applied to w_t. A fresh reply (s = 0) is left exactly as it came.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rf2.optim.sparse import ROWS, VALUES

Arrays = Mapping[str, np.ndarray]


def staleness_weight(staleness: int, exponent: float) -> float:
    """(1 + s)^(−exponent): FedBuff's default exponent is 0.5; 0 = no down-weighting."""
    return float((1.0 + staleness) ** -exponent)


def rebase(arrays: Arrays, pulled: Arrays, current: Arrays, weight: float) -> dict[str, np.ndarray]:
    """``current`` + ``weight`` · (``arrays`` − ``pulled``), per array of a reply (dense, or
    row-sparse: only its rows, ids kept), in the reply's dtype. ``pulled``/``current``
    are the client's reference arrays (its HeteroFL slice, or the whole model) at the
    version it pulled and now."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if key.endswith(ROWS):
            out[key] = value
            continue
        if key.endswith(VALUES):
            name = key[: -len(VALUES)]
            rows = np.asarray(arrays[name + ROWS])
            old, new = np.asarray(pulled[name])[rows], np.asarray(current[name])[rows]
        else:
            old, new = np.asarray(pulled[key]), np.asarray(current[key])
        moved = new.astype(np.float64) + weight * (value.astype(np.float64) - old)
        out[key] = moved.astype(value.dtype)
    return out
