"""``rf2 resume=RUN_DIR [overrides]``: which overrides a resume may change.

A resumed run continues the saved config. Only keys that change how long the run goes
or how it is carried out, never a number it produces, may differ from the saved ones:

* ``num_rounds`` and ``num_passes`` (extend a run; the index's temperature schedule is absolute,
  ``model.index.anneal_steps``, so an extended run matches a longer one from the
  start), ``checkpoint_every``, ``progress``, ``debug``, ``tensorboard``;
* ``simulation.*``: the backend and its transport (both backends give identical rows).

Any other override whose value differs from the saved config is refused with one line
listing the differences (``strategy.name: 'fedavg' -> 'qffl'``), exit status 2.
"""

from __future__ import annotations

from typing import Any

from rf2.core.errors import UserInputError

RESUMABLE_KEYS = ("num_rounds", "num_passes", "checkpoint_every", "progress", "debug", "tensorboard",
                  "simulation")


class ResumeMismatch(UserInputError):
    """A resume asked to change what the run computes."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: node}


def _allowed(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys the command line set (group names included), minus hydra/resume."""
    keys = []
    for arg in overrides:
        if "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in ("resume", "hydra") or key.startswith(("hydra.", "hydra/")):
            continue
        keys.append("" if key == "experiment" else key)  # an experiment may set anything
    return keys


def resumed_config(saved: dict[str, Any], new: dict[str, Any], overrides: list[str],
                   run_dir: str) -> dict[str, Any]:
    """The config to resume with: ``saved`` plus the allowed overrides from ``new``.

    ``new`` is the composed config of this command (defaults + overrides); only the keys
    the command line named are compared, so the defaults do not count as changes.
    """
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    touched = override_keys(overrides)
    differences = []
    merged = dict(flat_saved)
    for key, value in flat_new.items():
        if key == "resume" or not any(t == "" or key == t or key.startswith(t + ".")
                                      for t in touched):
            continue
        if flat_saved.get(key, value) == value and key in flat_saved:
            continue
        if _allowed(key):
            merged[key] = value
        else:
            differences.append(f"{key}: {flat_saved.get(key)!r} -> {value!r}")
    if differences:
        allowed = ", ".join(k + (".*" if k == "simulation" else "") for k in RESUMABLE_KEYS)
        raise ResumeMismatch(
            f"resume={run_dir} cannot change what the run computes: "
            + "; ".join(differences)
            + f" (a resume may change only {allowed}; start a new run for the rest)")
    return _unflatten(merged)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
