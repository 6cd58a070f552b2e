"""What a run folder's ``config.yaml`` says ran: the strategy, model, dataset and tiering.

One reading for the console summary (``rf2.runs.summary``) and the results frames
(``rf2.analysis.results``): a plug-in is named by its ``_target_`` (the dotted path the
run imported, e.g. ``mylab.strategies.ShiftedMean``), rf2's own part by its name. A
custom strategy has no server optimizer of rf2's (None), also in run folders written
before ``config.yaml`` left the unused keys out (``rf2.core.plugins``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rf2.core.plugins import BUILTIN_STRATEGY

# part -> (its _target_ key, the key naming rf2's own, the _target_ meaning rf2's own)
PARTS: dict[str, tuple[str, str, str]] = {
    "strategy": ("strategy._target_", "strategy.name", BUILTIN_STRATEGY),
    "model": ("model._target_", "model.name", ""),
    "dataset": ("dataset._target_", "dataset.name", ""),
    "population": ("population._target_", "population.mode", ""),
}


def config_value(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """The value at a dotted path of a config mapping (``default`` if absent)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def plugin(config: Mapping[str, Any], part: str) -> str:
    """The ``_target_`` of a plug-in ``part`` (a key of :data:`PARTS`), '' for rf2's own."""
    target_key, _, builtin = PARTS[part]
    target = config_value(config, target_key) or ""
    return "" if target == builtin else str(target)


def part_used(config: Mapping[str, Any], part: str) -> Any:
    """What ran as ``part``: the plug-in's ``_target_``, else rf2's name for it (None
    when the config has neither). A custom strategy on FedBuff's asynchronous schedule
    reads ``TARGET (fedbuff)``."""
    target = plugin(config, part)
    if not target:
        return config_value(config, PARTS[part][1])
    if part == "strategy" and config_value(config, "strategy.name") == "fedbuff":
        return f"{target} (fedbuff)"
    return target


def server_optimizer_used(config: Mapping[str, Any]) -> Any:
    """rf2's server optimizer of the run; None under a custom strategy (it has its own)."""
    return None if plugin(config, "strategy") else config_value(config,
                                                                "strategy.server_optimizer")
