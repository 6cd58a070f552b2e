"""Seeded synthetic clicks with the structure that makes RF²'s effects show up.

Why synthetic is the default: it needs no files, runs in CI in milliseconds, and has
the three properties the fairness story depends on -- long-tailed item popularity,
long-tailed user activity, and users that differ in *what* they like (taste groups), so
correlated device tiers (population.py) can end up with different data.

Generative story (all vectorised with NumPy; no per-click Python loop):

- Item popularity is Zipf-like, ``p_i ~ rank_i ** -popularity_exponent``, ranks a
  random permutation so popularity is unrelated to item index.
- Items fall into ``num_groups`` equal-sized clusters; a cluster has a home genre that
  most of its items carry (genres are thus informative about taste).
- Each user belongs to one taste group (= its preferred cluster). Each click comes,
  with a per-user probability ``w_u ~ Beta(6, 3)`` (mean 0.67), from the preferred
  cluster (popularity-weighted within it), otherwise from global popularity.
- Temporal drift: over a user's sequence the group-driven clicks shift linearly towards
  a second cluster, reaching ``DRIFT`` (20%) at the end -- small enough that the train
  history still predicts the test period, large enough that order matters.
- Clicks per user are lognormal (sigma 1) with mean ``mean_clicks_per_user``, clipped
  to [2, num_items // 2]; a user never clicks the same item twice (successive sampling
  without replacement from the user's click distribution).
- Timestamps (seconds) increase along each user's sequence from a random start.
- Ratings for ``dataset.protocol=rf2`` only (``Interactions.ratings``): every click plus one
  non-click exposure per click, an item drawn from global popularity one second before
  the click (dropped if the user clicked that item or was already shown it). Drawn
  from their own stream, so the clicks are the same with or without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rf2.core.config import DatasetConfig
from rf2.data.base import Interactions, Ratings
from rf2.data.sorting import first_of_each, stable_argsort

DRIFT = 0.2  # share of group-driven clicks that has moved to the second cluster by the end
ACTIVITY_SIGMA = 1.0  # lognormal sigma of clicks per user
TASTE_BETA = (6.0, 3.0)  # Beta parameters of the per-user share of in-group clicks
_T0 = 1_600_000_000  # first possible timestamp (2020-09-13), seconds
_START_SPAN = 365 * 86_400  # users start within one year
_MEAN_GAP = 2 * 86_400  # mean seconds between a user's clicks
_CHUNK = 4_000_000  # max elements of a dense (users, items) block in the exact fill
_STREAM_EXPOSURES = 77  # RNG stream of the non-click exposures
_STREAM_FILL = 78  # RNG stream that finishes users still short after two rounds
_FILL_ROUNDS = 6  # with-replacement rounds before the exact (dense) fill


@dataclass(frozen=True)
class SyntheticWorld:
    """The clicks plus the latent structure that generated them (for tests/analysis)."""

    interactions: Interactions
    user_group: np.ndarray  # (U,) int64 taste group = preferred item cluster
    item_cluster: np.ndarray  # (I,) int64
    item_popularity: np.ndarray  # (I,) float64 global click distribution, sums to 1


@dataclass(frozen=True)
class _Taste:
    """Everything a click draw depends on, precomputed once."""

    pop: np.ndarray  # (I,) global popularity
    cluster: np.ndarray  # (I,) item cluster
    pop_cdf: np.ndarray  # (I,)
    by_cluster: np.ndarray  # (I,) item ids grouped by cluster
    keys: np.ndarray  # (I,) cluster + within-cluster cdf, in (c, c + 1]
    start: np.ndarray  # (K,) first position of each cluster in by_cluster
    end: np.ndarray  # (K,) one past its last
    group: np.ndarray  # (U,) preferred cluster
    second: np.ndarray  # (U,) cluster the taste drifts towards
    share: np.ndarray  # (U,) probability a click is group-driven

    def draw(self, rng: np.random.Generator, users: np.ndarray, n: np.ndarray,
             rnd: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n[j] clicks (with replacement) for users[j]; seq = rnd + position / n."""
        owner = np.repeat(users, n)  # (M,)
        first = np.repeat(np.cumsum(n) - n, n)  # (M,)
        seq = rnd + (np.arange(owner.size) - first) / np.repeat(n, n)  # (M,)
        item = np.searchsorted(self.pop_cdf, rng.random(owner.size), side="right")  # (M,)
        grp = np.flatnonzero(rng.random(owner.size) < self.share[owner])  # (G,)
        drifted = rng.random(grp.size) < DRIFT * np.minimum(seq[grp], 1.0)
        c = np.where(drifted, self.second[owner[grp]], self.group[owner[grp]])  # (G,)
        pos = np.searchsorted(self.keys, c + rng.random(grp.size), side="right")
        item[grp] = self.by_cluster[np.clip(pos, self.start[c], self.end[c] - 1)]
        return owner, np.minimum(item, self.pop.size - 1), seq

    def weights(self, users: np.ndarray) -> np.ndarray:
        """End-of-sequence click distribution of ``users``: (S, I)."""
        total = np.bincount(self.cluster, weights=self.pop)  # (K,)
        within = (self.pop / total[self.cluster])[None, :]  # (1, I) popularity in cluster
        home = self.cluster[None, :] == self.group[users, None]  # (S, I)
        drift = self.cluster[None, :] == self.second[users, None]  # (S, I)
        w = self.share[users, None]  # (S, 1)
        return w * within * ((1 - DRIFT) * home + DRIFT * drift) + (1 - w) * self.pop[None, :]


