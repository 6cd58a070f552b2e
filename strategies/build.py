"""Map a StrategyConfig to a Flower strategy instance.

``name`` picks the aggregation rule, ``server_optimizer`` the step applied to it:

=========  ===========  ======================  ================  ===================
name       none         adagrad / adam / yogi   momentum          client must
=========  ===========  ======================  ================  ===================
fedavg     FedAvg       FedAdagrad/Adam/Yogi    FedAvgMomentum    (plain local SGD)
fedprox    FedProx      FedProxAdagrad/...      FedProxMomentum   add (mu/2)||w − w_t||², mu = ``proximal-mu``
qffl       QFFL         QFFLAdagrad/...         QFFLMomentum      report ``train_loss`` = F_k(w_t)
=========  ===========  ======================  ================  ===================

Every class is Flower's own or a thin composition of Flower's (``fedprox.py``,
``qffl.py``; QFFL is Flower's QFedAvg without a per-reply ``gc.collect()``), except
FedAvgMomentum (``momentum.py``): Flower's FedAvgM arithmetic with FedOpt's conventions.
Sampling is rf2's (see ``rf2.fl.round_grid``), so every strategy is built to take all the
nodes it is shown (fraction 1, no minimums) and to skip Flower's client-side evaluation
(rf2 evaluates on the server, over all users).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi, Strategy

from rf2.core.config import ClientConfig, StrategyConfig

from .fedprox import FedProxAdagrad, FedProxAdam, FedProxMomentum, FedProxYogi
from .momentum import FedAvgMomentum
from .qffl import QFFL, QFFLAdagrad, QFFLAdam, QFFLMomentum, QFFLYogi
from .sampling import SAMPLING

# (name, server_optimizer) -> class; "none" entries take no optimizer arguments.
_CLASSES: dict[tuple[str, str], type[Strategy]] = {
    ("fedavg", "none"): FedAvg,
    ("fedavg", "adagrad"): FedAdagrad,
    ("fedavg", "adam"): FedAdam,
    ("fedavg", "yogi"): FedYogi,
    ("fedavg", "momentum"): FedAvgMomentum,
    ("fedprox", "none"): FedProx,
    ("fedprox", "adagrad"): FedProxAdagrad,
    ("fedprox", "adam"): FedProxAdam,
    ("fedprox", "yogi"): FedProxYogi,
    ("fedprox", "momentum"): FedProxMomentum,
    ("qffl", "none"): QFFL,
    ("qffl", "adagrad"): QFFLAdagrad,
    ("qffl", "adam"): QFFLAdam,
    ("qffl", "yogi"): QFFLYogi,
    ("qffl", "momentum"): QFFLMomentum,
    # FedBuff: FedAvg's mean of the (staleness-weighted, rebased) buffered updates; the
    # asynchrony itself is the server's (rf2.fl.buffered).
    ("fedbuff", "none"): FedAvg,
    ("fedbuff", "adagrad"): FedAdagrad,
    ("fedbuff", "adam"): FedAdam,
    ("fedbuff", "yogi"): FedYogi,
    ("fedbuff", "momentum"): FedAvgMomentum,
}


def build_strategy(cfg: StrategyConfig, client: ClientConfig) -> Strategy:
    """The Flower strategy for ``cfg``; ``client.lr`` is q-FFL's 1/L and FedOpt's eta_l."""
    key = (cfg.name, cfg.server_optimizer)
    if key not in _CLASSES:
        raise ValueError(
            f"unknown strategy {cfg.name!r} with server optimizer {cfg.server_optimizer!r}; "
            f"known: {sorted({n for n, _ in _CLASSES})} x "
            f"{sorted({o for _, o in _CLASSES})}"
        )
    kwargs: dict[str, Any] = dict(SAMPLING)
    if cfg.server_optimizer == "momentum":  # FedAvgM (rf2.strategies.momentum)
        kwargs.update(server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)
    elif cfg.server_optimizer != "none":
        kwargs.update(eta=cfg.server_lr, eta_l=client.lr, tau=cfg.tau)
        if cfg.server_optimizer != "adagrad":  # FedAdagrad fixes beta_1 = beta_2 = 0
            kwargs.update(beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.name == "fedprox":
        kwargs["proximal_mu"] = cfg.proximal_mu
    elif cfg.name == "qffl":
        kwargs.update(q=cfg.q, client_learning_rate=client.lr)
    return _CLASSES[key](**kwargs)
