"""Server-side evaluation: test users' held-out clicks, all-item ranking minus train items.

Produces the flat metric keys of one ``metrics.jsonl`` row: overall user means
(``recall@K``, ``ndcg@K``, ``auc``, ``loss``) with the users evaluated (``eval_users``,
of ``eval_users_total``), per tier (``tier/<name>/...``), per activity quartile
(``activity/<q>/...``), fairness summaries across tiers (``fair/<m>/...``) and per-user
distributions (``dist/...``, :mod:`rf2.eval.distribution`).

For a model with an index (``build_retriever``, e.g. ``hier_index``) the same users are
also served through the index: ``index/recall@K`` and ``index/ndcg@K`` (same definitions
as the brute-force ``recall@K``/``ndcg@K``, which stay the all-item numbers),
``exactness@K`` (share of brute force's top K that the index returns in its top K) and
``items_scored_frac`` (items scored exactly per query / all items). Building the
retriever recomputes every item's hard code, so after each aggregation the codes
follow the aggregated parameters.

With RF²'s labelled samples (``dataset.protocol=rf2``) each evaluation also logs RF²'s
CTR metrics ``rated_auc``, ``rated_ap``, ``rated_logloss`` (overall and
``tier/<t>/...``, :mod:`rf2.eval.ctr`) over every test rating, including those of users
without a test click. The score of a (user, item) rating is the retrieval logit
``<user embedding from the last train clicks, item embedding> + item bias`` (the same
number that ranks items); P(click) = sigmoid(logit). AUC and AP depend only on the
order of the logits; the log-loss of a model trained with a softmax over items is not a
calibrated CTR loss and is comparable only between runs of the same model.

How it stays fast at 40k users x 40k items:

- users are scored in blocks of a few MB (:data:`BLOCK_FLOATS`): every metric family
  reads the same score block, raw families (loss) first, then one top-k and the AUC
  passes on it (``rank_block``);
- the per-block index structures are built once, in ``__init__``;
- ``eval.metrics`` selects the families (:data:`FAMILIES`); ``eval.max_users`` scores a
  fixed seeded sample of test users, stratified by tier, and logs its standard error;
- blocks run on ``eval.num_threads`` Python threads, one torch thread each
  (``Evaluator._map_blocks``); the setting in force before (in-process, the client code
  pins the process to one thread) is restored afterwards (:func:`torch_threads`).

A per-user metric family is a name, a stage and a function of a scored block (see
:class:`MetricFamily`); a new one (e.g. hit rate at K) is one entry in :data:`FAMILIES`
plus its name in ``rf2.core.config.METRIC_FAMILIES``. The other names there are not
entries: ``recall``, ``ndcg`` and ``auc`` come from the one shared ranking pass,
``popularity`` is a separate round-0 baseline, ``rated`` RF²'s CTR metrics pooled over
test ratings (:meth:`Evaluator.rated_metrics`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch

from rf2.core.config import METRIC_FAMILIES
from rf2.data.base import FederatedDataset
from rf2.eval.ctr import grouped_ctr_metrics
from rf2.eval.distribution import distribution_row
from rf2.eval.fairness import activity_quartile, fairness_summary, group_means
from rf2.eval.ranking import (
    BlockRanking,
    HeldOut,
    best_of,
    csr_keys,
    finish_auc,
    rank_block,
    topk_list_metrics,
)
from rf2.model.base import FederatedModel
from rf2.model.examples import eval_histories
from rf2.model.retrieval import BeamSearchRetriever, Retriever

__all__ = ["FAMILIES", "Evaluator", "MetricFamily", "stratified_sample", "stratified_se",
           "topk_metrics", "torch_threads"]

# Metrics that get per-tier fairness summaries.
FAIRNESS_METRICS = ("recall@20", "ndcg@20", "auc")
# Scores per block (floats): 8 MB, so the comparison passes over a block hit the cache.
BLOCK_FLOATS = 1 << 21
# Families served by the shared top-k / AUC pass of ``rank_block``.
RANKING_FAMILIES = ("recall", "ndcg", "auc")
# Item id of a candidate slot the index does not serve (padding, or a training item).
_UNSERVED = 0xFFFFFFFF


def resolve_threads(num_threads: int) -> int:
    """``num_threads``, or for 0 the number of cores this process may use: its CPU
    affinity, capped by ``OMP_NUM_THREADS`` when set (a parallel launcher such as Hydra's
    joblib gives each job its share of the cores that way)."""
    if num_threads > 0:
        return num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        return min(cores, int(limit))
    return cores


@contextmanager
def torch_threads(num_threads: int) -> Iterator[int]:
    """Run a block with ``num_threads`` torch threads (0 = every core this process may
    use), restoring the previous setting afterwards (in-process, the client code pins
    the process to one thread). Yields the number used."""
    num_threads = resolve_threads(num_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        torch.set_num_threads(before)


def stratified_sample(strata: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of ``size`` elements, stratified by ``strata``.

    Proportional allocation by largest remainder (every non-empty stratum gets at least
    one element when ``size`` allows), then a uniform draw without replacement within
    each stratum. Same strata, size and seed -> the same sample.
    """
    strata = np.asarray(strata)
    n = strata.size
    if size >= n:
        return np.arange(n)
    names, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    quota = counts * size / n
    alloc = np.floor(quota).astype(np.int64)
    if size >= len(names):
        alloc = np.maximum(alloc, 1)
    while alloc.sum() > size:  # the minimum of one overshot: take from the most
        over = np.where(alloc > 1, alloc - quota, -np.inf)  # over-allocated of those above 1
        alloc[np.argmax(over)] -= 1
    order = np.argsort(-(quota - alloc), kind="stable")  # largest remainder first
    for h in order[: size - int(alloc.sum())]:
        alloc[h] += 1
    rng = np.random.default_rng([seed, 0x5EED_E7A1])
    picked = [rng.choice(np.flatnonzero(inverse == h), int(a), replace=False)
              for h, a in enumerate(alloc) if a > 0]
    return np.sort(np.concatenate(picked))


