"""Checkpointing a strategy's own state (server-optimizer moments) without pickling it.

Returns a JSON-able dict and a dict of named numpy arrays; Flower objects never go to
disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

_MOMENTS = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta: dict[str, Any] = {"class": type(strategy).__name__}
    arrays: dict[str, np.ndarray] = {}
    for name in _MOMENTS:
        moment = getattr(strategy, name, None)
        if moment:
            meta[name] = sorted(moment)
            for key, value in moment.items():
                arrays[f"{name}/{key}"] = np.asarray(value)
    extra = getattr(strategy, "rf2_state", None)
    if callable(extra):
        meta["rf2"] = extra()
    return meta, arrays


def load_strategy_state(
    strategy: Strategy, meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> None:
    if meta.get("class") != type(strategy).__name__:
        raise ValueError(
            f"checkpoint was written by strategy {meta.get('class')}, "
            f"this run uses {type(strategy).__name__}"
        )
    for name in _MOMENTS:
        if name in meta:
            setattr(strategy, name, {k: arrays[f"{name}/{k}"] for k in meta[name]})
    loader = getattr(strategy, "rf2_load_state", None)
    if callable(loader) and "rf2" in meta:
        loader(meta["rf2"])
