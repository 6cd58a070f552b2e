"""RF²'s two tierings, step by step as its code (facebookresearch/RF2) builds them.

Described from reading that code; none of it is copied. Both ignore the device
profile's shares: tier sizes come out of the algorithm (RF² has three equal-share tiers,
tier 0 = low). With ``dataset.protocol=rf2`` the inputs are RF²'s own samples.

*Client order*: RF² keeps its clients sorted by number of *training samples* (every
rated train sample under ``dataset.protocol=rf2``, train clicks otherwise), descending,
stable (ties: lower user index first = ascending raw id on MovieLens).

``rf2_random`` ("random"): tier = position in the client order mod T.

``rf2_dirichlet`` ("dirichlet-s1-alpha"):

1. Per user, the item ids of its clicks: train clicks, plus test clicks when
   ``leak_test`` (RF²'s code uses both: the map sees test labels). Users without any
   such click form one pseudo-item (id -1).
2. Items (with >= 1 click, plus the pseudo-item) ordered by click count descending
   (a user's repeated clicks on an item count each time); ties: larger item id first
   (so the pseudo-item, id -1, comes last among its ties).
3. Walk the items. For each: draw shares ~ Dirichlet(alpha * 1_T) and sort them
   descending; order the tiers by current head-count ascending (ties: lower tier id
   first); take the item's clickers not yet assigned, *in client order*, and shuffle
   them; with d_j = s_j * n, tier order[0] takes the first int(d_0), tier order[1] up to
   int(d_0 + d_1), ..., the last tier the rest. An item with no unassigned clicker is
   skipped after its draw (the draw still consumes the generator). No caps: tier sizes
   end up uneven. Once every user has a tier the walk stops (later draws change nothing).

Randomness, exactly RF²'s (:func:`rf2_draws`): its code seeds NumPy's global legacy
generator with the run seed right before building the map and draws the shares from it,
and shuffles with Python's ``random`` module; the published maps come from a ``random``
seeded with the same seed. So ``RandomState(seed).dirichlet`` and
``random.Random(seed).shuffle`` replay RF²'s map user for user (checked against the map
RF²'s code wrote for MovieLens-100K, seed 124: 943 of 943 users). The legacy Dirichlet
sampler (normalised gammas) is not distributed like ``Generator.dirichlet`` at the edges
that matter here (near-one-hot shares whose largest part is just below 1 make ``int(d_0)``
drop one user, who goes to the *largest* tier), and the shuffle only matters in those
splits, so "in client order" and both generators are all needed for an exact replay.

NaN draws: when every gamma of a legacy draw underflows to 0 the shares are 0/0 = NaN.
RF² redraws while any share is NaN; that is rare at alpha = 0.005 (~1e-5 per draw) but
certain for alpha <~ 1e-8, where RF²'s loop never ends. Here a step redraws at most
:data:`MAX_REDRAWS` times (RF²'s behaviour whenever RF² terminates in practice) and then
takes the limit of sorted Dirichlet(alpha) shares as alpha -> 0, (1, 0, ..., 0): the
item's new users all go to the currently smallest tier.
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np

from rf2.data.base import FederatedDataset

# Consecutive NaN draws after which a step takes the alpha -> 0 limit (module docstring).
# P(20 NaN draws in a row) at alpha = 0.005 is ~1e-100: RF²'s loop would end first.
MAX_REDRAWS = 20


class Draws(Protocol):
    """What the walk draws from: Dirichlet shares and an in-place list shuffle."""

    def dirichlet(self, alpha: np.ndarray) -> np.ndarray: ...

    def shuffle(self, x: list[int]) -> None: ...


class Rf2Draws:
    """RF²'s two generators for one seed (module docstring)."""

    def __init__(self, seed: int) -> None:
        self._np = np.random.RandomState(seed)
        self._py = random.Random(seed)

    def dirichlet(self, alpha: np.ndarray) -> np.ndarray:
        return self._np.dirichlet(alpha)

    def shuffle(self, x: list[int]) -> None:
        self._py.shuffle(x)


def rf2_draws(seed: int) -> Rf2Draws:
    """The generators rf2-dirichlet draws from: RF²'s own for ``seed``."""
    return Rf2Draws(seed)


def training_samples(dataset: FederatedDataset) -> np.ndarray:
    """(U,) what RF² sorts its clients by: rated train samples, else train clicks."""
    return dataset.rated.train_counts if dataset.rated is not None else dataset.train_counts


