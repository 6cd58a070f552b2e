"""Group and fairness summaries (per tier, per activity group) and RF²'s D_t / MDAC.

Plain NumPy, no torch: they work on a handful of per-group numbers, and the analysis
layer (a notebook without the training stack) uses the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["activity_quartile", "fairness_summary", "group_means", "mdac", "relative_change"]


def fairness_summary(
    group_values: Mapping[str, float], user_values: np.ndarray | None = None
) -> dict[str, float]:
    """Spread of one metric across groups (tiers), and optionally across users.

    Several views because each hides something: the worst/best ratio and the max gap see
    only the extremes, the variance sees every group, Jain's index is scale-free
    ((sum x)^2 / (n sum x^2): 1 = equal, 1/n = one group has everything). Variances are
    population variances (ddof=0). NaN groups are ignored; a ratio or index that would
    divide by zero is NaN. ``user_var`` is present only when ``user_values`` is given.
    """
    values = np.asarray([float(v) for v in group_values.values()], dtype=np.float64)
    values = values[~np.isnan(values)]
    out: dict[str, float] = {}
    if values.size == 0:
        out = dict.fromkeys(("worst_best_ratio", "max_gap", "group_var", "jain"), math.nan)
    else:
        lo, hi = float(values.min()), float(values.max())
        sum_sq = float(np.sum(values**2))
        out["worst_best_ratio"] = lo / hi if hi != 0 else math.nan
        out["max_gap"] = hi - lo
        out["group_var"] = float(values.var())
        out["jain"] = float(values.sum()) ** 2 / (values.size * sum_sq) if sum_sq else math.nan
    if user_values is not None:
        users = np.asarray(user_values, dtype=np.float64)
        users = users[~np.isnan(users)]
        out["user_var"] = float(users.var()) if users.size else math.nan
    return out


def relative_change(opt: float, ref: float) -> float:
    """RF²'s D_t = (beta_t(opt) - beta_t(ref)) / beta_t(ref); NaN when ref is 0 or NaN.

    Relative, not absolute, so tiers with different base quality are comparable.
    """
    if ref == 0 or math.isnan(ref) or math.isnan(opt):
        return math.nan
    return (opt - ref) / ref


def mdac(changes: Mapping[str, float]) -> float:
    """RF²'s MDAC: max over group pairs |D_i - D_j| (= max D - min D); 0 = fair.

    0 for a single group. NaN if any D is NaN (or there is none): silently dropping a
    tier without a reference value would make an optimization look fairer than it is.
    """
    values = np.asarray([float(v) for v in changes.values()], dtype=np.float64)
    if values.size == 0 or np.isnan(values).any():
        return math.nan
    return float(values.max() - values.min())


def group_means(
    per_user: Mapping[str, np.ndarray],
    group_of_user: np.ndarray,
    group_names: Sequence[str],
    prefix: str = "tier",
) -> dict[str, float]:
    """Mean of each per-user metric within each group, as flat run-folder keys.

    ``group_of_user`` holds, per user, an index into ``group_names`` (or the name
    itself). Keys: ``f"{prefix}/{name}/{metric}"`` (NaN-mean over the group's users, NaN
    if none was evaluated) and ``f"{prefix}/{name}/eval_users"`` (users with at least
    one non-NaN metric; the row's overall count is ``eval_users`` too).
    """
    groups = np.asarray(group_of_user)
    if groups.dtype.kind not in "iu":
        lookup = {name: i for i, name in enumerate(group_names)}
        groups = np.asarray([lookup.get(str(g), -1) for g in groups], dtype=np.int64)
    arrays = {m: np.asarray(v, dtype=np.float64) for m, v in per_user.items()}
    for metric, arr in arrays.items():
        if arr.shape != groups.shape:
            raise ValueError(f"{metric}: {arr.shape[0]} values for {groups.shape[0]} users")
    evaluated = np.zeros(groups.shape, dtype=bool)
    for arr in arrays.values():
        evaluated |= ~np.isnan(arr)
    out: dict[str, float] = {}
    for g, name in enumerate(group_names):
        members = groups == g
        for metric, arr in arrays.items():
            vals = arr[members]
            vals = vals[~np.isnan(vals)]
            out[f"{prefix}/{name}/{metric}"] = float(vals.mean()) if vals.size else math.nan
        out[f"{prefix}/{name}/eval_users"] = float(np.sum(evaluated & members))
    return out


def activity_quartile(train_counts: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Split users into quartiles of training-interaction volume: q1 = least active.

    Split by rank, not by count thresholds: click counts are heavy-tailed with many ties
    (lots of users with the minimum count), so thresholds can leave a quartile empty.
    Ties are broken by user index, giving four groups whose sizes differ by at most one.
    Returns (group index per user, names).
    """
    counts = np.asarray(train_counts)
    n = counts.shape[0]
    order = np.argsort(counts, kind="stable")
    groups = np.empty(n, dtype=np.int64)
    groups[order] = (np.arange(n) * 4) // max(n, 1)
    return groups, ["q1", "q2", "q3", "q4"]
