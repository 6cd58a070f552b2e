"""Row-sparse client updates: the wire format and the exact aggregation maths.

A client's reply carries, for each row table (parameters with one row per item, as the
model declares them: ``rf2.model.base.FederatedModel.row_tables``), only the rows it changed:
``<name>.rows`` (R,) int64 sorted unique ids and ``<name>.values`` (R, ...) their new
values; every other parameter travels whole under its own name. A row that is not in
the reply is the global row: a zero update. With a sampled softmax a client changes its
history items, its targets and its negatives (and the index's balance sample), so a
reply is O(rows touched · D) instead of O(catalogue · D).

Aggregation keeps the dense semantics exactly: the FedAvg mean of w_t + Δ_k with
Δ_k = 0 outside the client's rows is w_t + Σ_k w_k Δ_k / Σ_k w_k, computed by
scatter-adding each reply's deltas (O(Σ rows) + one pass over the tables). Server
optimizers then step on the dense pseudo-gradient (mean − w_t) as before, so Adam/Yogi
still decay the moments of rows nobody touched. Rules that need one array per client
(q-FFL, HeteroFL, per-row averaging) get :func:`densify`'d replies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rf2.core.arrays import sorted_unique

ROWS, VALUES = ".rows", ".values"

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class SparseUpdate:
    """A decoded reply: row tables as (rows, values), the rest whole."""

    rows: dict[str, np.ndarray]  # name -> (R,) int64
    values: dict[str, np.ndarray]  # name -> (R, ...) for row tables
    dense: dict[str, np.ndarray]  # name -> full array

    def num_rows(self) -> int:
        return int(sum(len(r) for r in self.rows.values()))


def changed_rows(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """(R,) sorted ids of the rows where ``new`` differs from ``old``."""
    diff = new != old
    if diff.ndim > 1:  # the row's width spelled out: -1 cannot be inferred for no rows
        diff = diff.reshape(diff.shape[0], math.prod(diff.shape[1:])).any(axis=1)
    return np.flatnonzero(diff).astype(np.int64)


def encode(received: Arrays, rows: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """Reply arrays: only the rows (of ``rows``) whose values differ from ``received``.

    ``rows[name]``/``values[name]``: candidate rows of a row table (the names of
    ``rows``) and their new values; other names of ``values`` are whole parameters.
    Each table's values array comes before its row ids.
    """
    out: dict[str, np.ndarray] = {}
    for name in received:
        if name in rows:
            cand = np.asarray(rows[name], dtype=np.int64)
            vals = np.asarray(values[name])
            # Compared in the client's dtype: a float64 w_t (q-FFL's aggregate) would
            # otherwise differ from its own float32 copy in every row.
            old = np.asarray(received[name])[cand].astype(vals.dtype, copy=False)
            keep = changed_rows(vals, old) if len(cand) else cand
            out[name + VALUES] = np.ascontiguousarray(vals[keep])
            out[name + ROWS] = cand[keep]
        else:
            out[name] = values[name]
    return out


def encode_dense(received: Arrays, arrays: Arrays, row_tables: Iterable[str]
                 ) -> dict[str, np.ndarray]:
    """Reply arrays from a full trained state (the per-user path): the changed rows of
    ``row_tables``, the other parameters whole."""
    rows = {name: np.arange(np.shape(received[name])[0]) for name in row_tables
            if name in received}
    return encode(received, rows, arrays)


def is_sparse(arrays: Arrays) -> bool:
    return any(k.endswith(ROWS) for k in arrays)


def decode(arrays: Arrays) -> SparseUpdate:
    rows, values, dense = {}, {}, {}
    for key, value in arrays.items():
        if key.endswith(ROWS):
            rows[key[: -len(ROWS)]] = np.asarray(value)
        elif key.endswith(VALUES):
            values[key[: -len(VALUES)]] = np.asarray(value)
        else:
            dense[key] = np.asarray(value)
    return SparseUpdate(rows, values, dense)


def screen(arrays: Arrays, reference: Arrays) -> str | None:
    """The fault reason of a sparse reply against the arrays its user was sent, or None.

    ``wrong_shape``: names differ, rows not sorted unique int ids inside the table,
    values not (R, *row shape), a whole parameter of the wrong shape; ``non_finite``:
    NaN/Inf anywhere.
    """
    upd = decode(arrays)
    names = set(upd.dense) | set(upd.rows)
    if names != set(reference) or set(upd.rows) != set(upd.values):
        return "wrong_shape"
    for name, rows in upd.rows.items():
        ref = np.shape(reference[name])
        vals = upd.values[name]
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            return "wrong_shape"
        if vals.shape != (len(rows), *ref[1:]):
            return "wrong_shape"
        if len(rows) and (rows[0] < 0 or rows[-1] >= ref[0] or np.any(np.diff(rows) <= 0)):
            return "wrong_shape"
    for name, value in upd.dense.items():
        if value.shape != np.shape(reference[name]):
            return "wrong_shape"
    for value in (*upd.values.values(), *upd.dense.values()):
        if not np.isfinite(value).all():
            return "non_finite"
    return None


def densify(update: SparseUpdate, received: Arrays) -> dict[str, np.ndarray]:
    """Full arrays: ``received`` with the update's rows written in (O(catalogue))."""
    out: dict[str, np.ndarray] = {}
    for name, g in received.items():
        if name in update.rows:
            full = np.array(g, dtype=update.values[name].dtype, copy=True)
            full[update.rows[name]] = update.values[name]
            out[name] = full
        else:
            out[name] = update.dense[name]
    return out


