"""Optional TensorBoard logging of a run's metrics (config switch ``tensorboard=true``).

Every ``metrics.jsonl`` row is mirrored as TensorBoard scalars at ``step = row["round"]``:
the per-tier keys (``tier/<tier>/...``), the fairness summaries (``fair/<metric>/...``)
and the overall, slash-free keys (``recall@20``, ``ndcg@20``, ``auc``, ``wall_time_s``,
``num_clients_trained``, ...). Tags are the metric keys unchanged, so TensorBoard groups
them by their first segment ("tier", "fair") and a regex such as ``tier/.*/recall@20``
shows one metric across tiers. Events go to ``<run_dir>/tensorboard/``:

    tensorboard --logdir multirun/<date>/<time>      # every run of a sweep side by side

``metrics.jsonl`` stays the record of a run; this is a live view of it. Needs the
``tensorboard`` package (``pip install rf2[tensorboard]``); without it, asking for
TensorBoard is a :class:`~rf2.core.errors.ConfigError` (one line, exit status 2).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from rf2.core.errors import ConfigError

__all__ = ["LOG_DIR", "PREFIXES", "TensorBoardLogger", "check_available", "scalars_of"]

LOG_DIR = "tensorboard"
# Prefixed keys mirrored besides the slash-free (overall) ones.
PREFIXES = ("tier/", "fair/")


class ScalarWriter(Protocol):
    """What is used of ``torch.utils.tensorboard.SummaryWriter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...

    def flush(self) -> Any: ...

    def close(self) -> Any: ...


def _missing() -> ConfigError:
    return ConfigError("tensorboard", True,
                       "install the 'tensorboard' package (pip install rf2[tensorboard])")


def check_available() -> None:
    """Raise :class:`ConfigError` unless ``tensorboard`` can be imported (cheap: no torch
    import), so a config asking for it can fail before any compute."""
    try:
        found = importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["tensorboard"] is None
        found = False
    if not found:
        raise _missing()


def _summary_writer(log_dir: str) -> ScalarWriter:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise _missing() from None
    return SummaryWriter(log_dir=log_dir)


def scalars_of(row: Mapping[str, Any], prefixes: tuple[str, ...] = PREFIXES) -> dict[str, float]:
    """The scalars of one metrics row: numeric values (not bool, not null) whose key has no
    ``/`` (overall metrics) or starts with one of ``prefixes``; ``round`` is the step."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "/" not in key or key.startswith(prefixes):
            out[key] = float(value)
    return out


class TensorBoardLogger:
    """Writes each metrics row as scalars into ``<run_dir>/tensorboard/``.

    ``writer_factory(log_dir)`` builds the writer (default: ``SummaryWriter``; raises
    :class:`ConfigError` at construction when ``tensorboard`` is not installed). NaN values
    are written as they are; nulls (and non-numeric values) are skipped. The writer is
    flushed after every row, so a live ``tensorboard --logdir`` sees each round.
    """

    def __init__(self, run_dir: str | os.PathLike[str],
                 writer_factory: Callable[[str], ScalarWriter] | None = None,
                 prefixes: tuple[str, ...] = PREFIXES) -> None:
        self.log_dir = Path(run_dir) / LOG_DIR
        self.prefixes = prefixes
        self._writer: ScalarWriter | None = (writer_factory or _summary_writer)(str(self.log_dir))

    def log_row(self, row: Mapping[str, Any]) -> int:
        """Write the row's scalars at ``step = row["round"]``; returns how many were written."""
        if self._writer is None:
            raise RuntimeError("TensorBoardLogger.log_row after close()")
        step = int(row["round"])
        scalars = scalars_of(row, self.prefixes)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()
        return len(scalars)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