def client_order(samples_per_user: np.ndarray) -> np.ndarray:
    """(U,) user indices in RF²'s client order: most training samples first, stable."""
    return np.argsort(-np.asarray(samples_per_user, dtype=np.int64), kind="stable")


def rf2_random(samples_per_user: np.ndarray, num_tiers: int) -> np.ndarray:
    """(U,) tier = position mod T in the client order."""
    order = client_order(samples_per_user)
    out = np.empty(order.size, dtype=np.int64)
    out[order] = np.arange(order.size) % num_tiers
    return out


def _map_clicks(dataset: FederatedDataset, leak_test: bool) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of every click the map may see (train, plus test when leaking)."""
    users = [np.repeat(np.arange(dataset.num_users), dataset.train_counts)]
    items = [dataset.train_items]
    if leak_test:
        users.append(np.repeat(np.arange(dataset.num_users), dataset.test_counts))
        items.append(dataset.test_items)
    return np.concatenate(users).astype(np.int64), np.concatenate(items).astype(np.int64)


def _sorted_shares(draws: Draws, alpha: np.ndarray) -> np.ndarray:
    """(T,) one step's shares, descending; bounded NaN redraws (module docstring)."""
    for _ in range(MAX_REDRAWS + 1):
        shares = np.asarray(draws.dirichlet(alpha), dtype=np.float64)
        if not np.isnan(shares).any():
            return np.sort(shares)[::-1]
    limit = np.zeros(alpha.size)
    limit[0] = 1.0
    return limit


def clickers_by_item(user_rank: np.ndarray, item: np.ndarray,
                     num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (item, rank) pairs sorted by item then rank: (ptr (I + 1,), ranks (P,)).

    One integer sort of packed keys (item * U + rank) instead of a per-item unique:
    O(clicks log clicks) for the whole walk.
    """
    n = max(1, int(user_rank.max(initial=0)) + 1)
    key = np.sort(item * n + user_rank)  # (C,) packed, fits int64 for any real catalogue
    if key.size:
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]  # drop repeated clicks
    ptr = np.concatenate([[0], np.cumsum(np.bincount(key // n, minlength=num_items))])
    return ptr.astype(np.int64), key % n


def rf2_dirichlet(dataset: FederatedDataset, num_tiers: int, alpha: float, leak_test: bool,
                  draws: Draws) -> np.ndarray:
    """(U,) tier per user by the module's algorithm (draws from ``draws`` in walk order)."""
    n_users = dataset.num_users
    user, item = _map_clicks(dataset, leak_test)  # (C,), (C,)
    order = client_order(training_samples(dataset))  # (U,) rank -> user
    rank = np.empty(n_users, dtype=np.int64)
    rank[order] = np.arange(n_users)  # user -> rank
    count = np.bincount(item, minlength=dataset.num_items)  # (I,) clicks per item
    clicked = np.flatnonzero(count > 0)
    has_click = np.bincount(user, minlength=n_users) > 0
    no_click = order[~has_click[order]]  # (Z,) in client order
    ids = np.concatenate([clicked, [-1]])  # -1 = the pseudo-item of click-less users
    cnt = np.concatenate([count[clicked], [no_click.size]])
    walk = ids[np.lexsort((-ids, -cnt))]  # count desc, then item id desc
    ptr, ranks = clickers_by_item(rank[user], item, dataset.num_items)
    alpha_vec = np.full(num_tiers, alpha)

    out = np.full(n_users, -1, dtype=np.int64)
    size = np.zeros(num_tiers, dtype=np.int64)
    left = n_users
    for it in walk.tolist():
        shares = _sorted_shares(draws, alpha_vec)  # drawn even if the item is skipped
        tiers = np.lexsort((np.arange(num_tiers), size))  # smallest tier first
        who = no_click if it < 0 else order[ranks[ptr[it]:ptr[it + 1]]]
        who = who[out[who] < 0]  # not yet assigned, in client order
        if who.size == 0:
            continue
        todo = who.tolist()
        draws.shuffle(todo)
        d = shares * len(todo)
        bounds = [0, *(int(c) for c in np.cumsum(d)[:-1]), len(todo)]
        picked = np.asarray(todo, dtype=np.int64)
        for j, tier in enumerate(tiers.tolist()):
            part = picked[bounds[j]:max(bounds[j], bounds[j + 1])]
            out[part] = tier
            size[tier] += part.size
        left -= picked.size
        if left == 0:
            break
    return out
