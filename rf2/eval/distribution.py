"""Fairness as a distribution over users: who loses, not only how the group means move.

Group means (``tier/<t>/<metric>``) and RF²'s D_t/MDAC hide *which* users lose. Here,
per metric and per group (all users, each tier), the spread of the per-user values:

- ``std``: population standard deviation (ddof = 0);
- ``bottom10`` / ``top10``: mean of the lowest / highest ``ceil(0.1 n)`` values (at least
  one), i.e. the worst- and best-served tenth of the users (for ``loss`` lower is better,
  so its ``bottom10`` is its best tenth: the names say where on the axis, not which is good);
- ``gini``: Gini coefficient sum_ij |x_i - x_j| / (2 n^2 mean); 0 = everyone equal, ->1 =
  one user has everything. 0 for all-equal values (all zeros included); NaN when a value
  is negative (the coefficient is defined for non-negative quantities);
- ``no_hit`` (hit metrics only: ``recall@K``, ``ndcg@K``, their ``index/`` twins): share of
  users whose value is exactly 0, i.e. with no held-out item in the top K;
- ``cdf_<x>`` (:data:`CDF_METRICS` only): share of users with a value <= x on a fixed grid
  of 21 points 0, 0.05, ..., 1 (these metrics lie in [0, 1]), enough to draw a CDF without
  per-user files.

Participation (:func:`participation_row`): the Gini of per-user selection and completed-
training counts so far, over every user of the population (never-selected users count as
0, so excluding a tier shows up in the overall coefficient).

NumPy only (no torch): the analysis layer may use it on a laptop. NaN per-user values
(users a metric does not apply to) are dropped before every statistic; a group with no
value left gets NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["CDF_GRID", "CDF_METRICS", "STATS", "cdf_at", "distribution_row", "gini",
           "is_hit_metric", "participation_row", "summary", "tail_mean"]

# Statistics logged for every metric (``no_hit`` only for hit metrics).
STATS = ("std", "bottom10", "top10", "gini", "no_hit")
# Metrics whose CDF is logged on CDF_GRID (``rf2-figures`` draws it per tier).
CDF_METRICS = ("recall@20",)
CDF_GRID = tuple(round(0.05 * i, 2) for i in range(21))
TAIL = 0.1  # bottom/top tenth


def _clean(values: np.ndarray | Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[~np.isnan(arr)]


def gini(values: np.ndarray | Sequence[float]) -> float:
    """Gini coefficient of non-negative values (NaN dropped), by the sorted-rank formula
    G = 2 sum_i i x_(i) / (n sum x) - (n + 1) / n, i = 1..n ascending (= the mean absolute
    difference over twice the mean). 0 when all values are equal; NaN if empty or any
    value is negative."""
    x = np.sort(_clean(values))
    n = x.size
    if n == 0 or x[0] < 0:
        return math.nan
    total = float(x.sum())
    if total == 0.0:
        return 0.0  # all zero: perfectly equal
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * np.dot(ranks, x) / (n * total) - (n + 1) / n)


def tail_mean(values: np.ndarray | Sequence[float], fraction: float = TAIL,
              top: bool = False) -> float:
    """Mean of the lowest (``top``: highest) ``ceil(fraction n)`` values, at least one."""
    x = _clean(values)
    if x.size == 0:
        return math.nan
    k = max(1, math.ceil(fraction * x.size - 1e-9))
    part = np.partition(x, x.size - k)[x.size - k:] if top else np.partition(x, k - 1)[:k]
    return float(part.mean())


def cdf_at(values: np.ndarray | Sequence[float], grid: Sequence[float] = CDF_GRID) -> np.ndarray:
    """(len(grid),) share of values <= each grid point (NaN dropped; NaN if none left)."""
    x = np.sort(_clean(values))
    if x.size == 0:
        return np.full(len(grid), math.nan)
    return np.searchsorted(x, np.asarray(grid, dtype=np.float64), side="right") / x.size


def is_hit_metric(metric: str) -> bool:
    """``recall@K``/``ndcg@K`` (also ``index/...``): 0 means no held-out item in the top K."""
    base = metric.rsplit("/", 1)[-1]
    return base.startswith(("recall@", "ndcg@"))


def summary(values: np.ndarray | Sequence[float], hit_metric: bool = False) -> dict[str, float]:
    """The :data:`STATS` of one metric over one group of users."""
    x = _clean(values)
    if x.size == 0:
        out = dict.fromkeys(("std", "bottom10", "top10", "gini"), math.nan)
    else:
        out = {"std": float(x.std()), "bottom10": tail_mean(x), "top10": tail_mean(x, top=True),
               "gini": gini(x)}
    if hit_metric:
        out["no_hit"] = float(np.mean(x == 0.0)) if x.size else math.nan
    return out


def _group_stats(prefix: str, per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    row: dict[str, float] = {}
    for metric, values in per_user.items():
        for stat, v in summary(values, is_hit_metric(metric)).items():
            row[f"{prefix}{metric}/{stat}"] = v
        if metric in CDF_METRICS:
            for x, share in zip(CDF_GRID, cdf_at(values), strict=True):
                row[f"{prefix}{metric}/cdf_{x:.2f}"] = float(share)
    return row


def distribution_row(
    per_user: Mapping[str, np.ndarray],
    group_of_user: np.ndarray | None = None,
    group_names: Sequence[str] = (),
    prefix: str = "dist",
) -> dict[str, float]:
    """Flat run-folder keys: ``dist/<metric>/<stat>`` over all users, and per group
    ``dist/tier/<name>/<metric>/<stat>``. ``group_of_user`` holds, per user (aligned
    with the per-user arrays), an index into ``group_names``."""
    arrays = {m: np.asarray(v, dtype=np.float64) for m, v in per_user.items()}
    row = _group_stats(f"{prefix}/", arrays)
    if group_of_user is None or not len(group_names):
        return row
    groups = np.asarray(group_of_user)
    for metric, arr in arrays.items():
        if arr.shape != groups.shape:
            raise ValueError(f"{metric}: {arr.shape[0]} values for {groups.shape[0]} users")
    for g, name in enumerate(group_names):
        members = groups == g
        row.update(_group_stats(f"{prefix}/tier/{name}/",
                                {m: arr[members] for m, arr in arrays.items()}))
    return row


def participation_row(
    selected: np.ndarray,
    trained: np.ndarray,
    group_of_user: np.ndarray | None = None,
    group_names: Sequence[str] = (),
    prefix: str = "dist",
) -> dict[str, float]:
    """Gini of per-user counts so far: ``dist/selections/gini``, ``dist/trainings/gini``
    (completed trainings that reached aggregation), and per group
    ``dist/tier/<name>/{selections,trainings}/gini``. Every user of the population counts,
    with 0 if never selected."""
    counts = {"selections": np.asarray(selected, dtype=np.float64),
              "trainings": np.asarray(trained, dtype=np.float64)}
    row = {f"{prefix}/{what}/gini": gini(c) for what, c in counts.items()}
    if group_of_user is not None:
        groups = np.asarray(group_of_user)
        for g, name in enumerate(group_names):
            members = groups == g
            for what, c in counts.items():
                row[f"{prefix}/tier/{name}/{what}/gini"] = gini(c[members])
    return row
