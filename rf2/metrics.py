"""Ranking metrics (per user) and fairness summaries (per group).

Ranking runs batched in torch because evaluation scores every user against every item
each round: one ``topk`` over the scores with the training items scattered to -inf, and
AUC from comparisons of each held-out item with its user's row (B=1024, I=30,000 takes
well under a second on one CPU core). Fairness summaries are plain NumPy: they work on
a handful of per-tier numbers and must also run in a notebook without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "activity_quartile",
    "fairness_summary",
    "group_means",
    "mdac",
    "ranking_metrics",
    "relative_change",
]


def _flat_keys(rows: list[np.ndarray], num_items: int, name: str) -> np.ndarray:
    """Sorted unique flat indices ``b * I + item`` of user b's items (duplicates collapse).

    Working with these few keys instead of (B, I) boolean masks avoids several full
    passes over the score matrix, which dominate the cost at I = 30,000.
    """
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if lengths.sum() == 0:
        return np.empty(0, dtype=np.int64)
    items = np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in rows])
    if items.min() < 0 or items.max() >= num_items:
        raise ValueError(f"{name}: item ids must lie in [0, {num_items}), "
                         f"got {items.min()}..{items.max()}")
    users = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    return np.unique(users * num_items + items)


def _auc(scores: torch.Tensor, pos: np.ndarray, seen: np.ndarray, n_pos: np.ndarray,
         n_neg: np.ndarray) -> np.ndarray:
    """Per-user AUC: share of (positive, negative) pairs with the positive scored higher.

    ``pos``/``seen`` are flat keys of the retrievable targets and of all non-negatives.
    Ties count 1/2. Each positive is compared with its user's whole row (P x I
    comparisons): on a CPU that is far cheaper than sorting every row. Users are
    processed in blocks of similar positive counts, so padding wastes little work.
    """
    num_users, num_items = scores.shape
    device = scores.device
    flat = scores.reshape(-1)
    rows = pos // num_items
    slot = np.arange(pos.size) - (np.cumsum(n_pos) - n_pos)[rows]  # rank within its user
    packed = torch.full((num_users, max(int(n_pos.max(initial=0)), 1)), float("nan"),
                        dtype=scores.dtype, device=device)  # (B, P_max); NaN = no positive
    packed[torch.from_numpy(rows).to(device), torch.from_numpy(slot).to(device)] = flat[
        torch.from_numpy(pos).to(device)]
    order = np.argsort(n_pos, kind="stable")
    rank = np.empty(num_users, dtype=np.int64)
    rank[order] = np.arange(num_users)
    seen_rank = rank[seen // num_items]
    by_rank = np.argsort(seen_rank, kind="stable")
    seen, seen_rank = seen[by_rank], seen_rank[by_rank]

    wins = np.zeros(num_users, dtype=np.float64)
    block_rows = max(1, 2**22 // max(num_items, 1))
    for start in range(0, num_users, block_rows):
        users = order[start : start + block_rows]
        width = int(n_pos[users].max())
        if width == 0:
            continue
        block = scores[torch.from_numpy(users).to(device)]  # (C, I), a copy
        lo, hi = np.searchsorted(seen_rank, [start, start + users.size])
        local = (seen_rank[lo:hi] - start) * num_items + seen[lo:hi] % num_items
        block.view(-1)[torch.from_numpy(local).to(device)] = float("nan")  # never compares
        pk = packed[torch.from_numpy(users).to(device)]  # (C, P_max)
        buf = torch.empty_like(block)
        acc = torch.zeros(users.size, dtype=torch.float64, device=device)
        for j in range(width):
            p = pk[:, j : j + 1]  # (C, 1); NaN padding adds nothing
            # Comparing into a float buffer and summing is ~3x faster on CPU than
            # reducing a bool tensor (which first copies to int64). Exact below 2**24 items.
            acc += torch.lt(block, p, out=buf).sum(1).double()
            acc += torch.le(block, p, out=buf).sum(1).double()
        wins[users] = 0.5 * acc.cpu().numpy()  # (below + below-or-equal) / 2
    pairs = (n_pos * n_neg).astype(np.float64)
    return np.where(pairs > 0, wins / np.maximum(pairs, 1), np.nan)


@torch.no_grad()
def ranking_metrics(
    scores: torch.Tensor,
    exclude: list[np.ndarray],
    targets: list[np.ndarray],
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """Per-user Recall@k, NDCG@k and AUC of full rankings over all items.

    ``scores`` is (B, I). For user b the items ``exclude[b]`` (its training items) are
    removed from the ranking; ``targets[b]`` are its held-out items. Keys:

    - ``recall@{k}`` = hits in the top k / |targets|. The denominator is |targets|, not
      min(k, |targets|), as in RF²'s and HILL's (LightGCN) evaluation code, so a user with
      more than k targets cannot reach 1.
    - ``ndcg@{k}``: binary relevance, DCG = sum of 1/log2(rank + 1) over hits in the top
      k, divided by the ideal DCG of min(k, |targets|) hits.
    - ``auc``: share of (held-out, non-interacted) item pairs ranked correctly, ties 1/2;
      non-interacted = neither excluded nor a target.

    Users without targets get NaN (the caller decides whether to evaluate them). A
    target that is also excluded still counts in |targets| but can never be hit, as in
    the LightGCN protocol. Ties at the top-k cut are broken by ``torch.topk``; a k above I
    counts as I. Returns float64 NumPy arrays of shape (B,).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, I), got shape {tuple(scores.shape)}")
    num_users, num_items = scores.shape
    if len(exclude) != num_users or len(targets) != num_users:
        raise ValueError(
            f"need one exclude and one targets array per user: B={num_users}, "
            f"len(exclude)={len(exclude)}, len(targets)={len(targets)}"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of integers >= 1, got {list(ks)}")
    scores = scores.detach()
    if not scores.is_floating_point() or scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    scores = scores.contiguous()
    ex = _flat_keys(exclude, num_items, "exclude")
    tg = _flat_keys(targets, num_items, "targets")
    pos = np.setdiff1d(tg, ex, assume_unique=True)  # an excluded item cannot be retrieved
    seen = np.union1d(ex, tg)
    n_targets = np.bincount(tg // num_items, minlength=num_users).astype(np.float64)
    n_pos = np.bincount(pos // num_items, minlength=num_users)
    n_neg = num_items - np.bincount(seen // num_items, minlength=num_users)

    k_max = min(max(ks), num_items)
    masked = scores.clone()
    masked.view(-1)[torch.from_numpy(ex).to(scores.device)] = float("-inf")
    top = torch.topk(masked, k_max, dim=1, sorted=True).indices.cpu().numpy()  # (B, K)
    del masked
    hits = np.isin(np.arange(num_users)[:, None] * num_items + top, pos).astype(float)
    cum_hits = hits.cumsum(1)  # (B, K)
    gains = 1.0 / np.log2(np.arange(2, k_max + 2, dtype=np.float64))  # (K,)
    cum_dcg = (hits * gains).cumsum(1)  # (B, K)
    cum_ideal = gains.cumsum()  # (K,)

    out: dict[str, np.ndarray] = {}
    has_targets = n_targets > 0
    for k in ks:
        kk = min(k, num_items)
        recall = cum_hits[:, kk - 1] / np.maximum(n_targets, 1)
        n_ideal = np.clip(n_targets, 1, kk).astype(np.int64)  # (B,)
        ndcg = cum_dcg[:, kk - 1] / cum_ideal[n_ideal - 1]
        out[f"recall@{k}"] = np.where(has_targets, recall, np.nan)
        out[f"ndcg@{k}"] = np.where(has_targets, ndcg, np.nan)
    out["auc"] = _auc(scores, pos, seen, n_pos, n_neg)
    return out


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
    if none was evaluated) and ``f"{prefix}/{name}/users_evaluated"`` (users with at
    least one non-NaN metric).
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
        out[f"{prefix}/{name}/users_evaluated"] = float(np.sum(evaluated & members))
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