def _build_taste(rng: np.random.Generator, cfg: DatasetConfig) -> _Taste:
    n_users, n_items, k = cfg.num_users, cfg.num_items, cfg.num_groups
    pop = (rng.permutation(n_items) + 1.0) ** -cfg.popularity_exponent
    pop /= pop.sum()  # (I,)
    cluster = rng.permutation(np.arange(n_items) % k).astype(np.int64)  # (I,)
    group = rng.integers(k, size=n_users).astype(np.int64)  # (U,)
    shift = rng.integers(1, k, size=n_users) if k > 1 else np.zeros(n_users, np.int64)
    by_cluster = np.argsort(cluster, kind="stable")  # (I,)
    c_sorted = cluster[by_cluster]
    counts = np.bincount(cluster, minlength=k)  # (K,)
    end = np.cumsum(counts)
    cum = np.cumsum(pop[by_cluster])  # (I,)
    before = np.concatenate([[0.0], cum])[end - counts]  # (K,) mass of earlier clusters
    total = np.bincount(cluster, weights=pop, minlength=k)  # (K,)
    return _Taste(
        pop=pop, cluster=cluster, pop_cdf=np.cumsum(pop), by_cluster=by_cluster,
        keys=c_sorted + (cum - before[c_sorted]) / total[c_sorted],
        start=end - counts, end=end, group=group, second=(group + shift) % k,
        share=rng.beta(*TASTE_BETA, size=n_users),
    )


