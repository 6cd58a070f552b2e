"""Per-user ranking metrics (recall/NDCG@K, AUC) from ONE score matrix per block of users.

Evaluation scores every user against every item each round, so the cost is a few passes
over a (B, I) block. Per block, in this order and on the same buffer:

1. the caller reads what needs raw scores (the test loss);
2. the scores of each user's retrievable held-out items (its *positives*) are gathered;
3. the training items are set to -inf in place and one exact top-k (:func:`top_ids`)
   gives recall/NDCG;
4. training and held-out items are set to +inf in place, and each positive is compared
   with its row in one sign pass (see :func:`_auc`): AUC = the positive's rank among the
   negatives with ties counted 1/2, over the pairs. No second copy and no sort of the
   catalogue.

The per-block index structures (:class:`HeldOut`: flat keys of excluded and held-out
items, packed positive slots, counts) depend only on the data, so an evaluator builds
them once and reuses them every round. Rows are ordered by their number of positives
(ascending), so the j-th comparison pass touches only the contiguous suffix of rows that
have more than j positives: no padding work however ragged the test sets are.

The top-k (:func:`top_ids`) reads a row once: the maximum of every run of ``CHUNK``
items, the k-th largest of those maxima as a threshold, then an exact selection among
only the chunks that can hold a top-k item (k chunks of 32 items: ~5% of 35k items).
Ties rank the lower item id first (as a stable sort of the scores would), so the result
is one defined list, not whatever a heap happened to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rf2.core.arrays import sorted_unique

__all__ = ["BlockRanking", "HeldOut", "best_of", "csr_keys", "finish_auc", "positive_counts",
           "rank_block", "ranking_metrics", "sorted_unique", "top_ids", "topk_list_metrics"]

# Items per chunk of the top-k's first pass: small enough that k chunks are a few % of a
# large catalogue, large enough that the per-chunk maxima are a cheap reduction.
CHUNK = 32
_LOW = 0xFFFFFFFF  # low 32 bits of a sort key: the (complemented) item id


def _sort_keys(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int64 keys ordered as (score descending, item id ascending) when sorted descending.

    The float32 bits are mapped to an int32 of the same order (negative floats: all but
    the sign bit flipped), -0.0 is folded into +0.0 (equal scores must tie), and the
    complemented id fills the low 32 bits, so equal scores rank the lower id higher.
    NaN ranks above +inf, as in ``torch.topk``.
    """
    bits = (values.astype(np.float32, copy=False) + np.float32(0.0)).view(np.int32)
    ordered = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    return (ordered.astype(np.int64) << 32) + (_LOW - ids.astype(np.int64, copy=False))


_NEG_INF_KEY = int(_sort_keys(np.array([-np.inf], dtype=np.float32), np.zeros(1))[0] >> 32)


