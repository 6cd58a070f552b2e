"""Join users with devices: the RF² core.

RF²'s finding is that *which device a user owns* and *what data that user has* are
correlated in real fleets, and that fairness conclusions drawn under independent
heterogeneity do not survive that correlation. So tier assignment is a first-class,
swappable mode here:

- ``independent``: tiers drawn by profile shares, independent of the data.
- ``rf2-sorted``: RF²'s code baseline: users sorted by training-set size, tier =
  position mod n_tiers, so tiers are balanced in head-count *and* data volume.
- ``popularity-dirichlet``: RF²'s "realistic" mode: tiers differ in *what* users like.
- ``activity``: tiers differ in *how much* users interact (low-end <-> fewer clicks).
- ``rf2-random`` / ``rf2-dirichlet``: RF²'s two tierings exactly as its code builds
  them (no quotas, profile shares ignored), see :mod:`rf2.hetero.rf2_tiers`.
- ``from-file``: a map read back from a ``tiers.csv`` (:mod:`rf2.hetero.tier_file`).

After the tier, each user draws its own device from the tier's distributions.

RNG streams (``np.random.default_rng([seed, stream])``): 11 = tier assignment (every
mode that draws: independent's permutation, activity's noise, popularity-dirichlet's
shuffles and Dirichlet shares, in walk order), 12 = device draws, 13 = availability
phases. rf2-random, rf2-sorted and from-file draw nothing. rf2-dirichlet draws from
RF²'s own generators for the run seed (NumPy's legacy ``RandomState(seed)`` and Python's
``random.Random(seed)``, see :func:`rf2.hetero.rf2_tiers.rf2_draws`), so its map equals
the one RF²'s code builds for the same seed.

Every mode is O(interactions) with a small constant (a few seconds at 500k users and
25M clicks): the walks visit items, never users one by one, and group clickers with
one integer sort.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from rf2.core.config import PopulationConfig
from rf2.core.errors import ConfigError
from rf2.core.typed import check
from rf2.data.base import FederatedDataset
from rf2.data.plugin import resolve_function
from rf2.hetero.devices import DeviceProfile
from rf2.hetero.rf2_tiers import clickers_by_item, rf2_dirichlet, rf2_draws, rf2_random, training_samples
from rf2.hetero.tier_file import read_tier_file

# Independent random streams per purpose, so e.g. the device draws of a user do not
# change when only the tier-assignment mode changes.
_STREAM_TIERS, _STREAM_DEVICES, _STREAM_PHASE = 11, 12, 13


@dataclass(frozen=True, eq=False)
class Population:
    """One device per user. Arrays are indexed by user id (= client / partition id)."""

    tier_names: tuple[str, ...]
    tier_of_user: np.ndarray  # (U,) int64 index into tier_names
    compute_ms_per_example: np.ndarray  # (U,) float64 device base speed
    download_mbps: np.ndarray  # (U,) float64
    upload_mbps: np.ndarray  # (U,) float64
    availability: np.ndarray  # (U,) float64 P(online in a round)
    dropout: np.ndarray  # (U,) float64 P(fail mid-round)
    availability_period: np.ndarray  # (U,) int64, 0 = iid Bernoulli per round
    availability_phase: np.ndarray  # (U,) int64 in [0, period)
    compute_jitter_sigma: np.ndarray  # (U,) float64 per-round lognormal jitter
    network_jitter_sigma: np.ndarray  # (U,) float64

    @property
    def num_users(self) -> int:
        return int(self.tier_of_user.shape[0])

    def tier_index(self, name: str) -> int:
        if name not in self.tier_names:
            raise KeyError(f"unknown tier {name!r}; tiers: {list(self.tier_names)}")
        return self.tier_names.index(name)

    def eligible_users(self, exclude_tiers: list[str] | tuple[str, ...] = ()) -> np.ndarray:
        """(n,) ids of users not in ``exclude_tiers`` (RF²'s "exclude low-end" option)."""
        drop = [self.tier_index(t) for t in exclude_tiers]
        return np.flatnonzero(~np.isin(self.tier_of_user, drop)).astype(np.int64)


def target_counts(shares: np.ndarray, n: int) -> np.ndarray:
    """(T,) integer head-counts summing to ``n``, by largest remainder (ties: low tier)."""
    raw = np.asarray(shares, dtype=np.float64) * n
    counts = np.floor(raw).astype(np.int64)
    rest = n - int(counts.sum())
    order = np.lexsort((np.arange(len(raw)), -(raw - counts)))
    counts[order[:rest]] += 1
    return counts


def _independent(n: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    tiers = np.repeat(np.arange(len(shares)), target_counts(shares, n))  # (U,)
    out = np.empty(n, dtype=np.int64)
    out[rng.permutation(n)] = tiers
    return out


def _deal(order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Deal users in ``order`` to tiers by largest deficit against their quota.

    With equal counts this is exactly position mod T (RF²'s baseline); with unequal
    shares it is a smooth weighted round-robin, so every tier still spans the whole
    range of the sort key and ends with exactly its quota.
    """
    n, num_tiers = len(order), len(counts)
    frac = [c / n for c in counts.tolist()]
    left = counts.tolist()
    given = [0] * num_tiers
    out = np.empty(n, dtype=np.int64)
    for pos, user in enumerate(order.tolist()):
        best, best_def = -1, -np.inf
        for t in range(num_tiers):
            deficit = frac[t] * (pos + 1) - given[t]
            if left[t] > 0 and deficit > best_def + 1e-12:
                best, best_def = t, deficit
        out[user] = best
        given[best] += 1
        left[best] -= 1
    return out


def _rf2_sorted(counts_per_user: np.ndarray, shares: np.ndarray) -> np.ndarray:
    order = np.argsort(counts_per_user, kind="stable")  # fewest clicks first, ties by id
    return _deal(order, target_counts(shares, len(counts_per_user)))


def _activity(counts_per_user: np.ndarray, shares: np.ndarray, strength: float,
              rng: np.random.Generator) -> np.ndarray:
    """Sort by strength * z(log1p count) + N(0, 1) and cut at the share quantiles.

    The log count is standardised, so ``strength`` is scale-free: 0 gives pure noise
    (independent), 1 gives a correlation of 1/sqrt(2) ~ 0.71 between the sort key and
    standardised log activity, and large values approach a deterministic sort (tier 0 =
    the least active users).
    """
    z = np.log1p(counts_per_user.astype(np.float64))  # (U,)
    sd = z.std()
    z = (z - z.mean()) / sd if sd > 0 else np.zeros_like(z)
    key = strength * z + rng.standard_normal(len(z))
    order = np.argsort(key, kind="stable")
    tiers = np.repeat(np.arange(len(shares)), target_counts(shares, len(z)))
    out = np.empty(len(z), dtype=np.int64)
    out[order] = tiers
    return out


def _popularity_dirichlet(dataset: FederatedDataset, shares: np.ndarray, alpha: float,
                          rng: np.random.Generator) -> np.ndarray:
    """RF²'s realistic tiering, computed from TRAIN clicks only.

    Walk items from most to least clicked (train clicks; ties by item id). The users who
    clicked the item and are not yet assigned are shuffled and split among tiers by
    Dirichlet(alpha * 1) proportions sorted descending; the largest part goes to the tier
    currently least filled relative to its target (share * num_users), the next largest
    to the next, and so on. Users without train clicks form one pseudo-item at the end.
    Unlike RF²'s code, test-period clicks are never looked at (no test leakage), and a
    tier never takes more than its quota (its share of the population): when a head
    item's clickers outnumber the room left in the tier they would go to, the excess
    spills to the tiers with room, least filled first. RF²'s code has no cap, so on data
    whose top item is clicked by most users one tier would swallow the population.
    """
    n, num_tiers = dataset.num_users, len(shares)
    active = np.flatnonzero(shares > 0)
    target = shares * n
    quota = target_counts(shares, n)  # (T,) exact head-counts summing to n
    filled = np.zeros(num_tiers, dtype=np.int64)
    out = np.full(n, -1, dtype=np.int64)
    clicker = np.repeat(np.arange(n, dtype=np.int64), dataset.train_counts)  # (N,)
    # Distinct clickers per item, ascending (what np.unique gave per item), in one sort.
    ptr, users_by_item = clickers_by_item(clicker, dataset.train_items.astype(np.int64),
                                          dataset.num_items)
    pop = np.bincount(dataset.train_items, minlength=dataset.num_items)
    items = np.lexsort((np.arange(dataset.num_items), -pop))
    groups = (users_by_item[ptr[i]:ptr[i + 1]] for i in items.tolist() if pop[i] > 0)
    for users in itertools.chain(groups, [np.flatnonzero(dataset.train_counts == 0)]):
        users = users[out[users] < 0]
        if users.size == 0:
            continue
        users = rng.permutation(users)
        props = np.sort(rng.dirichlet(np.full(len(active), alpha)))[::-1]
        sizes = target_counts(props / props.sum(), users.size)
        fill = filled[active] / target[active]
        tiers = active[np.lexsort((active, fill))]  # least filled first, ties: low tier
        take = np.zeros(num_tiers, dtype=np.int64)
        for tier, size in zip(tiers.tolist(), sizes.tolist(), strict=True):
            take[tier] = min(size, quota[tier] - filled[tier])
        spill = users.size - int(take.sum())
        for tier in tiers.tolist():  # the excess goes where there is room
            extra = min(spill, quota[tier] - filled[tier] - take[tier])
            take[tier] += extra
            spill -= extra
        start = 0
        for tier in tiers.tolist():
            out[users[start:start + take[tier]]] = tier
            filled[tier] += take[tier]
            start += take[tier]
        if filled.sum() >= n:
            break
    return out


def assign_tiers(dataset: FederatedDataset, profile: DeviceProfile, cfg: PopulationConfig,
                 seed: int) -> Population:
    """Assign every user a tier (by ``cfg.mode``) and draw its device. Deterministic."""
    n, shares = dataset.num_users, profile.shares
    rng = np.random.default_rng([seed, _STREAM_TIERS])
    counts = dataset.train_counts
    if cfg._target_:
        tier_of_user = target_tiers(dataset, profile, cfg, seed)
    elif cfg.mode == "independent":
        tier_of_user = _independent(n, shares, rng)
    elif cfg.mode == "rf2-sorted":
        tier_of_user = _rf2_sorted(counts, shares)
    elif cfg.mode == "activity":
        tier_of_user = _activity(counts, shares, cfg.strength, rng)
    elif cfg.mode == "popularity-dirichlet":
        tier_of_user = _popularity_dirichlet(dataset, shares, cfg.alpha, rng)
    elif cfg.mode == "rf2-random":
        tier_of_user = rf2_random(training_samples(dataset), len(shares))
    elif cfg.mode == "rf2-dirichlet":
        tier_of_user = rf2_dirichlet(dataset, len(shares), cfg.alpha, cfg.leak_test,
                                     rf2_draws(seed))
    elif cfg.mode == "from-file":
        check(bool(cfg.path), "population.path", cfg.path,
              "a tiers.csv or .json file (required by population=from-file)")
        assert cfg.path is not None
        tier_of_user = read_tier_file(cfg.path, dataset.raw_user_ids(), profile.tier_names)
    else:
        raise ValueError(f"unknown population mode {cfg.mode!r}")
    return draw_devices(tier_of_user, profile, seed)


_ALLOWED_TARGET = ("a dotted path to a function (dataset, profile, seed, **population.kwargs) "
                   "returning one tier per user (index or tier name), importable in this "
                   "Python (e.g. mylab.tiers.by_genre)")


def target_tiers(dataset: FederatedDataset, profile: DeviceProfile, cfg: PopulationConfig,
                 seed: int) -> np.ndarray:
    """(U,) tier index per user from ``population._target_``, the user's own tiering.

    The function gets the split dataset (users in index order; ``dataset.raw_user_ids()``
    names them), the device profile and the run seed, and returns a sequence of U tiers:
    indices into ``profile.tier_names`` or the names themselves. Anything else is one
    config error naming ``population._target_``.
    """
    tiering = resolve_function("population._target_", cfg._target_, _ALLOWED_TARGET)
    got = np.asarray(tiering(dataset, profile, seed, **cfg.kwargs))
    names = list(profile.tier_names)
    if got.shape != (dataset.num_users,):
        raise ConfigError("population._target_", cfg._target_,
                          f"{_ALLOWED_TARGET}; it returned shape {got.shape} for "
                          f"{dataset.num_users} users")
    if got.dtype.kind in "US":
        unknown = sorted(set(got.tolist()) - set(names))
        if unknown:
            raise ConfigError("population._target_", cfg._target_,
                              f"tiers of the device profile ({', '.join(names)}); it returned "
                              f"{unknown[:3]}")
        return np.asarray([names.index(t) for t in got.tolist()], dtype=np.int64)
    if got.dtype.kind not in "iu" or (got.size and not 0 <= got.min() <= got.max() < len(names)):
        raise ConfigError("population._target_", cfg._target_,
                          f"tier indices in [0, {len(names) - 1}] or tier names "
                          f"({', '.join(names)}); it returned {got.dtype} values "
                          f"{np.unique(got)[:3].tolist()}")
    return got.astype(np.int64)


def draw_devices(tier_of_user: np.ndarray, profile: DeviceProfile, seed: int) -> Population:
    """Draw one device per user from its tier's distributions (tier by tier, ids ascending)."""
    n = len(tier_of_user)
    dev_rng = np.random.default_rng([seed, _STREAM_DEVICES])
    phase_rng = np.random.default_rng([seed, _STREAM_PHASE])
    cols = {k: np.zeros(n) for k in ("compute", "down", "up", "avail", "drop", "cj", "nj")}
    period = np.zeros(n, dtype=np.int64)
    for t, spec in enumerate(profile.tiers):
        idx = np.flatnonzero(tier_of_user == t)
        cols["compute"][idx] = spec.compute_ms_per_example.sample(dev_rng, idx.size)
        cols["down"][idx] = spec.download_mbps.sample(dev_rng, idx.size)
        cols["up"][idx] = spec.upload_mbps.sample(dev_rng, idx.size)
        cols["avail"][idx] = spec.availability
        cols["drop"][idx] = spec.dropout
        cols["cj"][idx] = spec.compute_jitter_sigma
        cols["nj"][idx] = spec.network_jitter_sigma
        period[idx] = spec.availability_period or 0
    phase = (phase_rng.random(n) * np.maximum(period, 1)).astype(np.int64)
    return Population(
        tier_names=profile.tier_names, tier_of_user=tier_of_user.astype(np.int64),
        compute_ms_per_example=cols["compute"], download_mbps=cols["down"],
        upload_mbps=cols["up"], availability=cols["avail"], dropout=cols["drop"],
        availability_period=period, availability_phase=phase,
        compute_jitter_sigma=cols["cj"], network_jitter_sigma=cols["nj"],
    )


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else 0.0


def _top_items(counts: np.ndarray, k: int) -> set[int]:
    order = np.lexsort((np.arange(len(counts)), -counts))[:k]
    return {int(i) for i in order if counts[i] > 0}


def population_summary(dataset: FederatedDataset, population: Population,
                       top_k: int = 50) -> dict[str, Any]:
    """JSON-serialisable description of how tiers differ in data (train clicks only).

    Per tier: users, share, interactions, mean/median history length, share of clicks on
    the global top-1% items, mean device speeds; plus the Jaccard overlap of every pair
    of tiers' top-``top_k`` items (``jaccard_top50["low|mid"]``) and its mean. Low
    cross-tier Jaccard = tiers like different items (RF²'s realistic heterogeneity).
    """
    counts = dataset.train_counts  # (U,)
    clicker = np.repeat(np.arange(dataset.num_users), counts)
    click_tier = population.tier_of_user[clicker]  # (N,)
    pop = dataset.item_popularity()
    n_top = max(1, int(np.ceil(0.01 * dataset.num_items)))
    is_top = np.zeros(dataset.num_items, dtype=bool)
    is_top[np.lexsort((np.arange(dataset.num_items), -pop))[:n_top]] = True
    tiers: dict[str, Any] = {}
    tops: dict[str, set[int]] = {}
    for t, name in enumerate(population.tier_names):
        mask = population.tier_of_user == t
        hist = counts[mask]
        items = dataset.train_items[click_tier == t]
        tops[name] = _top_items(np.bincount(items, minlength=dataset.num_items), top_k)
        tiers[name] = {
            "users": int(mask.sum()),
            "share": float(mask.mean()) if mask.size else 0.0,
            "interactions": int(hist.sum()),
            **({"training_samples": int(dataset.rated.train_counts[mask].sum())}
               if dataset.rated is not None else {}),
            "interaction_share": float(hist.sum() / max(1, counts.sum())),
            "mean_history": _mean(hist),
            "median_history": float(np.median(hist)) if hist.size else 0.0,
            "top1pct_click_share": float(is_top[items].mean()) if items.size else 0.0,
            "mean_compute_ms_per_example": _mean(population.compute_ms_per_example[mask]),
            "mean_download_mbps": _mean(population.download_mbps[mask]),
            "mean_upload_mbps": _mean(population.upload_mbps[mask]),
        }
    jac: dict[str, float] = {}
    names = population.tier_names
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            union = tops[a] | tops[b]
            jac[f"{a}|{b}"] = len(tops[a] & tops[b]) / len(union) if union else 0.0
    return {
        "num_users": int(dataset.num_users),
        "num_interactions": int(counts.sum()),
        "tiers": tiers,
        f"jaccard_top{top_k}": jac,
        "mean_cross_tier_jaccard": float(np.mean(list(jac.values()))) if jac else 0.0,
    }