def weighted_mean(
    global_arrays: Arrays, updates: Sequence[SparseUpdate], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg's weighted mean of the clients' full models, from their sparse updates.

    Row tables: w_t + Σ_k w_k (x_k − w_t)[rows_k] / Σ_k w_k (untouched rows: Δ = 0).
    Whole parameters: Σ_k w_k x_k / Σ_k w_k.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update, and at least one update")
    w = np.asarray(weights, dtype=np.float64)  # (K,)
    total = float(w.sum())
    out: dict[str, np.ndarray] = {}
    for name, g in global_arrays.items():
        g = np.asarray(g)
        if name in updates[0].rows:
            # Only the union of the replies' rows can move; the others stay w_t exactly
            # (g + 0 in float64 rounds back to g), so accumulate over the union alone:
            # O(Σ rows) instead of a float64 pass over the whole catalogue.
            touched = sorted_unique(np.concatenate([u.rows[name] for u in updates]))  # (U,)
            acc = np.zeros((len(touched), *g.shape[1:]), dtype=np.float64)  # Σ_k w_k Δ_k
            base = g[touched].astype(np.float64)  # (U, ...)
            for wk, u in zip(w, updates, strict=True):
                pos = np.searchsorted(touched, u.rows[name])  # unique within a reply
                acc[pos] += wk * (u.values[name].astype(np.float64) - base[pos])
            mean = np.array(g, dtype=np.float32, copy=True)
            mean[touched] = (base + acc / total).astype(np.float32)
            out[name] = mean
        else:
            acc = sum(wk * u.dense[name].astype(np.float64) for wk, u in zip(w, updates, strict=True))
            out[name] = (acc / total).astype(np.float32)
    return out


def mean_with_sums(
    global_arrays: Arrays,
    updates: Sequence[SparseUpdate],
    weights: Sequence[float],
    sums: Sequence[tuple[SparseUpdate, float]],
) -> dict[str, np.ndarray]:
    """FedAvg's weighted mean from single replies and partial sums, exactly combined.

    ``updates``/``weights``: single clients' replies (new values of their rows, or whole
    arrays) and their weights; ``sums``: partial sums (sum_k w_k Δ_k in the same layout,
    holding deltas) with their weight sums. The mean is
    w_t + (sum of all w_k Δ_k) / (sum of all w_k); rows nobody touched stay w_t exactly.
    """
    total = float(np.sum(weights)) + float(sum(w for _, w in sums))
    if total <= 0:
        raise ValueError("need a positive total weight")
    out: dict[str, np.ndarray] = {}
    for name, g in global_arrays.items():
        g = np.asarray(g)
        acc = np.zeros(g.shape, dtype=np.float64)  # sum_k w_k Δ_k
        moved = np.zeros(g.shape[0] if g.ndim else 1, dtype=bool)
        for wk, u in zip(weights, updates, strict=True):
            if name in u.rows:
                rows = u.rows[name]
                acc[rows] += wk * (u.values[name].astype(np.float64) - g[rows])
                moved[rows] = True
            else:
                acc += wk * (u.dense[name].astype(np.float64) - g)
                moved[:] = True
        for s, _ in sums:
            if name in s.rows:
                acc[s.rows[name]] += s.values[name]
                moved[s.rows[name]] = True
            else:
                acc += s.dense[name]
                moved[:] = True
        mean = np.array(g, dtype=np.float32, copy=True)
        if g.ndim:
            mean[moved] = (g[moved].astype(np.float64) + acc[moved] / total).astype(np.float32)
        else:
            mean = (g + acc / total).astype(np.float32)
        out[name] = mean
    return out
