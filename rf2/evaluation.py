"""Server-side evaluation: all users' held-out clicks, all-item ranking minus train items.

Produces the flat metric keys of one ``metrics.jsonl`` row: overall user means
(``recall@K``, ``ndcg@K``, ``auc``), per tier (``tier/<name>/...``), per activity
quartile (``activity/<q>/...``) and fairness summaries across tiers (``fair/<m>/...``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from rf2.data.base import FederatedDataset
from rf2.metrics import activity_quartile, fairness_summary, group_means, ranking_metrics
from rf2.model.examples import eval_histories

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
        with torch.no_grad():
            def score(sl: slice) -> torch.Tensor:
                return model.score_all(model.user_embedding(self.histories[sl]))

            per_user = self._per_user(score)
        return self.summarise(per_user)

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
