"""``dataset._target_``: interactions from a loader in the user's own module.

The loader is a function ``(cfg, seed, **cfg.kwargs) -> Interactions`` named by a dotted
path (``mylab.data.load_clicks``), importable where rf2 runs (on Ray: in every worker,
e.g. through ``PYTHONPATH``). rf2 then treats its interactions as any loader's:
``dataset.protocol`` decides which users and samples stay, and the per-user split and
history features follow. A target that cannot be imported, or returns anything but
consistent :class:`Interactions`, is one config error naming ``dataset._target_``.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from rf2.core.config import DatasetConfig
from rf2.core.errors import ConfigError
from rf2.data.base import Interactions

ALLOWED = ("a dotted path to a function (cfg, seed, **dataset.kwargs) returning "
           "rf2.data.Interactions, importable in this Python (e.g. mylab.data.load_clicks)")


def resolve(path: str) -> Any:  # noqa: ANN401 - whatever the path names
    """The object a dotted ``path`` names (``package.module.name``)."""
    module, _, attr = path.rpartition(".")
    if not module:
        raise ImportError(f"{path!r} is not a dotted path (package.module.name)")
    return getattr(importlib.import_module(module), attr)


def resolve_function(field: str, path: str, allowed: str) -> Any:  # noqa: ANN401
    """The callable ``path`` names, or one config error naming ``field`` (not importable,
    not callable)."""
    try:
        function = resolve(path)
    except Exception as ex:  # noqa: BLE001 - ImportError, AttributeError, ValueError...
        raise ConfigError(field, path, f"{allowed}; it cannot be imported: {ex}") from ex
    if not callable(function):
        raise ConfigError(field, path, allowed)
    return function


def _problem(inter: Interactions) -> str | None:
    """What is inconsistent about ``inter``, or None."""
    n = inter.user.size
    if inter.item.size != n or inter.timestamp.size != n:
        return (f"user, item and timestamp of different lengths ({n}, {inter.item.size}, "
                f"{inter.timestamp.size})")
    for name in ("user", "item", "timestamp"):
        if getattr(inter, name).dtype.kind not in "iu":
            return f"{name} is {getattr(inter, name).dtype}, not an integer array"
    if n == 0:
        return "no interactions"
    if inter.user.min() < 0 or inter.user.max() >= inter.num_users:
        return f"user ids outside [0, num_users={inter.num_users})"
    if inter.item.min() < 0 or inter.item.max() >= inter.num_items:
        return f"item ids outside [0, num_items={inter.num_items})"
    if inter.user_ids is not None and len(inter.user_ids) != inter.num_users:
        return f"{len(inter.user_ids)} user_ids for {inter.num_users} users"
    return None


def load_target(cfg: DatasetConfig, seed: int) -> Interactions:
    """Call the user's loader and check what it returned (module docstring)."""
    loader = resolve_function("dataset._target_", cfg._target_, ALLOWED)
    inter = loader(cfg, seed, **cfg.kwargs)
    if not isinstance(inter, Interactions):
        raise ConfigError("dataset._target_", cfg._target_,
                          f"{ALLOWED}; it returned a {type(inter).__name__}")
    problem = _problem(inter)
    if problem:
        raise ConfigError("dataset._target_", cfg._target_,
                          f"{ALLOWED}; its Interactions are inconsistent: {problem}")
    return Interactions(
        user=inter.user.astype(np.int64), item=inter.item.astype(np.int64),
        timestamp=inter.timestamp.astype(np.int64), num_users=int(inter.num_users),
        num_items=int(inter.num_items), item_genres=inter.item_genres,
        genre_names=tuple(inter.genre_names), ratings=inter.ratings, user_ids=inter.user_ids,
    )
