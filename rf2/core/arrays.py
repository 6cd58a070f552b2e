"""Small NumPy helpers shared across layers."""

from __future__ import annotations

import numpy as np

__all__ = ["sorted_unique"]


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """``np.unique(keys)`` (sorted, flattened, same dtype) by sort-and-compare.

    NumPy 2's ``unique`` hashes: ~1 s per million int64 keys here against ~50 ms for a
    sort, and ~20 us against ~5 us on the few hundred row ids of one client's loss,
    which a round computes several hundred times."""
    out = np.sort(keys, axis=None)
    if out.size > 1:
        keep = np.empty(out.size, dtype=bool)
        keep[0] = True
        np.not_equal(out[1:], out[:-1], out=keep[1:])
        out = out[keep]
    return out
