"""Per-user ranking metrics (recall/NDCG@K, AUC) from a score matrix, batched in torch.

Evaluation scores every user against every item each round: one ``topk`` over the scores
with the training items scattered to -inf, and AUC from comparisons of each held-out item
with its user's row (B=1024, I=30,000 takes well under a second on one CPU core).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ranking_metrics"]

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
