"""Aggregation routing: which rule computes the round's mean.

* Plain runs: the strategy's own ``aggregate_train`` (FedAvg, FedProx, q-FFL, FedOpt).
* HeteroFL (some tier trains a narrower slice) and per-row embedding averaging: rf2
  computes the mean itself (``rf2.optim``) and hands it to the strategy through
  ``rf2.strategies.merge.aggregate_precomputed``, so server optimizers and q-FFL apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from rf2.fl.params import record_to_numpy
from rf2.fl.screening import UsableReply
from rf2.fl.tier_settings import TierSettings
from rf2.optim.heterofl import aggregate_heterofl, full_spec, pad
from rf2.optim.row_averaging import aggregate_rows, item_row_params, mask_untouched, touched_rows_for
from rf2.strategies.merge import aggregate_precomputed


class Aggregator:
    def __init__(self, strategy: Strategy, tiers: TierSettings, num_items: int) -> None:
        self.strategy = strategy
        self.tiers = tiers
        self.num_items = num_items

    def aggregate(
        self, rnd: int, global_arrays: dict[str, np.ndarray], usable: list[UsableReply]
    ) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
        """The new global arrays (None: the strategy kept w_t) and the strategy's train
        metrics (None: it reported none)."""
        arrays, metrics = self._route(rnd, global_arrays, usable)
        return (None if arrays is None else record_to_numpy(arrays)), metrics

    def _route(self, rnd: int, g: dict[str, np.ndarray], usable: list[UsableReply]
               ) -> tuple[Any, Any]:
        replies = [r.message for r in usable]
        if not self.tiers.custom_aggregation:
            return self.strategy.aggregate_train(rnd, replies)
        clients = [r.arrays for r in usable]
        weights = [float(m.content["metrics"]["num-examples"]) for m in replies]
        if self.tiers.heterofl:
            specs = [self.tiers.spec_of(r.user) or full_spec(g) for r in usable]
            return aggregate_precomputed(
                self.strategy, rnd, replies,
                mean=lambda: aggregate_heterofl(g, clients, specs, weights),
                padded=lambda: [pad(g, c, sp) for c, sp in zip(clients, specs, strict=True)],
            )
        row_params = item_row_params({k: v.shape for k, v in g.items()}, self.num_items)
        touched = [touched_rows_for(np.asarray(m.content["rf2"]["touched-items"], dtype=np.int64),
                                    row_params) for m in replies]
        return aggregate_precomputed(
            self.strategy, rnd, replies,
            mean=lambda: aggregate_rows(g, clients, touched, weights),
            padded=lambda: [mask_untouched(g, c, t) for c, t in zip(clients, touched, strict=True)],
        )
