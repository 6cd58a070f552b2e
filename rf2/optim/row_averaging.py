"""Per-row embedding averaging (RF²'s "fsl" aggregation).

With FedAvg an item's embedding row is averaged over *all* selected clients, although
only the few whose data contain the item moved it: the rest report the old value, so a
rare item's update is diluted by (#clients that touched it) / (#clients). Per-row
averaging divides each row only by the weight of the clients that touched it; rows no
client touched keep their old value. Parameters that are not row-indexed tables get the
ordinary weighted mean.

"Touched" is what the client reports: the ids of the items in its training examples and
histories (targets and history items; PAD excluded). RF²'s code instead counts a row as
touched when the client's update of it is non-zero; with a full softmax every item row
gets a (negative-sample) gradient, so the report, not the update, must decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from rf2.core.arrays import sorted_unique

Shapes = Mapping[str, tuple[int, ...]]


def item_row_params(shapes: Shapes, num_items: int) -> tuple[str, ...]:
    """Parameters indexed by item id: those whose first axis has length ``num_items``.

    For rf2's two-tower: ``history_table`` (I, D), ``item_table`` (I, D), ``bias`` (I,).
    """
    return tuple(name for name, s in shapes.items() if len(s) >= 1 and s[0] == num_items)


def touched_rows_for(item_ids: np.ndarray, params: Iterable[str]) -> dict[str, np.ndarray]:
    """The same touched item ids for every item-indexed parameter (PAD < 0 dropped)."""
    ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    rows = sorted_unique(ids[ids >= 0])  # (R,) sorted, unique
    return {name: rows for name in params}


def touched_items(histories: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Sorted unique item ids in a client's examples: (n, H) histories (PAD = -1), (n,)."""
    ids = np.concatenate([np.asarray(histories).reshape(-1), np.asarray(targets).reshape(-1)])
    return sorted_unique(ids[ids >= 0]).astype(np.int64)


def _row_params(touched_rows: Sequence[Mapping[str, np.ndarray]]) -> set[str]:
    names = {frozenset(t) for t in touched_rows}
    if len(names) > 1:
        raise ValueError("every client must report touched rows for the same parameters")
    return set(next(iter(names), frozenset()))


def mask_untouched(
    global_arrays: Mapping[str, np.ndarray],
    client: Mapping[str, np.ndarray],
    touched: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The client's arrays with untouched rows reset to the global value (a zero update).

    Used where a rule needs one full array per client (q-FFL).
    """
    out: dict[str, np.ndarray] = {}
    for name, g in global_arrays.items():
        if name in touched:
            rows = np.asarray(touched[name], dtype=np.int64)
            masked = np.array(g, copy=True)
            masked[rows] = np.asarray(client[name])[rows]
            out[name] = masked
        else:
            out[name] = np.array(client[name], copy=True)
    return out


def aggregate_rows(
    global_arrays: Mapping[str, np.ndarray],
    client_arrays: Sequence[Mapping[str, np.ndarray]],
    touched_rows: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
) -> dict[str, np.ndarray]:
    """Row-indexed params: per-row weighted mean over the clients that touched the row
    (untouched rows keep the old value). Other params: weighted mean over all clients.

    The row-indexed params are the keys of ``touched_rows`` (the same for every client).
    """
    if not len(client_arrays) == len(touched_rows) == len(weights):
        raise ValueError("client_arrays, touched_rows and weights must have the same length")
    if not client_arrays:
        raise ValueError("no clients to aggregate")
    row_params = _row_params(touched_rows)
    w = np.asarray(weights, dtype=np.float64)  # (K,)
    out: dict[str, np.ndarray] = {}
    for name, g in global_arrays.items():
        if name not in row_params:
            dense = sum(wk * np.asarray(c[name], dtype=np.float64)
                        for wk, c in zip(w, client_arrays, strict=True))
            out[name] = (dense / w.sum()).astype(g.dtype, copy=False)
            continue
        total = np.zeros(g.shape, dtype=np.float64)  # (I, ...) sum_k w_k x_k[row]
        cover = np.zeros(g.shape[0], dtype=np.float64)  # (I,) sum_k w_k over touchers
        for wk, c, t in zip(w, client_arrays, touched_rows, strict=True):
            rows = sorted_unique(np.asarray(t[name], dtype=np.int64))  # (R,)
            total[rows] += wk * np.asarray(c[name], dtype=np.float64)[rows]
            cover[rows] += wk
        hit = cover > 0  # (I,)
        merged = np.array(g, dtype=np.float64, copy=True)
        merged[hit] = total[hit] / cover[hit].reshape((-1,) + (1,) * (g.ndim - 1))
        out[name] = merged.astype(g.dtype, copy=False)
    return out