def stratified_se(values: np.ndarray, strata: np.ndarray, population: dict[Any, int]) -> float:
    """Standard error of the stratified mean estimate from a sample.

    SE^2 = sum_h (N_h / N)^2 (1 - n_h / N_h) s_h^2 / n_h with the finite-population
    correction, so a full evaluation has SE 0. NaN when a sampled stratum has a single
    user (its variance is unknown) or no value is finite.
    """
    values = np.asarray(values, dtype=np.float64)
    total = sum(population.values())
    var = 0.0
    for h, big_n in population.items():
        vals = values[(strata == h) & ~np.isnan(values)]
        n = vals.size
        if n == 0 or n >= big_n:
            continue  # stratum not sampled (no estimate) or evaluated in full (no error)
        if n < 2:
            return math.nan
        var += (big_n / total) ** 2 * (1 - n / big_n) * vals.var(ddof=1) / n
    return math.sqrt(var)


@dataclass
class EvalBlock:
    """One block of evaluated users: data structures built once, reused every round."""

    rows: slice  # positions in Evaluator.users
    held: HeldOut
    histories: torch.Tensor  # (B, H) item ids, PAD = -1
    users: np.ndarray  # (B,) the users (dataset indices)
    dataset: FederatedDataset
    target_keys: torch.Tensor  # (T,) flat keys b * I + item of every held-out click
    target_rows: np.ndarray  # (T,) the row of each
    target_counts: np.ndarray  # (B,) held-out clicks per user (>= 1)

    @property
    def exclude(self) -> list[np.ndarray]:
        """Each user's training items (for a retriever that takes them as a list)."""
        return [self.dataset.train_of(int(u)) for u in self.users]

    @property
    def targets(self) -> list[np.ndarray]:
        """Each user's held-out clicks."""
        return [self.dataset.test_of(int(u)) for u in self.users]


