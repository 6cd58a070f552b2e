"""FedProx (Li et al., MLSys 2020) with a FedOpt server optimizer.

FedProx's only server-side part is sending ``proximal-mu``; the client minimises
loss + (mu/2)·||w − w_t||² (``rf2.model.local_training``), and the server aggregates as FedAvg.
Composed with FedOpt (Reddi et al.), FedAvg's weighted mean is the point the optimizer
steps towards: Δ_t = mean − w_t feeds Adagrad/Adam/Yogi's moments. So
:class:`ProximalMixin` adds FedProx's one hook (``configure_train``) to a FedOpt class
and nothing else; without a server optimizer rf2 uses Flower's ``FedProx`` itself.

FedProx's other half, partial work from stragglers, belongs to the clock, not here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedYogi

from .momentum import FedAvgMomentum


class ProximalMixin(FedAvg):
    """FedProx's server-side hook for any FedAvg-family class: put it first in the bases.

    The same hook as ``flwr.serverapp.strategy.FedProx.configure_train``; FedProx itself
    cannot be mixed into a FedOpt class because its ``__init__`` drops FedOpt's
    arguments (eta, tau, betas).
    """

    def __init__(self, *, proximal_mu: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proximal_mu = proximal_mu

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


class FedProxAdagrad(ProximalMixin, FedAdagrad):
    """FedProx clients, FedAdagrad server step."""


class FedProxAdam(ProximalMixin, FedAdam):
    """FedProx clients, FedAdam server step."""


class FedProxYogi(ProximalMixin, FedYogi):
    """FedProx clients, FedYogi server step."""


class FedProxMomentum(ProximalMixin, FedAvgMomentum):
    """FedProx clients, FedAvgM server step."""
