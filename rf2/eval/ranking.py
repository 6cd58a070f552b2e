"""Per-user ranking metrics (recall/NDCG@K, AUC) from ONE score matrix per block of users.

Evaluation scores every user against every item each round, so the cost is a few passes
over a (B, I) block. Per block, in this order and on the same buffer:

1. the caller reads what needs raw scores (the test loss, CTR-style metrics);
2. the scores of each user's retrievable held-out items (its *positives*) are gathered;
3. the training items are set to -inf in place and one ``topk`` gives recall/NDCG;
4. training and held-out items are set to NaN in place (NaN compares false), and each
   positive is compared with its row: AUC = (below + below-or-equal) / 2 / pairs, i.e.
   the positive's rank among the negatives with ties counted 1/2. No second copy and no
   sort of the catalogue.

The per-block index structures (:class:`HeldOut`: flat keys of excluded and held-out
items, packed positive slots, counts) depend only on the data, so an evaluator builds
them once and reuses them every round. Rows are ordered by their number of positives
(ascending), so the j-th comparison pass touches only the contiguous suffix of rows that
have more than j positives: no padding work however ragged the test sets are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BlockRanking", "HeldOut", "finish_auc", "rank_block", "ranking_metrics",
           "topk_list_metrics"]


def _flat_keys(rows: Sequence[np.ndarray], num_items: int, name: str) -> np.ndarray:
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


@dataclass(frozen=True)
class HeldOut:
    """Index structures of one block of users' excluded and held-out items.

    Built once per block from the data (:meth:`build`); rows must already be in
    ascending order of ``n_pos`` (see :func:`positive_order`) for :func:`rank_block`.
    """

    num_users: int
    num_items: int
    ex_keys: torch.Tensor  # (E,) int64 flat keys of excluded items (-inf before top-k)
    seen_keys: torch.Tensor  # (S,) int64 flat keys of excluded | held-out (NaN before AUC)
    pos_keys: np.ndarray  # (P,) int64 sorted flat keys of retrievable held-out items
    pos_rows: torch.Tensor  # (P,) row of each positive
    pos_slots: torch.Tensor  # (P,) its slot among its row's positives
    col_start: np.ndarray  # (P_max,) first row with more than j positives
    n_targets: np.ndarray  # (B,) float64 |unique held-out items| (recall denominator)
    n_pos: np.ndarray  # (B,) int64 retrievable held-out items
    n_neg: np.ndarray  # (B,) int64 items neither excluded nor held out

    @classmethod
    def build(cls, exclude: Sequence[np.ndarray], targets: Sequence[np.ndarray],
              num_items: int) -> HeldOut:
        num_users = len(exclude)
        if len(targets) != num_users:
            raise ValueError(f"need one exclude and one targets array per user: "
                             f"len(exclude)={num_users}, len(targets)={len(targets)}")
        ex = _flat_keys(exclude, num_items, "exclude")
        tg = _flat_keys(targets, num_items, "targets")
        pos = np.setdiff1d(tg, ex, assume_unique=True)  # an excluded item cannot be retrieved
        seen = np.union1d(ex, tg)
        n_pos = np.bincount(pos // num_items, minlength=num_users).astype(np.int64)
        if np.any(np.diff(n_pos) < 0):
            raise ValueError("HeldOut rows must be ordered by ascending number of positives")
        rows = pos // num_items
        slots = np.arange(pos.size) - (np.cumsum(n_pos) - n_pos)[rows]  # rank within its row
        p_max = int(n_pos.max(initial=0))
        col_start = np.searchsorted(n_pos, np.arange(p_max), side="right")
        return cls(
            num_users=num_users, num_items=num_items,
            ex_keys=torch.from_numpy(ex), seen_keys=torch.from_numpy(seen),
            pos_keys=pos, pos_rows=torch.from_numpy(rows), pos_slots=torch.from_numpy(slots),
            col_start=col_start,
            n_targets=np.bincount(tg // num_items, minlength=num_users).astype(np.float64),
            n_pos=n_pos,
            n_neg=num_items - np.bincount(seen // num_items, minlength=num_users),
        )


def positive_order(exclude: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> np.ndarray:
    """Stable order of users by number of retrievable held-out items (ascending)."""
    n_pos = [np.setdiff1d(t, e).size for e, t in zip(exclude, targets, strict=True)]
    return np.argsort(np.asarray(n_pos, dtype=np.int64), kind="stable")


@dataclass
class BlockRanking:
    """What :func:`rank_block` found: per-user metrics and the all-item top K.

    Between :func:`rank_block` and :func:`finish_auc` the scores hold -inf at the
    training items and are otherwise raw: the state in which served (index) rankings
    are read from the same block."""

    metrics: dict[str, np.ndarray]  # key -> (B,) float64; NaN for users without targets
    top_ids: np.ndarray | None  # (B, K) best-first item ids (training items removed)
    packed: torch.Tensor | None = None  # (B, P_max) positive scores, until finish_auc


def rank_block(
    scores: torch.Tensor,  # (B, I) float32, contiguous; OVERWRITTEN (masked in place)
    held: HeldOut,
    ks: Sequence[int],
    topk: bool = True,
    auc: bool = True,
    cmp_buffer: torch.Tensor | None = None,  # (>= B, I) scratch for AUC comparisons
    defer_auc: bool = False,
) -> BlockRanking:
    """Recall@k/NDCG@k (``topk``) and AUC (``auc``) of one block, definitions as in
    :func:`ranking_metrics`. Reads and then masks ``scores`` in place. With
    ``defer_auc`` the AUC is left to :func:`finish_auc` (scores then still hold raw
    values outside the training items)."""
    num_users, num_items = scores.shape
    if (num_users, num_items) != (held.num_users, held.num_items):
        raise ValueError(f"scores {tuple(scores.shape)} do not match the held-out block "
                         f"{(held.num_users, held.num_items)}")
    flat = scores.view(-1)
    out: dict[str, np.ndarray] = {}
    packed = None
    if auc:
        # (B, P_max) positive scores, NaN where a row has fewer positives; read before masking.
        packed = scores.new_full((num_users, max(len(held.col_start), 1)), float("nan"))
        packed[held.pos_rows, held.pos_slots] = flat[torch.from_numpy(held.pos_keys)]
    top_ids = None
    if topk:
        flat[held.ex_keys] = float("-inf")
        k_max = min(max(ks), num_items)
        top_ids = torch.topk(scores, k_max, dim=1, sorted=True).indices.numpy()  # (B, K)
        out.update(topk_list_metrics(top_ids, held, ks))
    ranking = BlockRanking(out, top_ids, packed)
    if auc and not defer_auc:
        finish_auc(scores, ranking, held, cmp_buffer)
    return ranking


def finish_auc(scores: torch.Tensor, ranking: BlockRanking, held: HeldOut,
               cmp_buffer: torch.Tensor | None = None) -> None:
    """The AUC pass of :func:`rank_block` (``ranking.metrics["auc"]``); masks ``scores``."""
    if ranking.packed is None:
        return
    ranking.metrics["auc"] = _auc(scores, ranking.packed, held, cmp_buffer)
    ranking.packed = None


def topk_list_metrics(top_ids: np.ndarray, held: HeldOut, ks: Sequence[int],
                      prefix: str = "") -> dict[str, np.ndarray]:
    """Recall@k/NDCG@k of (B, K) best-first item lists (-1 = empty slot, never a hit)."""
    num_users, k_max = top_ids.shape
    keys = np.arange(num_users, dtype=np.int64)[:, None] * held.num_items + top_ids
    hits = (np.isin(keys, held.pos_keys) & (top_ids >= 0)).astype(np.float64)  # (B, K)
    gains = 1.0 / np.log2(np.arange(2, k_max + 2, dtype=np.float64))  # (K,)
    cum_hits, cum_dcg, cum_ideal = hits.cumsum(1), (hits * gains).cumsum(1), gains.cumsum()
    has_targets = held.n_targets > 0
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(k, held.num_items)
        recall = cum_hits[:, kk - 1] / np.maximum(held.n_targets, 1)
        n_ideal = np.clip(held.n_targets, 1, kk).astype(np.int64)  # (B,)
        ndcg = cum_dcg[:, kk - 1] / cum_ideal[n_ideal - 1]
        out[f"{prefix}recall@{k}"] = np.where(has_targets, recall, np.nan)
        out[f"{prefix}ndcg@{k}"] = np.where(has_targets, ndcg, np.nan)
    return out


def _auc(scores: torch.Tensor, packed: torch.Tensor, held: HeldOut,
         cmp_buffer: torch.Tensor | None) -> np.ndarray:
    """Per-user AUC: share of (positive, negative) pairs with the positive above, ties 1/2.

    Excluded and held-out items become NaN, so each comparison pass counts negatives only.
    Pass j compares positive j of each row with its whole row, only for the rows (a
    contiguous suffix) that have a j-th positive. Comparing into a float buffer and
    summing is ~3x faster on CPU than reducing a bool tensor (which first copies to
    int64); the float32 counts are exact below 2**24 items.
    """
    num_users, num_items = scores.shape
    scores.view(-1)[held.seen_keys] = float("nan")  # never compares
    buf = cmp_buffer if cmp_buffer is not None else torch.empty_like(scores)
    acc = torch.zeros(num_users, dtype=torch.float64)
    for j, start in enumerate(held.col_start.tolist()):
        block = scores[start:]
        out = buf[: num_users - start].view(num_users - start, num_items)
        p = packed[start:, j : j + 1]  # (C, 1)
        acc[start:] += torch.lt(block, p, out=out).sum(1)
        acc[start:] += torch.le(block, p, out=out).sum(1)
    wins = 0.5 * acc.numpy()
    pairs = (held.n_pos * held.n_neg).astype(np.float64)
    return np.where(pairs > 0, wins / np.maximum(pairs, 1), np.nan)


@torch.no_grad()
def ranking_metrics(
    scores: torch.Tensor,
    exclude: list[np.ndarray],
    targets: list[np.ndarray],
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """Per-user Recall@k, NDCG@k and AUC of full rankings over all items.

    ``scores`` is (B, I) and is not modified. For user b the items ``exclude[b]`` (its
    training items) are removed from the ranking; ``targets[b]`` are its held-out items.
    Keys:

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
    for name, rows in (("exclude", exclude), ("targets", targets)):
        _flat_keys(rows, num_items, name)  # range check before reordering
    order = positive_order(exclude, targets)
    block = scores[torch.from_numpy(order)].contiguous()  # a reordered copy: ours to mask
    held = HeldOut.build([exclude[i] for i in order], [targets[i] for i in order], num_items)
    result = rank_block(block, held, ks)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return {k: v[inverse] for k, v in result.metrics.items()}
