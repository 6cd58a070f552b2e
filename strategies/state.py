"""Checkpointing a strategy's own state (server-optimizer moments) without pickling it.

Returns a JSON-able dict and a dict of named numpy arrays; Flower objects never go to
disk. The moments are read through :func:`optimizer_moments`, which raises when a FedOpt
strategy lacks them (a Flower rename would otherwise silently drop them from
checkpoints and make a resumed run differ).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi, Strategy

from rf2.core.flower_version import FlowerCompatError

_MOMENTS = ("m_t", "v_t")
# Flower's FedOpt family (its base class is not exported): these keep m_t and v_t.
_FEDOPT = (FedAdagrad, FedAdam, FedYogi)


def optimizer_moments(strategy: Strategy) -> dict[str, dict[str, np.ndarray] | None]:
    """The server optimizer's moments by name (None before the first step); {} for a
    strategy without a server optimizer. Raises if a FedOpt strategy lacks one."""
    if not isinstance(strategy, _FEDOPT):
        return {name: getattr(strategy, name) for name in _MOMENTS if hasattr(strategy, name)}
    missing = [name for name in _MOMENTS if not hasattr(strategy, name)]
    if missing:
        raise FlowerCompatError(
            f"{type(strategy).__name__} has no {', '.join(missing)}: the server optimizer's "
            "moments would be missing from checkpoints (rf2.strategies.state)",
            remedy="install flwr 1.42.x")
    return {name: getattr(strategy, name) for name in _MOMENTS}


def strategy_state(strategy: Strategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta: dict[str, Any] = {"class": type(strategy).__name__}
    arrays: dict[str, np.ndarray] = {}
    for name, moment in optimizer_moments(strategy).items():
        if moment:
            meta[name] = sorted(moment)
            for key, value in moment.items():
                arrays[f"{name}/{key}"] = np.asarray(value)
    return meta, arrays


def load_strategy_state(
    strategy: Strategy, meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> None:
    if meta.get("class") != type(strategy).__name__:
        raise ValueError(
            f"checkpoint was written by strategy {meta.get('class')}, "
            f"this run uses {type(strategy).__name__}"
        )
    known = optimizer_moments(strategy)  # raises if a FedOpt strategy lost its moments
    for name in _MOMENTS:
        if name in meta:
            if name not in known:
                raise ValueError(f"checkpoint has {name} but {type(strategy).__name__} "
                                 "keeps no such server-optimizer moment")
            setattr(strategy, name, {k: arrays[f"{name}/{k}"] for k in meta[name]})
