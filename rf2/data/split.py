"""Per-user time split and history features: ``Interactions`` -> ``FederatedDataset``.

Split rule (RF²: per user, history sorted by time, first 90% train, last 10% test):

1. A user's clicks are ordered by ``(timestamp, original order)`` -- a *stable* sort, so
   ties keep file order and the split is reproducible byte for byte.
2. A user with ``n >= 2`` clicks puts the first
   ``n_train = clamp(floor(train_fraction * n), 1, n - 1)`` clicks in train and the
   remaining ``n - n_train`` in test. The clamp guarantees every such user both trains
   and is evaluated (n=2 -> 1+1; n=10 at 0.9 -> 9+1; n=11 -> 9+2).
3. A user with exactly one click goes to train only: it can still contribute updates as
   a client but has nothing to be evaluated on (its test slice is empty).

``floor`` gets a 1e-9 tolerance so that e.g. ``0.29 * 100 = 28.999999999999996`` counts
as 29, as a human reading the rule would expect.

Users with zero clicks never reach this module: :func:`compact_users` drops them and
re-indexes the rest contiguously (sorted by original id), which the loaders call right
after thresholding.

History features (RF²: the last 10 clicked items before the predicted click) are
computed here too, from the CSR arrays, so every consumer pads and aligns the same way:
histories are right-aligned (most recent click last) and left-padded with ``pad``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from rf2.data.base import FederatedDataset, Interactions
from rf2.data.sorting import lex_stable_argsort

_FLOOR_EPS = 1e-9


def n_train_for(n: ArrayLike, train_fraction: float) -> np.ndarray:
    """Number of train clicks for users with ``n`` clicks each (see the module rule)."""
    n_arr = np.asarray(n, dtype=np.int64)  # (U,)
    if np.any(n_arr < 0):
        raise ValueError("click counts must be >= 0")
    k = np.floor(train_fraction * n_arr + _FLOOR_EPS).astype(np.int64)  # (U,)
    k = np.clip(k, 1, np.maximum(n_arr - 1, 1))
    # n <= 1: everything trains (n = 1 -> train only; n = 0 -> nothing at all).
    return np.where(n_arr >= 2, k, n_arr)


def compact_users(user_raw: np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary user ids to contiguous ``0..U-1`` (sorted by original id).

    Only users that appear (i.e. have at least one click) get an index, so users left
    without clicks after thresholding disappear from the federation.
    """
    uniq, inverse = np.unique(user_raw, return_inverse=True)  # (U,), (N,)
    return inverse.astype(np.int64).reshape(-1), int(uniq.size)


def time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Permutation that sorts clicks by user, then timestamp, then original position.

    Data already in that order (the synthetic generator's, many files') costs one
    O(N) check; otherwise two packed integer sorts (:mod:`rf2.data.sorting`).
    """
    if user.size > 1:
        du, dt = np.diff(user), np.diff(timestamp)
        if np.all((du > 0) | ((du == 0) & (dt >= 0))):
            return np.arange(user.size)
    return lex_stable_argsort(timestamp, user)


def split_interactions(
    inter: Interactions, name: str, train_fraction: float, history_len: int
) -> FederatedDataset:
    """Apply the module's split rule to every user (vectorised; no per-user loop)."""
    if inter.user.size == 0:
        raise ValueError(f"{name}: no interactions to split")
    counts = np.bincount(inter.user, minlength=inter.num_users)  # (U,)
    if np.any(counts == 0):
        raise ValueError(f"{name}: users without clicks must be dropped before splitting")
    order = time_order(inter.user, inter.timestamp)  # (N,)
    user_s, item_s = inter.user[order], inter.item[order]  # (N,), (N,)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (U,) first position per user
    rank = np.arange(user_s.size) - start[user_s]  # (N,) position within the user
    n_train = n_train_for(counts, train_fraction)  # (U,)
    is_train = rank < n_train[user_s]  # (N,)
    return FederatedDataset(
        name=name,
        num_users=inter.num_users,
        num_items=inter.num_items,
        train_indptr=_indptr(n_train),
        train_items=item_s[is_train].astype(np.int64),
        test_indptr=_indptr(counts - n_train),
        test_items=item_s[~is_train].astype(np.int64),
        history_len=history_len,
        item_genres=inter.item_genres,
        genre_names=inter.genre_names,
        user_ids=inter.user_ids,  # per-user outputs (tiers.csv) name users by raw id
    )


def _indptr(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (U + 1,)


def sliding_histories(
    items: np.ndarray, indptr: np.ndarray, history_len: int, pad: int = -1
) -> np.ndarray:
    """For every click, the ``history_len`` clicks of the same user just before it.

    Returns ``(len(items), history_len)``, right-aligned and left-padded with ``pad``
    where the user has fewer earlier clicks. Never crosses user boundaries.
    """
    counts = np.diff(indptr)  # (U,)
    owner_start = np.repeat(indptr[:-1], counts)  # (N,)
    pos = np.arange(items.size)  # (N,)
    offsets = np.arange(-history_len, 0)  # (L,)
    src = pos[:, None] + offsets[None, :]  # (N, L)
    valid = src >= owner_start[:, None]  # (N, L)
    out = np.full(src.shape, pad, dtype=np.int64)  # (N, L)
    out[valid] = items[src[valid]]
    return out

