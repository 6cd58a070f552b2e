"""Data protocols: which users and samples a loaded dataset keeps, and how it splits.

``dataset.protocol`` (works for every loader whose :class:`Interactions` carry
``ratings``; generic at that level, not per file format):

- ``clicks`` (default, rf2's original protocol): only clicks exist; users without a
  click are dropped; per user the clicks are split in time by
  :func:`rf2.data.split.split_interactions` (floor rule with clamps).
- ``rf2`` (RF²'s code, facebookresearch/RF2): every *rating* is a sample labelled
  click = rating >= threshold; users without any click stay in the population (they
  are tiered and their test ratings are evaluated, but with no training click they have
  nothing to train the retrieval model on). Per user, samples are sorted by
  (timestamp, label, item id) -- RF² sorts (time, click, movie) tuples, so at equal
  times non-clicks come first -- and sample ``i`` (0-based) is train while
  ``i < n * train_fraction`` in float64 arithmetic, i.e. the first
  ``ceil(n * train_fraction)`` samples (the float product, as RF² computes it). The
  train/test *clicks* the model sees are the clicks among those samples, in the same
  order; :class:`RatedSplit` keeps all samples with their labels for RF²'s tierings and
  CTR metrics.
"""

from __future__ import annotations

import numpy as np

from rf2.data.base import FederatedDataset, Interactions, RatedSplit
from rf2.data.sorting import lex_stable_argsort

PROTOCOLS = ("clicks", "rf2")


def drop_unclicked(inter: Interactions) -> Interactions:
    """The ``clicks`` protocol: keep only users with a click, re-indexed in order.

    Indexing over the clicking users in ascending raw id gives exactly the ids a
    clicks-only loader would have produced; the ratings are not part of this protocol.
    """
    counts = np.bincount(inter.user, minlength=inter.num_users)  # (U,)
    keep = np.flatnonzero(counts > 0)  # (U',) ascending
    new_index = np.full(inter.num_users, -1, dtype=np.int64)
    new_index[keep] = np.arange(keep.size)
    raw = None if inter.user_ids is None else np.asarray(inter.user_ids)[keep]
    return Interactions(
        user=new_index[inter.user], item=inter.item, timestamp=inter.timestamp,
        num_users=int(keep.size), num_items=inter.num_items,
        item_genres=inter.item_genres, genre_names=inter.genre_names,
        ratings=None, user_ids=raw,
    )


def _csr(user: np.ndarray, num_users: int, *cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """indptr (U + 1,) and the columns, for rows already sorted by user."""
    counts = np.bincount(user, minlength=num_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (indptr, *cols)


def split_rated(inter: Interactions, name: str, train_fraction: float,
                history_len: int) -> FederatedDataset:
    """The ``rf2`` protocol's split (module docstring): every rating a labelled sample."""
    r = inter.ratings
    if r is None:
        raise ValueError(f"{name}: dataset.protocol=rf2 needs ratings")
    n_users = inter.num_users
    # (user, timestamp, label, item): lexsort's last key is the primary one.
    order = lex_stable_argsort(r.item, r.label, r.timestamp, r.user)  # (R,) = np.lexsort
    user, item, label = r.user[order], r.item[order].astype(np.int64), r.label[order]
    counts = np.bincount(user, minlength=n_users)  # (U,)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (U,)
    rank = np.arange(user.size) - start[user]  # (R,) position within the user
    # i < n * f in float64, exactly RF²'s comparison (no tolerance on purpose).
    is_train = rank < counts[user].astype(np.float64) * train_fraction  # (R,)
    click = label == 1
    tr_ptr, tr_items, tr_labels = _csr(user[is_train], n_users, item[is_train],
                                       label[is_train].astype(np.int8))
    te_ptr, te_items, te_labels = _csr(user[~is_train], n_users, item[~is_train],
                                       label[~is_train].astype(np.int8))
    rated = RatedSplit(tr_ptr, tr_items, tr_labels, te_ptr, te_items, te_labels)
    ctr_ptr, ctr_items = _csr(user[is_train & click], n_users, item[is_train & click])
    cte_ptr, cte_items = _csr(user[~is_train & click], n_users, item[~is_train & click])
    return FederatedDataset(
        name=name, num_users=n_users, num_items=inter.num_items,
        train_indptr=ctr_ptr, train_items=ctr_items, test_indptr=cte_ptr, test_items=cte_items,
        history_len=history_len, item_genres=inter.item_genres, genre_names=inter.genre_names,
        rated=rated, user_ids=inter.user_ids,
    )
