"""FedAvgM (Hsu et al. 2019): server SGD with momentum on FedAvg's pseudo-gradient.

The arithmetic is Flower's ``flwr.serverapp.strategy.FedAvgM`` (PyTorch's SGD
convention): with the weighted mean w̄ of the replies and w_t the model the clients
received, g = w_t − w̄; m = g on the first step, then m = β·m + g; w_{t+1} = w_t − η·m.
Flower's class cannot be used as it is here: it snapshots w_t once (rf2 changes the
global model outside the strategy: FedBuff's rebasing, DP noise, a resume) and keeps its
momentum as a positional list. This one follows Flower's FedOpt conventions instead, so
it composes with rf2's FedProx and q-FFL mixins, FedBuff and checkpoints as Adagrad, Adam
and Yogi do: ``current_arrays`` (a dict of arrays) is w_t, snapshotted at every
``configure_train``; the momentum is ``m_t`` by parameter name (checkpointed by
``rf2.strategies.state``). Equal to Flower's FedAvgM step for step
(tests/test_strategies.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class FedAvgMomentum(FedAvg):
    """FedAvg's weighted mean, then a server SGD step with momentum towards it."""

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0,
                 **kwargs: Any) -> None:  # noqa: ANN401 - FedAvg's keyword arguments
        super().__init__(**kwargs)
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.current_arrays: dict[str, np.ndarray] | None = None
        self.m_t: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = {k: array.numpy() for k, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregated, metrics = super().aggregate_train(server_round, replies)
        if aggregated is None or (self.server_momentum == 0.0
                                  and self.server_learning_rate == 1.0):
            return aggregated, metrics  # Flower's FedAvgM: plain FedAvg then
        if self.current_arrays is None:
            raise RuntimeError("w_t not set: call configure_train before aggregate_train")
        w_t = self.current_arrays
        mean = {k: a.numpy() for k, a in aggregated.items()}
        grad = {k: w_t[k] - mean[k] for k in mean}  # updates are the opposite of gradients
        if self.server_momentum > 0.0:
            m = self.m_t
            self.m_t = grad if m is None else {
                k: self.server_momentum * m[k] + grad[k] for k in grad}
            grad = self.m_t
        new = {k: np.asarray(w_t[k] - self.server_learning_rate * grad[k]) for k in grad}
        self.current_arrays = new
        return ArrayRecord({k: Array(v) for k, v in new.items()}), metrics
