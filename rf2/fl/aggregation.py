"""Aggregation routing: which rule computes the round's mean.

* Plain runs: the strategy's own ``aggregate_train`` (FedAvg, FedProx, q-FFL, FedOpt).
  Sparse replies (``rf2.optim.sparse``): the FedAvg family gets the weighted mean
  computed from the rows (one merged reply, as below); q-FFL and strategies rf2 does not
  know get every reply densified.
* Partial sums (``rf2.fl.partial_sum``: only asked for when :meth:`Aggregator.accepts_sums`):
  the weighted mean combines each message's sum_k n_k Δ_k and the single replies exactly
  (``sparse.mean_with_sums``) and goes to the strategy as one merged reply.
* HeteroFL (some tier trains a narrower slice) and per-row embedding averaging: rf2
  computes the mean itself (``rf2.optim``) and hands it to the strategy through
  ``rf2.strategies.merge.aggregate_precomputed``, so server optimizers and q-FFL apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAvg, Strategy

from rf2.fl.params import record_to_numpy
from rf2.fl.records import number_in
from rf2.fl.screening import UsableReply
from rf2.fl.tier_settings import TierSettings
from rf2.optim import sparse
from rf2.optim.heterofl import aggregate_heterofl, full_spec, pad
from rf2.optim.row_averaging import aggregate_rows, item_row_params, mask_untouched, touched_rows_for
from rf2.strategies.merge import aggregate_precomputed, with_arrays
from rf2.strategies.qffl import needs_each_reply


class Aggregator:
    def __init__(self, strategy: Strategy, tiers: TierSettings, num_items: int) -> None:
        self.strategy = strategy
        self.tiers = tiers
        self.num_items = num_items

    def accepts_sums(self) -> bool:
        """True when this run's aggregate is a function of the weighted mean of client
        deltas with no per-client transform on the server: clients may sum."""
        return self._takes_a_mean() and not self.tiers.custom_aggregation

    def _takes_a_mean(self) -> bool:
        """True for rf2's and Flower's FedAvg-family strategies: their aggregate is a
        function of the weighted mean alone, so one merged reply may stand for all."""
        module = type(self.strategy).__module__
        known = module.startswith(("flwr.", "rf2.strategies"))
        return known and isinstance(self.strategy, FedAvg) and not needs_each_reply(self.strategy)

    def _full(self, reply: UsableReply, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A reply's whole arrays (its HeteroFL slice of w_t with its rows written in)."""
        if not sparse.is_sparse(reply.arrays):
            return reply.arrays
        return sparse.densify(sparse.decode(reply.arrays), self.tiers.reference_arrays(reply.user, g))

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
        weights = [float(number_in(m.content, "metrics", "num-examples")) for m in replies]
        if any(r.partial is not None for r in usable):
            return self._with_sums(rnd, g, usable)
        any_sparse = any(sparse.is_sparse(r.arrays) for r in usable)
        if not self.tiers.custom_aggregation and not any_sparse:
            return self.strategy.aggregate_train(rnd, replies)
        if not self.tiers.custom_aggregation:
            updates = [sparse.decode(r.arrays) for r in usable]
            dense = lambda: [sparse.densify(u, g) for u in updates]  # noqa: E731
            if self._takes_a_mean():
                # FedAvg/FedProx/FedOpt: the weighted mean from the sparse deltas, O(rows).
                return aggregate_precomputed(
                    self.strategy, rnd, replies,
                    mean=lambda: sparse.weighted_mean(g, updates, weights), padded=dense)
            # q-FFL or a user's strategy: one full reply per client, as before.
            return self.strategy.aggregate_train(
                rnd, [with_arrays(r, a) for r, a in zip(replies, dense(), strict=True)])
        clients = [self._full(r, g) for r in usable]
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

    def _with_sums(self, rnd: int, g: dict[str, np.ndarray], usable: list[UsableReply]
                   ) -> tuple[Any, Any]:
        if not self.accepts_sums():
            raise RuntimeError("partial sums arrived for a rule that needs each client's update")
        sums = {id(r.partial): r.partial for r in usable if r.partial is not None}
        single = [r for r in usable if r.partial is None]
        updates = [sparse.decode(r.arrays) for r in single]
        weights = [float(number_in(r.message.content, "metrics", "num-examples")) for r in single]
        replies = [r.message for r in usable]

        def padded() -> list[dict[str, np.ndarray]]:
            raise RuntimeError("a mean-only strategy asked for each client's arrays")

        return aggregate_precomputed(
            self.strategy, rnd, replies,
            mean=lambda: sparse.mean_with_sums(
                g, updates, weights, [(p.update, p.weight) for p in sums.values()]),
            padded=padded)