def in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """(K,) whether each key is in ``sorted_keys`` (binary search, no sort of either)."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[at] == keys


def reorder_rows(keys: np.ndarray, order: np.ndarray, num_items: int) -> np.ndarray:
    """Sorted flat keys ``row * I + item`` -> the same sets with row ``order[r]`` as row
    r, still sorted: a gather of whole rows, no sort."""
    indptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // num_items, minlength=len(order)), out=indptr[1:])
    new_ptr, items = rows_of(indptr, keys % num_items, order)
    rows = np.repeat(np.arange(len(order), dtype=np.int64), np.diff(new_ptr))
    return rows * num_items + items


def rows_of(indptr: np.ndarray, items: np.ndarray, rows: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """The CSR (indptr, items) of ``rows`` of a CSR, in that order (no Python loop)."""
    start, stop = indptr[rows], indptr[rows + 1]
    counts = stop - start
    out_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=out_ptr[1:])
    pos = np.repeat(start - out_ptr[:-1], counts) + np.arange(out_ptr[-1], dtype=np.int64)
    return out_ptr, items[pos]


@dataclass
class ScoredBlock:
    """A block with its scores: ``scores`` is raw until the ranking stage masks it."""

    block: EvalBlock
    user_emb: torch.Tensor | None  # (B, D) if the caller has it (else a family computes it)
    scores: torch.Tensor  # (B, I)
    scratch: torch.Tensor  # (>= B, I) a second buffer families may overwrite
    ranking: BlockRanking | None = None


@dataclass
class EvalContext:
    """Per-evaluation state shared by the blocks (e.g. the index's retriever)."""

    model: torch.nn.Module
    ks: list[int]
    num_items: int
    retriever: Retriever | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricFamily:
    """A family of per-user metrics.

    ``stage``: ``raw`` families read the unmasked scores (before the ranking pass);
    ``ranked`` ones run after the top-k pass: ``ScoredBlock.ranking`` holds the all-item
    top K, and the scores are raw except for -inf at the training items. ``compute``
    returns key -> (B,) float64 per-user values (NaN = not defined).
    ``applies`` says whether the family means anything for this model.
    """

    name: str
    stage: Literal["raw", "ranked"]
    compute: Callable[[ScoredBlock, EvalContext], dict[str, np.ndarray]]
    applies: Callable[[torch.nn.Module], bool] = lambda model: True
    needs_topk: bool = False


def _test_loss(sb: ScoredBlock, ctx: EvalContext) -> dict[str, np.ndarray]:
    """(B,) per user: mean softmax cross-entropy of its held-out items over all items
    (the model's training loss, on the test clicks)."""
    b = sb.block
    log_norm = logsumexp_rows(sb.scores, sb.scratch).double().numpy()  # (B,)
    picked = sb.scores.view(-1)[b.target_keys].double().numpy()  # (T,)
    sums = np.bincount(b.target_rows, weights=log_norm[b.target_rows] - picked,
                       minlength=len(b.target_counts))
    return {"loss": sums / b.target_counts}


def logsumexp_rows(scores: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(scores, 1)``, bit for bit (the same operations in the same
    order), with the exponentials written into ``scratch`` instead of a fresh (B, I)
    tensor: allocating and faulting in that tensor per block cost more than the sum."""
    maxes = torch.amax(scores, 1, keepdim=True)  # (B, 1)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0)
    exp = torch.sub(scores, maxes, out=scratch[: scores.shape[0]].view_as(scores)).exp_()
    return exp.sum(1).log_().add_(maxes.squeeze(1))


def _has_index(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "build_retriever", None))


class _IndexedModel(Protocol):
    """What the index family reads of a model with a learned index (``HierIndexModel``)."""

    def user_embedding(self, history: torch.Tensor) -> torch.Tensor: ...

    def query_vectors(self, user_emb: torch.Tensor) -> torch.Tensor: ...


def _index_metrics(sb: ScoredBlock, ctx: EvalContext) -> dict[str, np.ndarray]:
    """Per-user metrics of the index's top K against the targets and brute force.

    The beam search runs batched over the block (``leaves``); the exact scores of the
    items under the kept leaves are the block's own scores (the index scores exactly
    <query, key> = the model's score), so no item vector is gathered again: the block's
    scores of those items only (``items_scored_frac`` of the catalogue) are ranked, ties
    to the lower item id as in the all-item ranking. A retriever without
    ``leaves``/``leaf_items`` is called as is.
    """
    assert ctx.retriever is not None and sb.ranking is not None and sb.ranking.top_ids is not None
    b = sb.block
    k_max = min(max(ctx.ks), ctx.num_items)
    model = cast(_IndexedModel, ctx.model)  # the family applies only to such models (_has_index)
    user = sb.user_emb if sb.user_emb is not None else model.user_embedding(b.histories)
    queries = model.query_vectors(user)  # (B, Dq)
    retriever = ctx.retriever
    if isinstance(retriever, BeamSearchRetriever) and retriever.scan == "torch":
        leaves, _ = retriever.leaves(queries)  # (B, beam), -1 = unused slot
        ids_t, scored = retriever.leaf_items(leaves)  # (B, N), -1 = padding
        ids = ids_t.numpy()
        # Training items are -inf in the block already (rank_block's top-k stage).
        vals = np.take_along_axis(sb.scores.numpy(), np.maximum(ids, 0), axis=1)
        served = (ids >= 0) & np.isfinite(vals)  # unserved slots rank last, then become -1
        vals = np.where(served, vals, np.float32("-inf"))
        best, tied = best_of(vals, np.where(served, ids, _UNSERVED), k_max)  # (B, K')
        index_ids = np.where(best == _UNSERVED, -1, best)
        if index_ids.shape[1] < k_max:  # fewer items under the leaves than K
            pad = np.full((len(index_ids), k_max - index_ids.shape[1]), -1, dtype=np.int64)
            index_ids = np.concatenate([index_ids, pad], axis=1)
        for row in np.flatnonzero(tied):  # as the all-item ranking: torch.topk among ties
            full = torch.full((ctx.num_items,), float("-inf"))
            full[torch.from_numpy(ids[row][served[row]])] = torch.from_numpy(vals[row][served[row]])
            top_s, top_i = torch.topk(full, k_max, sorted=True)
            index_ids[row] = torch.where(torch.isfinite(top_s), top_i, -1).numpy()
        items_scored = scored.numpy()
    else:
        result = retriever.topk(queries, k_max, b.exclude)
        index_ids, items_scored = result.item_ids.numpy(), result.items_scored.numpy()
    out = topk_list_metrics(index_ids, b.held, ctx.ks, prefix="index/")
    brute = sb.ranking.top_ids  # (B, K): the all-item ranking's own top K
    rows = np.arange(len(brute), dtype=np.int64)[:, None] * ctx.num_items
    for k in ctx.ks:
        kk = min(k, k_max)
        same = np.isin(rows + index_ids[:, :kk], rows + brute[:, :kk]) & (index_ids[:, :kk] >= 0)
        out[f"exactness@{k}"] = same.sum(1).astype(np.float64) / kk
    out["items_scored_frac"] = items_scored / ctx.num_items
    return out


# Name -> family, beyond the ranking families (recall, ndcg, auc: one shared pass) and
# ``popularity`` (a separate round-0 baseline). Order = order of computation per stage.
FAMILIES: dict[str, MetricFamily] = {
    "loss": MetricFamily("loss", "raw", _test_loss),
    "index": MetricFamily("index", "ranked", _index_metrics, applies=_has_index,
                          needs_topk=True),
}


class Evaluator:
    def __init__(
        self,
        dataset: FederatedDataset,
        ks: Sequence[int],
        batch_size: int,
        tier_of_user: np.ndarray | None = None,
        tier_names: Sequence[str] = (),
        metrics: Sequence[str] = METRIC_FAMILIES,
        max_users: int = 0,
        num_threads: int = 0,
        seed: int = 0,
        final_max_users: int | None = None,
        distributions: bool = True,
    ) -> None:
        unknown = sorted(set(metrics) - set(METRIC_FAMILIES))
        if unknown:
            raise ValueError(f"unknown metric families {unknown}; allowed: {METRIC_FAMILIES}")
        # What final() needs to build the last evaluation's evaluator (other users).
        self._final_args = dict(ks=ks, batch_size=batch_size, tier_of_user=tier_of_user,
                                tier_names=tier_names, metrics=metrics, num_threads=num_threads,
                                seed=seed, distributions=distributions)
        self._final_max_users = max_users if final_max_users is None else final_max_users
        self._final: Evaluator | None = None
        self.max_users = max_users
        self.dataset = dataset
        self.ks = sorted(set(int(k) for k in ks))
        self.batch_size = batch_size
        self.metrics = [m for m in METRIC_FAMILIES if m in set(metrics)]
        self.num_threads = num_threads
        self.distributions = distributions  # dist/... keys (rf2.eval.distribution)
        self.tier_of_user = tier_of_user
        self.tier_names = list(tier_names)
        quartile, self.quartile_names = activity_quartile(dataset.train_counts)
        self.quartile_of_user = quartile
        # Only users with held-out clicks are evaluated; with max_users, a fixed sample.
        candidates = np.flatnonzero(dataset.test_counts > 0)  # (U_all,)
        self.strata_of_user = (tier_of_user if tier_of_user is not None and self.tier_names
                               else np.zeros(dataset.num_users, dtype=np.int64))
        strata = self.strata_of_user[candidates]
        names, counts = np.unique(strata, return_counts=True)
        self.population = {h: int(c) for h, c in zip(names.tolist(), counts, strict=True)}
        self.num_candidates = int(candidates.size)
        if 0 < max_users < candidates.size:
            candidates = candidates[stratified_sample(strata, max_users, seed)]
        # Ordered by number of positives, so AUC passes touch contiguous row suffixes.
        # Flat keys row * I + item are sorted once (rows = positions in `candidates`),
        # then carried into the new row order by whole rows, which keeps them sorted.
        num_items = dataset.num_items
        ex_keys = csr_keys(*rows_of(dataset.train_indptr, dataset.train_items, candidates),
                           num_items, "train items")  # (E,) sorted unique
        tg_keys = csr_keys(*rows_of(dataset.test_indptr, dataset.test_items, candidates),
                           num_items, "test items")
        pos_keys = tg_keys[~in_sorted(tg_keys, ex_keys)]  # retrievable held-out items
        order = np.argsort(np.bincount(pos_keys // num_items, minlength=len(candidates)),
                           kind="stable")
        self.users = candidates[order]  # (U,)
        ex_keys, tg_keys, pos_keys = (reorder_rows(k, order, num_items)
                                      for k in (ex_keys, tg_keys, pos_keys))
        tg_ptr, tg_items = rows_of(dataset.test_indptr, dataset.test_items, self.users)
        self.histories = torch.from_numpy(eval_histories(dataset, self.users))  # (U, H)
        rows = max(1, min(batch_size, BLOCK_FLOATS // max(num_items, 1)))
        self.blocks = []
        for lo in range(0, len(self.users), rows):
            hi = min(lo + rows, len(self.users))

            def part(keys: np.ndarray, lo: int = lo, hi: int = hi) -> np.ndarray:
                """The block's keys, renumbered from its first row."""
                cut = np.searchsorted(keys, [lo * num_items, hi * num_items])
                return keys[cut[0] : cut[1]] - lo * num_items

            held = HeldOut.from_keys(part(ex_keys), part(tg_keys), hi - lo, num_items,
                                     pos=part(pos_keys))
            self.blocks.append(self._block(
                slice(lo, hi), held,
                (tg_ptr[lo : hi + 1] - tg_ptr[lo], tg_items[tg_ptr[lo] : tg_ptr[hi]])))
        self._rated_setup()

    def _rated_setup(self) -> None:
        """Test ratings (RF²'s protocol only): users, per-sample rows, items, labels."""
        rated = self.dataset.rated
        self.rated_users = np.zeros(0, dtype=np.int64)
        if rated is None:
            return
        counts = rated.test_counts
        self.rated_users = np.flatnonzero(counts > 0)  # (Ur,)
        self.rated_histories = torch.from_numpy(eval_histories(self.dataset, self.rated_users))
        self.rated_rows = np.repeat(np.arange(self.rated_users.size), counts[self.rated_users])
        self.rated_items = rated.test_items  # (R,) grouped by user ascending, like rows
        self.rated_labels = rated.test_labels.astype(np.int64)

    def rated_metrics(self, model: FederatedModel) -> dict[str, float]:
        """RF²'s CTR metrics over all test ratings (empty without labelled samples).

        Not a per-user family: pooled over every test rating, of all users with one
        (also those without a test click), so it scores its own users."""
        if self.rated_users.size == 0:
            return {}
        logits = np.empty(self.rated_items.size, dtype=np.float64)  # (R,)
        with torch.no_grad():
            for start in range(0, self.rated_users.size, self.batch_size):
                stop = start + self.batch_size
                users = torch.from_numpy(self.rated_users[start:stop])
                scores = model.score_users(self.rated_histories[start:stop], users)
                m = (self.rated_rows >= start) & (self.rated_rows < stop)
                logits[m] = scores[torch.from_numpy(self.rated_rows[m] - start),
                                   torch.from_numpy(self.rated_items[m])].double().numpy()
        if self.tier_of_user is None or not self.tier_names:
            groups, names = np.zeros(logits.size, dtype=np.int64), []
        else:
            groups = self.tier_of_user[self.rated_users][self.rated_rows]
            names = self.tier_names
        return grouped_ctr_metrics(self.rated_labels, logits, groups, names)

    @classmethod
    def from_config(cls, dataset: FederatedDataset, cfg: Any, seed: int,
                    tier_of_user: np.ndarray | None = None,
                    tier_names: Sequence[str] = ()) -> Evaluator:
        """From an ``EvalConfig`` (``cfg``) and the run seed (which picks the sample)."""
        return cls(dataset, cfg.ks, cfg.batch_size, tier_of_user, tier_names,
                   metrics=cfg.metrics, max_users=cfg.max_users, num_threads=cfg.num_threads,
                   seed=seed, final_max_users=cfg.final_max_users,
                   distributions=cfg.distributions)

    def final(self) -> Evaluator:
        """The evaluator of a run's last evaluation (``final_max_users``): this one when
        the user set is the same, else one built on first use and kept."""
        if self._final_max_users == self.max_users:
            return self
        if self._final is None:
            self._final = Evaluator(self.dataset, max_users=self._final_max_users,
                                    **self._final_args)  # type: ignore[arg-type]
        return self._final

    def _block(self, rows: slice, held: HeldOut,
               targets: tuple[np.ndarray, np.ndarray]) -> EvalBlock:
        tg_ptr, tg_items = targets
        counts = np.diff(tg_ptr)
        target_rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        return EvalBlock(
            rows=rows, held=held, histories=self.histories[rows], users=self.users[rows],
            dataset=self.dataset,
            target_keys=torch.from_numpy(target_rows * self.dataset.num_items
                                         + tg_items.astype(np.int64)),
            target_rows=target_rows, target_counts=np.maximum(counts, 1),
        )

    # -- evaluation --------------------------------------------------------------------
    def _map_blocks(self, fn: Callable[[EvalBlock, torch.Tensor, torch.Tensor],
                                       dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``fn(block, score_buffer, compare_buffer)`` over every block, concatenated.

        Blocks run in parallel on ``num_threads`` Python threads, each block's torch ops
        on one thread (torch releases the GIL). Per-op multi-threading would put an
        OpenMP barrier in every one of the thousands of small ops, and on a busy machine
        each barrier waits for the slowest core; and a block's numbers do not depend on
        how many threads ran (same results on any machine).
        """
        rows = max((b.held.num_users for b in self.blocks), default=1)
        local = threading.local()

        def run(block: EvalBlock) -> dict[str, np.ndarray]:
            if not hasattr(local, "buffers"):  # (R, I) scores and comparisons, per thread
                # Also pins this thread's BLAS (MKL keeps a per-thread setting), so a
                # block's matmul is computed the same way on every thread.
                torch.set_num_threads(1)
                local.buffers = (torch.empty(rows, self.dataset.num_items),
                                 torch.empty(rows, self.dataset.num_items))
            with torch.no_grad():  # grad mode is per thread
                return fn(block, *local.buffers)

        threads = resolve_threads(self.num_threads)
        with torch_threads(1):
            if threads == 1 or len(self.blocks) <= 1:
                results = [run(b) for b in self.blocks]
            else:
                with ThreadPoolExecutor(threads, thread_name_prefix="rf2-eval") as pool:
                    results = list(pool.map(run, self.blocks))
        keys = results[0].keys() if results else []
        return {k: np.concatenate([r[k] for r in results]) for k in keys}

    def _scored(self, sb: ScoredBlock, families: Sequence[MetricFamily]) -> dict[str, np.ndarray]:
        """Every selected family on one scored block, in stage order, one score buffer:
        raw families -> top-k (training items -inf) -> ranked families -> AUC (NaN mask)."""
        out: dict[str, np.ndarray] = {}
        for fam in families:
            if fam.stage == "raw":
                out.update(fam.compute(sb, self._ctx))
        want = [m for m in RANKING_FAMILIES if m in self.metrics]
        need_topk = "recall" in want or "ndcg" in want or any(f.needs_topk for f in families)
        if need_topk or "auc" in want:
            sb.ranking = rank_block(sb.scores, sb.block.held, self.ks, topk=need_topk,
                                    auc="auc" in want, cmp_buffer=sb.scratch, defer_auc=True)
        for fam in families:
            if fam.stage == "ranked":
                out.update(fam.compute(sb, self._ctx))
        if sb.ranking is not None:
            finish_auc(sb.scores, sb.ranking, sb.block.held, sb.scratch)
            out.update({k: v for k, v in sb.ranking.metrics.items()
                        if k.split("@")[0] in want})
        return out

    @torch.no_grad()
    def evaluate_model(self, model: FederatedModel) -> dict[str, float]:
        model.eval()
        families = [FAMILIES[m] for m in self.metrics if m in FAMILIES
                    and FAMILIES[m].applies(model)]
        self._ctx = EvalContext(model, self.ks, self.dataset.num_items)
        if any(f.name == "index" for f in families):
            with torch_threads(self.num_threads):
                self._ctx.retriever = model.build_retriever()  # type: ignore[operator]

        def score(block: EvalBlock, buf: torch.Tensor, cmp: torch.Tensor) -> dict[str, np.ndarray]:
            users = torch.from_numpy(self.users[block.rows])
            scores = model.score_users(block.histories, users)  # (B, I), ours to overwrite
            if scores.dtype != torch.float32 or not scores.is_contiguous():
                scores = scores.float().contiguous()
            return self._scored(ScoredBlock(block, None, scores, cmp), families)

        row = self.summarise(self._map_blocks(score))
        if "rated" in self.metrics:
            with torch_threads(self.num_threads):
                row.update(self.rated_metrics(model))
        return row

    @torch.no_grad()
    def evaluate_popularity(self) -> dict[str, float]:
        """The most-popular-items baseline (``popularity/...``), if selected."""
        if "popularity" not in self.metrics:
            return {}
        pop = torch.from_numpy(self.dataset.item_popularity().astype(np.float32))  # (I,)
        self._ctx = EvalContext(torch.nn.Module(), self.ks, self.dataset.num_items)

        def score(block: EvalBlock, buf: torch.Tensor, cmp: torch.Tensor) -> dict[str, np.ndarray]:
            n = block.held.num_users
            scores = buf[:n]
            scores.copy_(pop.unsqueeze(0).expand(n, -1))  # (B, I)
            return self._scored(ScoredBlock(block, None, scores, cmp), [])

        per_user = self._map_blocks(score)
        return {f"popularity/{k}": float(np.nanmean(v)) for k, v in per_user.items()}

    def summarise(self, per_user: dict[str, np.ndarray]) -> dict[str, float]:
        row: dict[str, float] = {k: float(np.nanmean(v)) for k, v in per_user.items()}
        row["eval_users"] = int(len(self.users))
        row["eval_users_total"] = self.num_candidates
        strata = self.strata_of_user[self.users]
        for k in self.ks:
            if f"recall@{k}" in per_user:
                row[f"se/recall@{k}"] = stratified_se(per_user[f"recall@{k}"], strata,
                                                      self.population)
        if self.tier_of_user is not None and self.tier_names:
            tiers = self.tier_of_user[self.users]
            row.update(group_means(per_user, tiers, self.tier_names, prefix="tier"))
            for metric in FAIRNESS_METRICS:
                if metric not in per_user:
                    continue
                values = {t: row[f"tier/{t}/{metric}"] for t in self.tier_names
                          if np.isfinite(row.get(f"tier/{t}/{metric}", np.nan))}
                summary = fairness_summary(values, per_user[metric])
                row.update({f"fair/{metric}/{k}": float(v) for k, v in summary.items()})
        if self.distributions:
            # One tier: its keys would repeat the overall ones.
            tiered = self.tier_of_user is not None and len(self.tier_names) > 1
            row.update(distribution_row(
                per_user, self.tier_of_user[self.users] if tiered else None,  # type: ignore[index]
                self.tier_names if tiered else ()))
        quartiles = self.quartile_of_user[self.users]
        row.update(group_means(per_user, quartiles, self.quartile_names, prefix="activity"))
        return row


def _flat(rows: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Flat keys ``b * I + item`` of every row's items."""
    lengths = [len(r) for r in rows]
    if sum(lengths) == 0:
        return np.empty(0, dtype=np.int64)
    users = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    return users * num_items + np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])


def topk_metrics(
    top_ids: np.ndarray,  # (B, K) retrieved item ids, best first, -1 = empty slot
    exclude: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    ks: Sequence[int],
    num_items: int,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """Recall@k and NDCG@k of a retrieved list, defined as in ``ranking_metrics``.

    |targets| (unique) is the recall denominator, excluded targets cannot be hits, the
    ideal DCG has min(k, |targets|) hits. Needed because an index returns a list, not
    scores for every item; empty slots are never hits.
    """
    num_users, k_max = top_ids.shape
    tg = np.unique(_flat(targets, num_items))
    pos = np.setdiff1d(tg, np.unique(_flat(exclude, num_items)), assume_unique=True)
    n_targets = np.bincount(tg // num_items, minlength=num_users).astype(np.float64)
    keys = np.arange(num_users)[:, None] * num_items + top_ids
    hits = (np.isin(keys, pos) & (top_ids >= 0)).astype(np.float64)  # (B, K)
    gains = 1.0 / np.log2(np.arange(2, k_max + 2, dtype=np.float64))  # (K,)
    cum_hits, cum_dcg, cum_ideal = hits.cumsum(1), (hits * gains).cumsum(1), gains.cumsum()
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(k, k_max)
        n_ideal = np.clip(n_targets, 1, kk).astype(np.int64)
        recall = cum_hits[:, kk - 1] / np.maximum(n_targets, 1)
        ndcg = cum_dcg[:, kk - 1] / cum_ideal[n_ideal - 1]
        out[f"{prefix}recall@{k}"] = np.where(n_targets > 0, recall, np.nan)
        out[f"{prefix}ndcg@{k}"] = np.where(n_targets > 0, ndcg, np.nan)
    return out