def _dedupe(owner: np.ndarray, item: np.ndarray, seq: np.ndarray,
            n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the first of each repeated (owner, item) pair; rows must be in click order."""
    keep = first_of_each(owner * n_items + item)  # (M,) stable: first wins
    return owner[keep], item[keep], seq[keep]


def _gumbel_fill(rng: np.random.Generator, taste: _Taste, users: np.ndarray,
                 need: np.ndarray, owner: np.ndarray,
                 item: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``need[j]`` more distinct items for ``users[j]``, none of those it already has.

    Gumbel-top-k: sorting ``log w + Gumbel`` keys gives successive draws without
    replacement from ``w``; items already clicked get key -inf.
    """
    n_items = taste.pop.size
    row_of = np.full(taste.group.size, -1)
    row_of[users] = np.arange(users.size)
    mine = np.flatnonzero(row_of[owner] >= 0)
    had_row, had_item = row_of[owner[mine]], item[mine]  # (H,)
    out_item, out_seq = [], []
    step = max(1, _CHUNK // n_items)
    for lo in range(0, users.size, step):
        hi = min(lo + step, users.size)
        u = rng.random((hi - lo, n_items), dtype=np.float32)  # float32: half the work
        with np.errstate(divide="ignore"):  # u == 0 gives key -inf: never picked
            keys = np.log(taste.weights(users[lo:hi])).astype(np.float32) - np.log(-np.log(u))
        sel = (had_row >= lo) & (had_row < hi)
        keys[had_row[sel] - lo, had_item[sel]] = -np.inf  # (B, I)
        top = int(need[lo:hi].max())
        best = np.argpartition(-keys, top - 1, axis=1)[:, :top]  # (B, top) unordered
        best = np.take_along_axis(best, np.argsort(-np.take_along_axis(keys, best, 1), 1), 1)
        take = np.arange(top)[None, :] < need[lo:hi, None]  # (B, top)
        out_item.append(best[take])
        out_seq.append(2 + (np.nonzero(take)[1] + 1) / (top + 1))  # after both rounds
    return np.repeat(users, need), np.concatenate(out_item), np.concatenate(out_seq)


def _finish(rng: np.random.Generator, taste: _Taste, users: np.ndarray, n_clicks: np.ndarray,
            rows: tuple[np.ndarray, np.ndarray, np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``users`` (all short of ``n_clicks``) their missing distinct items.

    More rounds of the same with-replacement draws (end-of-sequence taste), repeats
    dropped, on these users' rows only: O(their clicks) per round. The few still short
    after :data:`_FILL_ROUNDS` rounds (taste so concentrated that repeats dominate) get
    exact Gumbel-top-k, dense over the catalogue but for a handful of rows.
    """
    owner, item, seq = rows
    n_items = taste.pop.size
    short = np.zeros(taste.group.size, dtype=bool)
    short[users] = True
    mine = short[owner]  # (M,) rows of the users being finished
    done = (owner[~mine], item[~mine], seq[~mine])
    owner, item, seq = owner[mine], item[mine], seq[mine]
    for rnd in range(2, 2 + _FILL_ROUNDS):
        have = np.bincount(owner, minlength=taste.group.size)
        users = np.flatnonzero(short & (have < n_clicks))
        if users.size == 0:
            break
        cols = _concat((owner, item, seq), taste.draw(rng, users, 2 * (n_clicks - have)[users] + 4,
                                                      rnd))
        order = stable_argsort(cols[0])  # by user; earlier rows first
        owner, item, seq = _dedupe(*_reorder(cols, order), n_items)
    have = np.bincount(owner, minlength=taste.group.size)
    users = np.flatnonzero(short & (have < n_clicks))
    if users.size:
        fill = _gumbel_fill(rng, taste, users, (n_clicks - have)[users], owner, item)
        owner, item, seq = _concat((owner, item, seq), fill)
    return _concat(done, (owner, item, seq))


def skip_float32(rng: np.random.Generator, count: int) -> None:
    """Advance ``rng`` exactly as ``rng.random(count, dtype=np.float32)`` would.

    NumPy draws a float32 from 32 bits: PCG64 hands out the low half of a 64-bit output
    and buffers the high half for the next one. ``PCG64.advance`` jumps in O(log n).
    """
    bits = rng.bit_generator
    if not isinstance(bits, np.random.PCG64):  # not what default_rng builds; just draw
        for lo in range(0, count, _CHUNK):
            rng.random(min(_CHUNK, count - lo), dtype=np.float32)
        return
    if count <= 0:
        return
    state = bits.state
    m = count - 1 if state["has_uint32"] else count  # the buffered half is used first
    full, odd = divmod(m, 2)
    bits.advance(full)  # also clears the buffer
    if odd:
        raw = int(bits.random_raw())
        state = bits.state
        state["has_uint32"], state["uinteger"] = 1, raw >> 32
        bits.state = state


def _genres(rng: np.random.Generator, item_cluster: np.ndarray, k: int, g: int) -> np.ndarray:
    """Multi-hot genres: the cluster's home genre (80%) plus a random one (35%)."""
    num_items = item_cluster.size
    home = rng.permutation(np.arange(k) % g)  # (K,) spreads clusters over genres
    out = np.zeros((num_items, g), dtype=np.float32)  # (I, G)
    rows = np.arange(num_items)
    has_home = rng.random(num_items) < 0.8
    out[rows[has_home], home[item_cluster[has_home]]] = 1.0
    extra = (rng.random(num_items) < 0.35) | ~has_home  # every item gets >= 1 genre
    out[rows[extra], rng.integers(g, size=num_items)[extra]] = 1.0
    return out


_Rows = tuple[np.ndarray, np.ndarray, np.ndarray]  # (owner, item, seq), one entry per click


def _concat(*parts: _Rows) -> _Rows:
    owner, item, seq = (np.concatenate(cols) for cols in zip(*parts, strict=True))
    return owner, item, seq


def _reorder(cols: _Rows, order: np.ndarray) -> _Rows:
    owner, item, seq = cols
    return owner[order], item[order], seq[order]


def generate_synthetic(cfg: DatasetConfig, seed: int) -> SyntheticWorld:
    """Generate clicks for ``cfg.num_users`` x ``cfg.num_items``; same seed, same arrays."""
    rng = np.random.default_rng(seed)
    n_users, n_items = cfg.num_users, cfg.num_items
    taste = _build_taste(rng, cfg)
    mu = np.log(cfg.mean_clicks_per_user) - ACTIVITY_SIGMA**2 / 2
    n_clicks = np.rint(rng.lognormal(mu, ACTIVITY_SIGMA, size=n_users)).astype(np.int64)
    n_clicks = np.clip(n_clicks, 2, max(2, n_items // 2))  # (U,)

    # Drawing with replacement and dropping repeats *is* sampling without replacement;
    # it is cheap for most users, so oversample, top up once, and finish the users still
    # short (heavy users with concentrated taste) in further rounds (``_finish``).
    owner, item, seq = _dedupe(*taste.draw(rng, np.arange(n_users), n_clicks * 3 // 2 + 4, 0),
                               n_items)
    have = np.bincount(owner, minlength=n_users)  # (U,)
    users = np.flatnonzero(have < n_clicks)
    cols = _concat((owner, item, seq), taste.draw(rng, users, 2 * (n_clicks - have)[users] + 4, 1))
    order = stable_argsort(cols[0])  # by user; earlier rows first
    owner, item, seq = _dedupe(*_reorder(cols, order), n_items)
    have = np.bincount(owner, minlength=n_users)
    users = np.flatnonzero(have < n_clicks)
    if users.size:
        # These users (heavy, concentrated taste; ~6% of them) were once finished by a
        # dense Gumbel-top-k over the catalogue drawn from the main stream: O(users x
        # items), minutes at 500k users. They now draw from their own stream, and the main
        # stream skips exactly what that fill consumed, so every other user's clicks and
        # every later draw (timestamps, genres, exposures) stay as before.
        skip_float32(rng, users.size * n_items)
        owner, item, seq = _finish(np.random.default_rng([seed, _STREAM_FILL]), taste, users,
                                   n_clicks, (owner, item, seq))
    # Stable sort by user keeps each user's rows in sequence order (fill rows come last).
    order = stable_argsort(owner)  # (M,)
    owner, item = owner[order], item[order]
    counts = np.bincount(owner, minlength=n_users)  # (U,)
    rank = np.arange(owner.size) - (np.cumsum(counts) - counts)[owner]
    keep = rank < n_clicks[owner]
    owner, item = owner[keep], item[keep]  # (N,)

    counts = np.bincount(owner, minlength=n_users)  # (U,)
    cum = np.cumsum(rng.exponential(_MEAN_GAP, size=owner.size))  # (N,)
    offset = np.concatenate([[0.0], cum])[np.cumsum(counts) - counts]  # (U,)
    start = rng.uniform(0, _START_SPAN, size=n_users)  # (U,)
    timestamp = (_T0 + start[owner] + cum - offset[owner]).astype(np.int64)  # (N,)

    names = tuple(f"genre{j:02d}" for j in range(cfg.num_genres))
    genres = (_genres(rng, taste.cluster, cfg.num_groups, cfg.num_genres)
              if cfg.num_genres else None)
    user64, item64 = owner.astype(np.int64), item.astype(np.int64)
    # Only dataset.protocol=rf2 reads the exposures; their own stream means skipping
    # them under "clicks" changes nothing else.
    ratings = (_ratings(np.random.default_rng([seed, _STREAM_EXPOSURES]), taste.pop,
                        user64, item64, timestamp) if cfg.protocol == "rf2" else None)
    inter = Interactions(
        user=user64, item=item64, timestamp=timestamp,
        num_users=n_users, num_items=n_items, item_genres=genres, genre_names=names,
        ratings=ratings,
    )
    return SyntheticWorld(inter, taste.group, taste.cluster, taste.pop)


def _ratings(rng: np.random.Generator, pop: np.ndarray, user: np.ndarray, item: np.ndarray,
             timestamp: np.ndarray) -> Ratings:
    """Clicks (label 1) plus one popularity-drawn non-click exposure per click (label 0)."""
    n_items, n = pop.size, user.size
    neg = np.minimum(np.searchsorted(np.cumsum(pop), rng.random(n)), n_items - 1)
    # One stable sort of click keys then exposure keys: an exposure is kept when it is
    # the first row of its (user, item) key -- one exposure per pair, and never an item
    # the user clicked (a click of the same key sorts before it).
    first = first_of_each(np.concatenate([user * n_items + item, user * n_items + neg]))
    keep = first[n:]  # (N,)
    return Ratings(
        user=np.concatenate([user, user[keep]]),
        item=np.concatenate([item, neg[keep].astype(np.int64)]),
        timestamp=np.concatenate([timestamp, timestamp[keep] - 1]),
        label=np.concatenate([np.ones(user.size, np.int8), np.zeros(int(keep.sum()), np.int8)]),
    )
