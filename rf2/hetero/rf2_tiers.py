"""RF²'s two tierings, step by step as its code (facebookresearch/RF2) builds them.

Described from reading that code; none of it is copied. Both ignore the device
profile's shares: tier sizes come out of the algorithm (RF² has three equal-share tiers,
tier 0 = low). With ``dataset.protocol=rf2`` the inputs are RF²'s own samples.

``rf2_random`` ("random"): users sorted by number of *training samples* (every rated
train sample under ``dataset.protocol=rf2``, train clicks otherwise), descending, stable
(ties: lower user index first = ascending raw id on MovieLens); tier = position mod T.

``rf2_dirichlet`` ("dirichlet-s1-alpha"):

1. Per user, the item ids of its clicks: train clicks, plus test clicks when
   ``leak_test`` (RF²'s code uses both: the map sees test labels). Users without any
   such click form one pseudo-item (id -1).
2. Items (with >= 1 click, plus the pseudo-item) ordered by click count descending;
   ties: larger item id first (so the pseudo-item, id -1, comes last among its ties).
3. Walk the items. For each: draw shares ~ Dirichlet(alpha * 1_T) (redrawn while any is
   NaN) and sort them descending; order the tiers by current head-count ascending (ties:
   lower tier id first); take the item's clickers not yet assigned, in user order, and
   shuffle them; with d_j = s_j * n, tier order[0] takes the first int(d_0), tier
   order[1] up to int(d_0 + d_1), ..., the last tier the rest. An item with no unassigned
   clicker is skipped after its draw (the draw still consumes the generator).
   No caps: tier sizes end up uneven.

Randomness: :func:`rf2_rng` -- NumPy's legacy ``RandomState`` (MT19937 seeded from
``SeedSequence([seed, 11])``), because RF² draws from NumPy's global legacy generator and
the legacy Dirichlet sampler (normalised gammas) is not distributed like
``Generator.dirichlet`` at the edges that matter here: near-one-hot shares whose largest
part is just below 1 make ``int(d_0)`` drop one user, who goes to the *largest* tier.
On MovieLens-100K the legacy sampler puts ~10 more users in the low tier than
``Generator.dirichlet`` does. RF²'s exact stream (its global state after model set-up,
and Python's ``random.shuffle``) cannot be replayed: per-tier training samples of the
mid and high tiers move by up to ~10% between seeds (which heavy users an early split
sends where), the low tier's users by ~3%.
"""

from __future__ import annotations

import numpy as np

from rf2.data.base import FederatedDataset


def rf2_rng(seed: int, stream: int) -> np.random.RandomState:
    """The generator rf2-dirichlet draws from (module docstring): legacy, seeded per stream."""
    return np.random.RandomState(np.random.MT19937(np.random.SeedSequence([seed, stream])))


def rf2_random(samples_per_user: np.ndarray, num_tiers: int) -> np.ndarray:
    """(U,) tier = position mod T in the descending, stable sort by training samples."""
    n = np.asarray(samples_per_user, dtype=np.int64)  # (U,)
    order = np.argsort(-n, kind="stable")  # most samples first, ties by user index
    out = np.empty(n.size, dtype=np.int64)
    out[order] = np.arange(n.size) % num_tiers
    return out


def _clicks(dataset: FederatedDataset, leak_test: bool) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of every click the map may see, grouped by user ascending."""
    users = [np.repeat(np.arange(dataset.num_users), dataset.train_counts)]
    items = [dataset.train_items]
    if leak_test:
        users.append(np.repeat(np.arange(dataset.num_users), dataset.test_counts))
        items.append(dataset.test_items)
    user, item = np.concatenate(users), np.concatenate(items)
    order = np.argsort(user, kind="stable")
    return user[order].astype(np.int64), item[order].astype(np.int64)


def rf2_dirichlet(dataset: FederatedDataset, num_tiers: int, alpha: float, leak_test: bool,
                  rng: np.random.RandomState | np.random.Generator) -> np.ndarray:
    """(U,) tier per user by the module's algorithm (draws from ``rng`` in walk order)."""
    n_users = dataset.num_users
    user, item = _clicks(dataset, leak_test)  # (C,), (C,)
    count = np.bincount(item, minlength=dataset.num_items)  # (I,) clicks per item
    clicked = np.flatnonzero(count > 0)
    no_click = np.flatnonzero(np.bincount(user, minlength=n_users) == 0)  # (Z,)
    ids = np.concatenate([clicked, [-1]])  # -1 = the pseudo-item of click-less users
    cnt = np.concatenate([count[clicked], [no_click.size]])
    walk = ids[np.lexsort((-ids, -cnt))]  # count desc, then item id desc
    by_item = np.argsort(item, kind="stable")  # clickers grouped by item, in user order
    ptr = np.concatenate([[0], np.cumsum(count)])
    clickers_sorted = user[by_item]

    out = np.full(n_users, -1, dtype=np.int64)
    size = np.zeros(num_tiers, dtype=np.int64)
    for it in walk.tolist():
        shares = np.full(num_tiers, np.nan)
        while np.isnan(shares).any():
            shares = rng.dirichlet(np.full(num_tiers, alpha))
        shares = np.sort(shares)[::-1]  # largest share first
        tiers = np.lexsort((np.arange(num_tiers), size))  # smallest tier first
        who = no_click if it < 0 else clickers_sorted[ptr[it]:ptr[it + 1]]
        _, first = np.unique(who, return_index=True)
        who = who[np.sort(first)]  # unique, in user order
        who = who[out[who] < 0]
        if who.size == 0:
            continue
        who = rng.permutation(who)
        d = shares * who.size
        cuts = [int(c) for c in np.cumsum(d)[:-1]]  # int(d0), int(d0 + d1), ...
        bounds = [0, *cuts, who.size]
        for j, tier in enumerate(tiers.tolist()):
            part = who[bounds[j]:max(bounds[j], bounds[j + 1])]
            out[part] = tier
            size[tier] += part.size
    return out
