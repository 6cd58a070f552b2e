"""Server-side evaluation: all users' held-out clicks, all-item ranking minus train items.

Produces the flat metric keys of one ``metrics.jsonl`` row: overall user means
(``recall@K``, ``ndcg@K``, ``auc``), per tier (``tier/<name>/...``), per activity
quartile (``activity/<q>/...``) and fairness summaries across tiers (``fair/<m>/...``).

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from rf2.data.base import FederatedDataset
from rf2.eval.ctr import grouped_ctr_metrics
from rf2.eval.fairness import activity_quartile, fairness_summary, group_means
from rf2.eval.ranking import ranking_metrics
from rf2.model.examples import eval_histories
from rf2.model.retrieval import Retriever

# Metrics that get per-tier fairness summaries.
FAIRNESS_METRICS = ("recall@20", "ndcg@20", "auc")


class Evaluator:
    def __init__(
        self,
        dataset: FederatedDataset,
        ks: Sequence[int],
        batch_size: int,
        tier_of_user: np.ndarray | None = None,
        tier_names: Sequence[str] = (),
    ) -> None:
        self.dataset = dataset
        self.ks = sorted(set(int(k) for k in ks))
        self.batch_size = batch_size
        # Only users with held-out clicks are evaluated.
        self.users = np.flatnonzero(dataset.test_counts > 0)  # (U,)
        self.histories = torch.from_numpy(eval_histories(dataset, self.users))  # (U, H)
        self.exclude = [dataset.train_of(int(u)) for u in self.users]
        self.targets = [dataset.test_of(int(u)) for u in self.users]
        self.tier_of_user = tier_of_user
        self.tier_names = list(tier_names)
        quartile, self.quartile_names = activity_quartile(dataset.train_counts)
        self.quartile_of_user = quartile
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

    def rated_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """RF²'s CTR metrics over all test ratings (empty without labelled samples)."""
        if self.rated_users.size == 0:
            return {}
        logits = np.empty(self.rated_items.size, dtype=np.float64)  # (R,)
        with torch.no_grad():
            for start in range(0, self.rated_users.size, self.batch_size):
                stop = start + self.batch_size
                scores = model.score_all(model.user_embedding(self.rated_histories[start:stop]))
                m = (self.rated_rows >= start) & (self.rated_rows < stop)
                logits[m] = scores[torch.from_numpy(self.rated_rows[m] - start),
                                   torch.from_numpy(self.rated_items[m])].double().numpy()
        if self.tier_of_user is None or not self.tier_names:
            groups, names = np.zeros(logits.size, dtype=np.int64), []
        else:
            groups = self.tier_of_user[self.rated_users][self.rated_rows]
            names = self.tier_names
        return grouped_ctr_metrics(self.rated_labels, logits, groups, names)

    def _per_user(self, score_fn: Callable[[slice], torch.Tensor]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(self.users), self.batch_size):
            sl = slice(start, start + self.batch_size)
            scores = score_fn(sl)  # (B, I)
            res = ranking_metrics(scores, self.exclude[sl], self.targets[sl], self.ks)
            for key, values in res.items():
                parts.setdefault(key, []).append(values)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        build = getattr(model, "build_retriever", None)
        retriever: Retriever | None = build() if callable(build) else None
        served: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            def score(sl: slice) -> torch.Tensor:
                user = model.user_embedding(self.histories[sl])  # (B, D)
                scores = model.score_all(user)  # (B, I)
                served.setdefault("loss", []).append(self._test_loss(scores, sl))
                if retriever is not None:
                    queries = model.query_vectors(user)  # (B, Dq)
                    for key, values in self._served(retriever, queries, scores, sl).items():
                        served.setdefault(key, []).append(values)
                return scores

            per_user = self._per_user(score)
        per_user.update({k: np.concatenate(v) for k, v in served.items()})
        return {**self.summarise(per_user), **self.rated_metrics(model)}

    def _test_loss(self, scores: torch.Tensor, sl: slice) -> np.ndarray:
        """(B,) per user: mean softmax cross-entropy of its held-out items over all items
        (the model's training loss, on the test clicks)."""
        log_probs = torch.log_softmax(scores, dim=1).numpy()  # (B, I)
        targets = self.targets[sl]
        lengths = np.array([len(t) for t in targets], dtype=np.int64)  # >= 1: test users only
        rows = np.repeat(np.arange(len(targets)), lengths)
        picked = log_probs[rows, np.concatenate(targets)].astype(np.float64)
        return -np.bincount(rows, weights=picked, minlength=len(targets)) / lengths

    def _served(
        self, retriever: Retriever, queries: torch.Tensor, scores: torch.Tensor, sl: slice
    ) -> dict[str, np.ndarray]:
        """Per-user metrics of the index's top K against the targets and brute force."""
        k_max = min(max(self.ks), self.dataset.num_items)
        exclude, targets = self.exclude[sl], self.targets[sl]
        result = retriever.topk(queries, k_max, exclude)
        out = topk_metrics(result.item_ids.numpy(), exclude, targets, self.ks,
                           self.dataset.num_items, prefix="index/")
        masked = scores.clone()
        masked.view(-1)[torch.from_numpy(_flat(exclude, scores.shape[1]))] = float("-inf")
        brute = torch.topk(masked, k_max, dim=1).indices.numpy()  # (B, K)
        index_ids = result.item_ids.numpy()
        for k in self.ks:
            kk = min(k, k_max)
            same = [np.intersect1d(a[:kk], b[:kk]).size for a, b in zip(index_ids, brute,
                                                                        strict=True)]
            out[f"exactness@{k}"] = np.asarray(same, dtype=np.float64) / kk
        out["items_scored_frac"] = result.items_scored.numpy() / self.dataset.num_items
        return out

    def evaluate_popularity(self) -> dict[str, float]:
        pop = torch.from_numpy(self.dataset.item_popularity().astype(np.float32))  # (I,)

        def score(sl: slice) -> torch.Tensor:
            n = len(self.users[sl])
            return pop.unsqueeze(0).expand(n, -1)

        per_user = self._per_user(score)
        return {f"popularity/{k}": float(np.nanmean(v)) for k, v in per_user.items()}

    def summarise(self, per_user: dict[str, np.ndarray]) -> dict[str, float]:
        row: dict[str, float] = {k: float(np.nanmean(v)) for k, v in per_user.items()}
        row["users_evaluated"] = int(len(self.users))
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