def best_of(values: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, N) candidate scores and ids -> (B, k') ids, best first (ties: lower id),
    k' = min(k, N), and (B,) whether a row's best k' + 1 hold two equal finite scores
    (where another tie rule could pick or order differently)."""
    keys = _sort_keys(values, ids)  # (B, N)
    n = keys.shape[1]
    m = min(k + 1, n)
    if m < n:
        keys = np.partition(keys, n - m, axis=1)[:, n - m :]
    keys = np.sort(keys, axis=1)[:, ::-1]  # best first; keys are unique: no tie is left
    value = keys >> 32  # the score's order-preserving integer
    tied = ((value[:, 1:] == value[:, :-1]) & (value[:, 1:] != _NEG_INF_KEY)).any(1)
    return _LOW - (keys[:, :k] & _LOW), tied


def top_ids(scores: torch.Tensor, k: int, torch_ties: bool = False) -> np.ndarray:
    """(B, I) float32 scores -> (B, k) int64 item ids of each row's k best, best first.

    Exact, with ties ranked by lower item id (= the first k of a stable descending
    sort). A row's k best lie in the chunks of ``CHUNK`` items whose maximum is at
    least the k-th largest chunk maximum (k chunks hold k items at least that large),
    so only those chunks are ranked. Rows where ties select many chunks, and small
    catalogues, rank the whole row.

    ``torch_ties``: rows whose best k + 1 hold equal finite scores are ranked by
    ``torch.topk`` instead (its heap decides among the tied items), so the lists equal
    rf2's evaluation before this function existed, ties included.
    """
    num_users, num_items = scores.shape
    k = min(k, num_items)
    chunks = num_items // CHUNK
    if chunks < 4 * k:
        return _with_ties(scores, *best_of(scores.numpy(), np.arange(num_items)[None, :], k),
                          k, torch_ties)
    full = scores.as_strided((num_users, chunks, CHUNK), (scores.stride(0), CHUNK, 1))
    cmax = full.amax(2)  # (B, C) each chunk's maximum
    if chunks * CHUNK < num_items:  # the short last chunk
        cmax = torch.cat([cmax, scores[:, chunks * CHUNK :].amax(1, keepdim=True)], 1)
    cm = cmax.numpy()
    n_chunks = cm.shape[1]
    if np.isnan(cm).any():  # NaN scores: no threshold to trust
        return _with_ties(scores, *best_of(scores.numpy(), np.arange(num_items)[None, :], k),
                          k, torch_ties)
    kth = np.partition(cm, n_chunks - k, axis=1)[:, n_chunks - k : n_chunks - k + 1]
    width = int((cm >= kth).sum(1).max())  # chunks at or above the threshold (>= k)
    if width * CHUNK * 2 > num_items:  # heavy ties: ranking whole rows is cheaper
        return _with_ties(scores, *best_of(scores.numpy(), np.arange(num_items)[None, :], k),
                          k, torch_ties)
    # The `width` largest chunk maxima of each row: every chunk at or above its
    # threshold, plus (in rows with fewer) some below it, which changes nothing.
    sel = np.argpartition(cm, n_chunks - width, axis=1)[:, n_chunks - width :]  # (B, W)
    ids = (sel[:, :, None] * CHUNK + np.arange(CHUNK)).reshape(num_users, -1)  # (B, W*CHUNK)
    inside = ids < num_items  # the short last chunk's padding
    vals = np.take_along_axis(scores.numpy(), np.minimum(ids, num_items - 1), axis=1)
    if not inside.all():
        vals = np.where(inside, vals, np.float32("-inf"))
        ids = np.where(inside, ids, _LOW)  # ranks below every real item of equal score
    return _with_ties(scores, *best_of(vals, ids, k), k, torch_ties)


def _with_ties(scores: torch.Tensor, best: np.ndarray, tied: np.ndarray, k: int,
               torch_ties: bool) -> np.ndarray:
    """``best``, with the tied rows re-ranked by ``torch.topk`` when asked."""
    if torch_ties and tied.any():
        rows = torch.from_numpy(np.flatnonzero(tied))
        best[tied] = torch.topk(scores[rows], k, dim=1, sorted=True).indices.numpy()
    return best


def positive_counts(ex_keys: np.ndarray, tg_keys: np.ndarray, num_rows: int,
                    num_items: int) -> np.ndarray:
    """(num_rows,) retrievable held-out items per row from sorted unique flat keys."""
    pos = np.setdiff1d(tg_keys, ex_keys, assume_unique=True)
    return np.bincount(pos // num_items, minlength=num_rows).astype(np.int64)


def csr_keys(indptr: np.ndarray, items: np.ndarray, num_items: int,
             name: str = "items") -> np.ndarray:
    """Sorted unique flat keys ``row * I + item`` of a CSR's rows (duplicates collapse)."""
    if items.size == 0:
        return np.empty(0, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    lo, hi = items.min(), items.max()
    if lo < 0 or hi >= num_items:
        raise ValueError(f"{name}: item ids must lie in [0, {num_items}), got {lo}..{hi}")
    rows = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return sorted_unique(rows * num_items + items)


def to_csr(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A list of item arrays -> (indptr, items)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = (np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in rows])
             if lengths.sum() else np.empty(0, dtype=np.int64))
    return indptr, items


def _flat_keys(rows: Sequence[np.ndarray], num_items: int, name: str) -> np.ndarray:
    """Sorted unique flat indices ``b * I + item`` of user b's items (duplicates collapse).

    Working with these few keys instead of (B, I) boolean masks avoids several full
    passes over the score matrix, which dominate the cost at I = 30,000.
    """
    indptr, items = to_csr(rows)
    return csr_keys(indptr, items, num_items, name)


@dataclass(frozen=True)
class HeldOut:
    """Index structures of one block of users' excluded and held-out items.

    Built once per block from the data (:meth:`build`); rows must already be in
    ascending order of ``n_pos`` (see :func:`positive_order`) for :func:`rank_block`.
    """

    num_users: int
    num_items: int
    ex_keys: torch.Tensor  # (E,) int64 flat keys of excluded items (-inf before top-k)
    seen_keys: torch.Tensor  # (S,) int64 flat keys of excluded | held-out (+inf before AUC)
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
        return cls.from_keys(_flat_keys(exclude, num_items, "exclude"),
                             _flat_keys(targets, num_items, "targets"), num_users, num_items)

    @classmethod
    def from_keys(cls, ex: np.ndarray, tg: np.ndarray, num_users: int, num_items: int,
                  pos: np.ndarray | None = None, seen: np.ndarray | None = None) -> HeldOut:
        """From sorted unique flat keys ``row * I + item`` of excluded and held-out items
        (and, when the caller has them, of the positives ``tg - ex`` and ``ex | tg``)."""
        if pos is None:  # an excluded item cannot be retrieved
            pos = np.setdiff1d(tg, ex, assume_unique=True)
        if seen is None:
            seen = sorted_unique(np.concatenate([ex, tg]))
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
    num_items = 1 + max((int(np.max(r, initial=-1)) for r in (*exclude, *targets)), default=0)
    n_pos = positive_counts(_flat_keys(exclude, num_items, "exclude"),
                            _flat_keys(targets, num_items, "targets"), len(exclude), num_items)
    return np.argsort(n_pos, kind="stable")


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
    best = None
    if topk:
        flat[held.ex_keys] = float("-inf")
        best = top_ids(scores, min(max(ks), num_items), torch_ties=True)  # (B, K)
        out.update(topk_list_metrics(best, held, ks))
    ranking = BlockRanking(out, best, packed)
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

    Twice a positive p's wins over a negative s is sign(p - s) + 1 (2 below, 1 tied, 0
    above), so one subtraction, one sign and one sum per positive and row count them all:
    excluded and held-out items are set to +inf first, each contributing exactly -1,
    which gives 2 * wins = sum over all items of sign(p - s) + I. Pass j handles positive
    j of each row, only for the rows (a contiguous suffix) that have a j-th positive.
    The float32 sums are exact integers below 2**24 items.
    """
    num_users, num_items = scores.shape
    scores.view(-1)[held.seen_keys] = float("inf")  # sign(p - inf) = -1, accounted for
    buf = cmp_buffer if cmp_buffer is not None else torch.empty_like(scores)
    acc = torch.zeros(num_users, dtype=torch.float64)
    for j, start in enumerate(held.col_start.tolist()):
        block = scores[start:]
        out = buf[: num_users - start].view(num_users - start, num_items)
        torch.sub(packed[start:, j : j + 1], block, out=out).sign_()  # (C, I)
        acc[start:] += out.sum(1)
    wins = 0.5 * (acc.numpy() + held.n_pos * num_items)
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
    the LightGCN protocol. Equal scores rank the lower item id first (also at the top-k
    cut); a k above I counts as I. Returns float64 NumPy arrays of shape (B,).
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
