"""Download accounting: the bytes a client must receive to train one round.

With sparse replies (``simulation.sparse_updates``) a client needs only the rows of the
row tables its loss reads (``FederatedModel.rows_touched``: its history items, its
targets, its negatives and the index's balance sample, drawn from its training seed
before training) plus every dense parameter; a full softmax reads every item, so the
candidate tables travel whole. With dense replies a client receives the whole model.
Either way at its tier's HeteroFL width. Sizes count the float32 values; the row ids a
client asks for (8 bytes each, upstream) are not download.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch

from rf2.core.arrays import sorted_unique
from rf2.data.base import FederatedDataset
from rf2.fl.client import training_seed
from rf2.fl.tier_settings import TierSettings
from rf2.model.base import CANDIDATE, HISTORY, FederatedModel
from rf2.model.examples import user_examples
from rf2.optim.compression import FLOAT_BYTES
from rf2.optim.heterofl import sub_shapes


class DownloadSizes:
    def __init__(self, model: FederatedModel, dataset: FederatedDataset, tiers: TierSettings,
                 run_seed: int, num_rounds: int, sparse: bool) -> None:
        # A copy: the loss sample may follow the round (the index's warm-up), and the
        # server's own model must not be moved by it.
        self.model = copy.deepcopy(model) if sparse else model
        self.dataset = dataset
        self.tiers = tiers
        self.run_seed, self.num_rounds, self.sparse = run_seed, num_rounds, sparse
        self.tables = dict(model.row_tables())
        tables = set(self.tables)
        self._own_rows_touched = type(model).rows_touched is not FederatedModel.rows_touched
        self._examples: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Per tier: bytes of one row of each row table, and of the dense parameters.
        self.row_bytes: list[dict[str, int]] = []
        self.dense_bytes = np.zeros(len(tiers.specs))
        for t, spec in enumerate(tiers.specs):
            shapes: Mapping[str, tuple[int, ...]] = (
                tiers.shapes if spec is None else sub_shapes(spec))
            self.row_bytes.append({n: FLOAT_BYTES * int(np.prod(s[1:], dtype=np.int64))
                                   for n, s in shapes.items() if n in tables})
            self.dense_bytes[t] = FLOAT_BYTES * sum(int(np.prod(s, dtype=np.int64))
                                                    for n, s in shapes.items() if n not in tables)

    def for_users(self, users: np.ndarray, server_round: int) -> np.ndarray:
        """(n,) bytes each user downloads in ``server_round``."""
        users = np.asarray(users, dtype=np.int64)
        tiers = self.tiers.population.tier_of_user[users]
        if not self.sparse:
            return self.tiers.bytes_down[tiers].astype(np.float64)
        self.model.set_training_progress(server_round, self.num_rounds)
        out = np.zeros(len(users))
        for k, (user, tier) in enumerate(zip(users.tolist(), tiers.tolist(), strict=True)):
            gen = torch.Generator().manual_seed(training_seed(self.run_seed, user, server_round))
            counts = self._row_counts(user, self.model.draw_sample(gen))
            row_bytes = self.row_bytes[tier]
            out[k] = self.dense_bytes[tier] + sum(c * row_bytes[n] for n, c in counts.items())
        return out

    def _row_counts(self, user: int, sample: object) -> dict[str, int]:
        """Row table -> how many of its rows this user's loss reads with ``sample``."""
        if self._own_rows_touched:
            histories, targets = user_examples(self.dataset, user)
            return {n: len(r) for n, r in self.model.rows_touched(histories, targets,
                                                                  sample).items()}
        # The contract's rule (FederatedModel.rows_touched), with a user's history rows
        # and targets computed once per run: only the loss sample changes by round.
        cached = self._examples.get(user)
        if cached is None:
            histories, targets = user_examples(self.dataset, user)
            cached = (sorted_unique(histories[histories >= 0]).astype(np.int64),
                      sorted_unique(targets).astype(np.int64))
            self._examples[user] = cached
        history, targets = cached
        candidate = self.model.candidate_rows(targets, sample)
        counts: dict[str, int] = {}
        for name, roles in self.tables.items():
            if CANDIDATE not in roles:
                counts[name] = len(history)  # a history-only table
            elif candidate is None:
                counts[name] = self.model.num_items
            elif HISTORY in roles:
                counts[name] = len(np.union1d(history, candidate))
            else:
                counts[name] = len(candidate)
        return counts
