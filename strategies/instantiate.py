"""Build the run's strategy from ``strategy._target_`` with ``hydra.utils.instantiate``.

Two kinds of target:

* ``rf2.strategies.build_strategy`` (every shipped ``conf/strategy/*.yaml``): rf2's
  builder, called with the typed strategy config and the client config; ``name`` and
  ``server_optimizer`` pick the class (see ``build.py``).
* anything else: a Flower ``Strategy`` class (or a function returning one), e.g.
  ``strategy._target_=mylab.strategies.TrimmedMean``. It is called with
  ``strategy.kwargs`` plus rf2's sampling settings (``sampling.SAMPLING``: take every
  node shown, no minimums, no client-side evaluation) where its signature accepts them;
  a key in ``strategy.kwargs`` wins over the sampling default of the same name.

A target that cannot be imported, cannot be called with those arguments, or does not
return a Flower ``Strategy`` is a one-line config error naming ``strategy._target_``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import hydra.utils
from flwr.serverapp.strategy import Strategy

from rf2.core.config import ClientConfig, StrategyConfig
from rf2.core.errors import ConfigError

from .build import build_strategy
from .sampling import SAMPLING

BUILTIN = "rf2.strategies.build_strategy"
_ALLOWED = ("a dotted path to a flwr.serverapp.strategy.Strategy class or a function "
            "returning one, importable in this Python (e.g. mylab.strategies.MyStrategy)")


def instantiate_strategy(cfg: StrategyConfig, client: ClientConfig) -> Strategy:
    """The run's strategy, built from ``cfg._target_`` (raises ConfigError on a bad one)."""
    target = _resolve(cfg._target_)
    if target is build_strategy:
        if cfg.kwargs:
            raise ConfigError("strategy.kwargs", cfg.kwargs,
                              f"empty with _target_={BUILTIN} (its fields are the "
                              "strategy.* keys); kwargs are for a custom _target_")
        # A partial, then called here: instantiate would turn the typed configs (which
        # carry a ``_target_`` themselves) into OmegaConf nodes and recurse into them.
        builder = hydra.utils.instantiate({"_target_": cfg._target_, "_partial_": True})
        return builder(cfg, client)
    kwargs = {**_sampling_accepted_by(target), **cfg.kwargs}
    try:
        strategy = hydra.utils.instantiate({"_target_": cfg._target_, "_convert_": "all", **kwargs})
    except Exception as ex:  # noqa: BLE001 - any constructor failure is the config's
        cause = ex.__cause__ or ex
        raise ConfigError("strategy._target_", cfg._target_,
                          f"{_ALLOWED}; calling it with {sorted(kwargs)} failed: "
                          f"{type(cause).__name__}: {_first_line(cause)}") from ex
    if not isinstance(strategy, Strategy):
        raise ConfigError("strategy._target_", cfg._target_,
                          f"{_ALLOWED}; it returned a {type(strategy).__name__}")
    return strategy


def _resolve(path: str) -> Any:
    hydra_log = logging.getLogger("hydra.utils")  # it logs the failure over 3 lines
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)
    try:
        target = hydra.utils.get_object(path)
    except Exception as ex:  # noqa: BLE001 - ImportError, AttributeError, ValueError...
        cause = ex.__cause__ or ex
        raise ConfigError("strategy._target_", path,
                          f"{_ALLOWED}; it cannot be imported: {_first_line(cause)}") from ex
    finally:
        hydra_log.setLevel(level)
    if not callable(target):
        raise ConfigError("strategy._target_", path, f"{_ALLOWED}; it is not callable")
    return target


def _sampling_accepted_by(target: Any) -> dict[str, Any]:
    """The sampling keyword arguments ``target`` takes (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return dict(SAMPLING)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(SAMPLING)
    return {k: v for k, v in SAMPLING.items() if k in params}


def _first_line(ex: BaseException) -> str:
    text = str(ex).strip()
    return text.splitlines()[0] if text else type(ex).__name__
