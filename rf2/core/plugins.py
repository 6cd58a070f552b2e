"""What a ``_target_`` plug-in leaves unused, and what a run folder records for it.

A plug-in (``strategy._target_``, ``model._target_``, ``dataset._target_``,
``population._target_``; docs/extending.md) replaces rf2's own implementation of its
group. Model and dataset plug-ins get their whole section as ``cfg`` (every
``model.*`` / ``dataset.*`` key, ``name`` included), so nothing of theirs goes unused. A
strategy class gets ``strategy.kwargs`` and a tiering ``population.kwargs`` only; the
keys only rf2's own implementation reads ("built-in-only") would go unused:

* the **selector** naming rf2's implementation (``population.mode``; ``strategy.name``
  is special, below);
* the **settings** of that implementation (the strategy's server optimizer, FedProx's
  mu, q-FFL's q; the tiering's alpha, strength, leak_test, path).

A built-in-only key at its default says nothing. One that differs from its default was
asked for (command line, group or experiment) and would not act:

* a setting is an **error** naming the field: it asks for an effect that cannot happen
  (``strategy.server_optimizer=yogi`` with a custom strategy);
* a selector is a **warning** (logged when the run starts): a group chosen out of habit
  (``population=activity population._target_=...``) costs nothing the plug-in receives.

``strategy.name`` still picks the round schedule around a custom strategy: ``fedavg``
(synchronous rounds) or ``fedbuff`` (asynchronous, on the simulated clock);
``fedprox`` and ``qffl`` are aggregation rules of rf2's builder, so they are an error.
``kwargs`` without a ``_target_`` (no plug-in to receive them) are an error too.

``config.yaml`` records ``_target_`` and leaves the built-in-only keys out of a plug-in's
section (``strategy.name`` stays when it is ``fedbuff``), so it never names an
implementation or a setting the run did not use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rf2.core.errors import ConfigError
from rf2.core.typed import to_dict

# The strategy ``_target_`` of every shipped conf/strategy/*.yaml: rf2's own builder.
BUILTIN_STRATEGY = "rf2.strategies.build_strategy"


@dataclass(frozen=True)
class BuiltinOnly:
    """The keys of one config group that only rf2's own implementation reads."""

    group: str
    selector: str  # names rf2's implementation
    settings: tuple[str, ...]  # configure it; a plug-in never receives them
    builtin_target: str = ""  # the ``_target_`` meaning rf2's own implementation
    reader: str = ""  # who reads the settings instead, for the error line


GROUPS = (
    BuiltinOnly("strategy", "name", ("server_optimizer", "server_lr", "tau", "beta_1", "beta_2",
                                     "server_momentum", "proximal_mu", "q"), BUILTIN_STRATEGY,
                "rf2's builder (rf2.strategies.build_strategy)"),
    BuiltinOnly("population", "mode", ("alpha", "strength", "leak_test", "path"),
                reader="rf2's tierings (population.mode)"),
)
# strategy.name around a custom strategy: the round schedule it still picks.
STRATEGY_SCHEDULES = ("fedavg", "fedbuff")


@dataclass(frozen=True)
class Unused:
    """A key a plug-in leaves unused although it differs from its default."""

    path: str  # dotted, e.g. "strategy.server_optimizer"
    value: Any
    error: bool  # False: a warning
    why: str  # what is allowed / what happens instead

    def message(self) -> str:
        return f"{self.path}={self.value!r} is unused: {self.why}"


def plugin_target(cfg: Any, group: BuiltinOnly) -> str:
    """The group's ``_target_`` when it names a plug-in, else ''."""
    target = str(getattr(getattr(cfg, group.group), "_target_", "") or "")
    return "" if target == group.builtin_target else target


def unused_keys(cfg: Any) -> list[Unused]:
    """Every built-in-only key of a plug-in's group that differs from its default
    (``cfg`` is a :class:`rf2.core.config.RunConfig`)."""
    out: list[Unused] = []
    for group in GROUPS:
        target = plugin_target(cfg, group)
        if not target:
            continue
        section = getattr(cfg, group.group)
        default = type(section)()
        where = f"{group.group}._target_={target}"
        selector = getattr(section, group.selector)
        if group.group == "strategy":
            if selector not in STRATEGY_SCHEDULES:
                out.append(Unused(f"strategy.{group.selector}", selector, True,
                                  f"{' or '.join(STRATEGY_SCHEDULES)} (synchronous or "
                                  f"asynchronous rounds) with {where}: {selector} is an "
                                  "aggregation rule of rf2's builder, and your class aggregates"))
        elif selector != getattr(default, group.selector):
            out.append(Unused(f"{group.group}.{group.selector}", selector, False,
                              f"{where} replaces {group.reader}"))
        for key in group.settings:
            value = getattr(section, key)
            if value != getattr(default, key):
                out.append(Unused(f"{group.group}.{key}", value, True,
                                  f"its default {getattr(default, key)!r} with {where}, which "
                                  f"never receives it (only {group.reader} read it); "
                                  f"arguments of your own go in {group.group}.kwargs"))
    return out


def check_plugins(cfg: Any) -> None:
    """Raise ConfigError for the first key a plug-in cannot honour (module docstring)."""
    # (strategy.kwargs with rf2's builder: rf2.strategies.instantiate says so.)
    for name in ("dataset", "population"):
        section = getattr(cfg, name)
        if section.kwargs and not section._target_:
            raise ConfigError(f"{name}.kwargs", section.kwargs,
                              f"empty without {name}._target_ (they are the arguments of "
                              "your own plug-in)")
    for unused in unused_keys(cfg):
        if unused.error:
            raise ConfigError(unused.path, unused.value, unused.why)


def recorded_config(cfg: Any) -> dict[str, Any]:
    """The config a run folder records (``config.yaml``): ``cfg`` as a mapping, minus the
    built-in-only keys of each plug-in's group (its ``_target_`` says what ran)."""
    return without_unused(to_dict(cfg))


def without_unused(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping (changed in place and returned) minus the built-in-only keys of
    each plug-in's section. Also for a record written before they were left out: they
    never acted, so a resume drops them instead of tripping over them."""
    for group in GROUPS:
        section = data.get(group.group)
        if not isinstance(section, dict):
            continue
        target = section.get("_target_") or ""
        if not target or target == group.builtin_target:
            continue
        # strategy.name=fedbuff still schedules the rounds around a custom strategy.
        if not (group.group == "strategy" and section.get(group.selector) == "fedbuff"):
            section.pop(group.selector, None)
        for key in group.settings:
            section.pop(key, None)
    return data

