"""q-FFL (Li et al., ICLR 2020), alone and composed with a FedOpt server optimizer.

Li et al.'s step, with L = 1/client_lr and F_k = the client's loss at w_t before
training (the client's ``train_loss``)::

    Δw_k = L (w_t − w_k),  Δ_k = F_k^q Δw_k,  h_k = q F_k^(q−1) ||Δw_k||² + L F_k^q
    w_(t+1) = w_t − Σ_k Δ_k / Σ_k h_k

q = 0 gives w_(t+1) = the *unweighted* mean of the w_k (Li et al. sample clients in
proportion to their data; rf2 samples uniformly, so q = 0 is not rf2's FedAvg).

Composed with FedOpt (Reddi et al.), q-FFL's new point w_q is the aggregate the
optimizer steps towards: Δ_t = w_q − w_t = −ΣΔ_k / Σh_k feeds Adagrad/Adam/Yogi's
moments. Those optimizers normalise each coordinate by its own history, so what q-FFL
adds on top of them is the relative weighting of the clients by F_k^q (the direction),
not its step size. :class:`QFFLMean` sits between FedOpt and FedAvg in the method
resolution order, so FedAdagrad/FedAdam/FedYogi's own ``aggregate_train`` — whose
``super()`` call would reach FedAvg's weighted mean — reaches q-FFL's point instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedYogi, QFedAvg

from rf2.core.flower_version import FlowerCompatError

try:  # Flower's own q-FFL arithmetic (module-level helpers, not re-exported)
    from flwr.serverapp.strategy.qfedavg import compute_delta_and_h, get_train_loss
except ImportError as _ex:
    raise FlowerCompatError(f"rf2.strategies.qffl reuses Flower's q-FFL helpers: {_ex}",
                            remedy="install flwr 1.42.x") from _ex

from .momentum import FedAvgMomentum
from .sampling import SAMPLING

if not callable(getattr(QFedAvg, "_check_and_log_replies", None)):  # used by QFFL below
    raise FlowerCompatError("QFedAvg._check_and_log_replies is gone (rf2.strategies.qffl)",
                            remedy="install flwr 1.42.x")


class QFFL(QFedAvg):
    """Flower's ``QFedAvg`` with the same arithmetic (its ``compute_delta_and_h`` and
    ``get_train_loss``), minus one cost and one trap.

    Cost: QFedAvg reads every reply with ``to_numpy_ndarrays(keep_input=False)``, which
    calls ``gc.collect()`` each time: 0.2–0.6 s per call measured in a process that
    holds torch, i.e. about a minute of garbage collection per 100-client round.
    Trap: it pairs a reply's arrays with w_t by position; here they are paired by name.
    Replies are left intact. ``tests/test_strategies.py`` checks equality with QFedAvg.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.current_arrays is None:
            raise AggregationError("w_t not set: call `configure_train` first.")
        keys = list(self.current_arrays.keys())
        w_t = [self.current_arrays[k].numpy() for k in keys]
        big_l = 1.0 / self.client_learning_rate
        sum_delta: list[np.ndarray] | None = None
        sum_h = 0.0
        for msg in valid:
            local = next(iter(msg.content.array_records.values()))
            w_k = [local[k].numpy() for k in keys]  # fresh arrays: updated in place below
            loss = get_train_loss(msg, self.train_loss_key)
            delta, h = compute_delta_and_h(w_t, w_k, self.q, big_l, loss)
            sum_delta = delta if sum_delta is None else [
                s + d for s, d in zip(sum_delta, delta, strict=True)
            ]
            sum_h += h
        assert sum_delta is not None
        new = {k: Array(np.asarray(w - d / sum_h))
               for k, w, d in zip(keys, w_t, sum_delta, strict=True)}
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(new), metrics


class QFFLMean(FedAvg):
    """Replaces FedAvg's weighted mean by q-FFL's new point (computed by :class:`QFFL`).

    Meant to sit after a FedOpt class in the bases (``class X(FedAdagrad, QFFLMean)``):
    FedOpt's ``configure_train`` snapshots w_t in ``current_arrays``; this class hands
    that snapshot to a :class:`QFFL` and returns its aggregate, which FedOpt then steps
    towards. ``q`` and ``client_learning_rate`` (L = 1/lr) are set by the subclass.
    """

    q: float = 0.0
    client_learning_rate: float = 1.0
    train_loss_key: str = "train_loss"
    _qffl: QFFL | None = None

    def _delegate(self) -> QFFL:
        """The QFFL doing the arithmetic (built once: Flower's constructors log)."""
        qffl = self._qffl
        if qffl is None or (qffl.q, qffl.client_learning_rate) != (
            self.q, self.client_learning_rate
        ):
            qffl = self._qffl = QFFL(
                client_learning_rate=self.client_learning_rate,
                q=self.q,
                train_loss_key=self.train_loss_key,
                weighted_by_key=self.weighted_by_key,
                train_metrics_aggr_fn=self.train_metrics_aggr_fn,
                **SAMPLING,
            )
        return qffl

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current: dict[str, np.ndarray] | None = getattr(self, "current_arrays", None)
        if current is None:
            raise AggregationError("w_t not set: call `configure_train` first.")
        qffl = self._delegate()
        qffl.current_arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in current.items()})
        return qffl.aggregate_train(server_round, replies)


class _QFFLConfig(FedAvg):
    """Takes q-FFL's two parameters, passes the rest to the FedOpt constructor."""

    def __init__(self, *, q: float, client_learning_rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.q = q
        self.client_learning_rate = client_learning_rate


class QFFLAdagrad(_QFFLConfig, FedAdagrad, QFFLMean):
    """q-FFL's aggregate, then FedAdagrad's step towards it."""


class QFFLAdam(_QFFLConfig, FedAdam, QFFLMean):
    """q-FFL's aggregate, then FedAdam's step towards it."""


class QFFLYogi(_QFFLConfig, FedYogi, QFFLMean):
    """q-FFL's aggregate, then FedYogi's step towards it."""


class QFFLMomentum(_QFFLConfig, FedAvgMomentum, QFFLMean):
    """q-FFL's aggregate, then FedAvgM's step towards it."""


def needs_each_reply(strategy: object) -> bool:
    """True for rules that weigh clients individually (q-FFL needs every F_k and w_k), so
    they cannot be fed a pre-computed mean (see ``rf2.strategies.merge``)."""
    return isinstance(strategy, QFedAvg | QFFLMean)
