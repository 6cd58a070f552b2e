"""Partial aggregation inside a message: the client side of summed replies.

When the round's aggregate is a weighted mean of client deltas (FedAvg, FedProx, a
server optimizer stepping on that mean) and a user's update needs no per-client
transform (compression, a HeteroFL width, per-row averaging, an injected fault), the
server asks for sums (``RoundRecipe.partial_sums``). A message then replies, as
hierarchical and secure aggregation do, with

* ``sum/arrays``: sum_k n_k Δ_k over its summed users (n_k = its examples; row tables
  as ``<name>.rows`` + ``<name>.values`` over the union of their rows, the rest whole:
  ``rf2.optim.sparse``'s layout, holding deltas),
* ``sum/users``: which users of the batch are in the sum and the weight sum sum_k n_k,
* each summed user's own ``metrics/<i>`` (its losses and ``bytes-up``: the size of the
  reply it would have sent alone), so the server logs the same per-user figures.

A summed user whose update is not finite is left out of the sum and replies alone, so
the server's screen still counts it. Who trains was decided per user before training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from rf2.core.arrays import sorted_unique
from rf2.fl.user_task import RoundRecipe, UserTask
from rf2.model.cohort import CohortSum
from rf2.optim.sparse import ROWS, VALUES, changed_rows

FLOAT_BYTES = 4  # a client's parameters are float32
ID_BYTES = 8  # a sparse reply's row ids are int64


def summable(recipe: RoundRecipe, task: UserTask) -> bool:
    """True when this user's update may go into its message's sum."""
    return recipe.partial_sums and not task.replies_alone


def reply_bytes(received: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray],
                sparse: bool) -> int:
    """Bytes of the reply a client would send alone: its rows of each row table (values
    and ids) and every other parameter whole, or (dense replies) the whole model."""
    total = 0
    for name, g in received.items():
        per_row = int(np.prod(np.shape(g)[1:], dtype=np.int64)) * FLOAT_BYTES
        if sparse and name in rows:
            total += len(rows[name]) * (per_row + ID_BYTES)
        else:
            total += int(np.shape(g)[0] if np.ndim(g) else 1) * per_row
    return total


class SumBuilder:
    """Accumulates sum_k n_k Δ_k of one message's summed users (float64, one copy of the
    model per message, never one per user)."""

    def __init__(self, received: Mapping[str, np.ndarray], row_tables: Iterable[str]) -> None:
        self.received = received
        self.row_tables = set(row_tables) & set(received)
        self.acc: dict[str, np.ndarray] = {}
        self.touched: dict[str, list[np.ndarray]] = {name: [] for name in self.row_tables}
        self.weight = 0.0
        self.positions: list[int] = []

    def _add(self, name: str, rows: np.ndarray | None, delta: np.ndarray) -> None:
        acc = self.acc.get(name)
        if acc is None:
            acc = self.acc[name] = np.zeros(np.shape(self.received[name]), dtype=np.float64)
        if rows is None:
            acc += delta
        else:
            acc[rows] += delta  # rows unique within one contribution
            self.touched[name].append(rows)

    def add_sum(self, summed: CohortSum, positions: Iterable[int]) -> None:
        """A cohort's summed step (``rf2.model.cohort.summed_step``)."""
        for name, delta in summed.deltas.items():
            self._add(name, summed.rows.get(name), delta.astype(np.float64))
        self.weight += summed.weight
        self.positions.extend(positions)

    def add_user(self, position: int, weight: float, rows: Mapping[str, np.ndarray],
                 values: Mapping[str, np.ndarray]) -> None:
        """One trained user: ``values`` its new rows (of ``rows``) or whole parameters."""
        for name, g in self.received.items():
            value = np.asarray(values[name], dtype=np.float64)
            if name in rows:
                ids = np.asarray(rows[name], dtype=np.int64)
                self._add(name, ids, weight * (value - np.asarray(g)[ids]))
            else:
                self._add(name, None, weight * (value - np.asarray(g)))
        self.weight += weight
        self.positions.append(position)

    def add_full(self, position: int, weight: float, arrays: Mapping[str, np.ndarray]) -> None:
        """One trained user's whole model (the per-user path)."""
        rows = {name: changed_rows(np.asarray(arrays[name]),
                                   np.asarray(self.received[name]).astype(arrays[name].dtype))
                for name in self.row_tables}
        values = {name: (np.asarray(arrays[name])[rows[name]] if name in rows else arrays[name])
                  for name in self.received}
        self.add_user(position, weight, rows, values)

    def arrays(self) -> dict[str, np.ndarray]:
        """The sum in sparse layout (float32): row tables over the union of rows."""
        out: dict[str, np.ndarray] = {}
        for name, g in self.received.items():
            acc = self.acc.get(name)
            if acc is None:
                acc = np.zeros(np.shape(g), dtype=np.float64)
            if name in self.row_tables:
                parts = self.touched[name]
                rows = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
                out[name + VALUES] = acc[rows].astype(np.float32)
                out[name + ROWS] = rows.astype(np.int64)
            else:
                out[name] = acc.astype(np.float32)
        return out


def finite(values: Iterable[np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in values)
