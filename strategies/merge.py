"""Feeding an aggregate that rf2 computed itself (HeteroFL, per-row averaging) through a
Flower strategy, so the server optimizer (FedOpt) and q-FFL still apply.

Flower's FedAvg mean cannot express HeteroFL (clients return slices of different shapes)
or per-row averaging (each row has its own set of contributing clients). The server
computes those means with the pure functions in ``rf2.optim.heterofl`` / ``rf2.optim.row_averaging``
and hands the strategy either

* one merged reply that carries the mean (FedAvg, FedProx and every FedOpt variant:
  the weighted mean of a single reply is that reply, so FedAvg returns the mean and a
  FedOpt class steps towards it), or
* for q-FFL (:func:`needs_each_reply`), every reply with full-shape arrays in which the
  client's uncovered elements hold w_t (a zero update there), so q-FFL still weighs
  each client by F_k^q.

Message-level glue only; the arithmetic lives in the pure modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from .qffl import needs_each_reply

Arrays = Mapping[str, np.ndarray]


def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def with_arrays(reply: Message, arrays: Arrays, arrays_key: str = "arrays") -> Message:
    """A copy of ``reply`` whose ArrayRecord is replaced by ``arrays`` (other records kept).

    Keep the global model's key order: Flower's own QFedAvg pairs arrays by position
    (rf2's QFFL pairs them by name).
    """
    records = {k: v for k, v in reply.content.items() if k != arrays_key}
    records[arrays_key] = _record(arrays)
    return Message(RecordDict(records), reply_to=reply)


def _number(record: MetricRecord, key: str) -> int | float:
    """``record[key]``, which must be a number (a MetricRecord may also hold lists)."""
    value = record[key]
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} is {value!r}, expected a number")
    return value


def weighted_metrics(records: Sequence[Sequence[MetricRecord]], weighted_by_key: str
                      ) -> MetricRecord:
    """FedAvg's metric averaging (Flower's ``strategy_utils.aggregate_metricrecords``:
    same arithmetic in the same order, so the same floats; tests/test_strategies.py) on
    plain dicts: setting a MetricRecord item validates it, ~0.2 s a round at 100 replies.
    ``records``: each reply's MetricRecords, the first holding ``weighted_by_key``."""
    weights = [float(_number(r[0], weighted_by_key)) for r in records]
    total = sum(weights)
    factors = [w / total for w in weights]
    out: dict[str, Any] = {}
    for metric_records, weight in zip(records, factors, strict=True):
        for record in metric_records:
            for key, value in record.items():
                if key == weighted_by_key:
                    continue
                if key not in out:
                    out[key] = [v * weight for v in value] if isinstance(value, list) else (
                        value * weight)
                elif isinstance(value, list):
                    out[key] = [c + v * weight for c, v in zip(out[key], value, strict=True)]
                else:
                    out[key] = out[key] + value * weight
    return MetricRecord(out)


def merged_reply(
    replies: Sequence[Message],
    arrays: Arrays,
    weighted_by_key: str = "num-examples",
    arrays_key: str = "arrays",
    metrics_key: str = "metrics",
) -> Message:
    """One reply carrying ``arrays`` and the replies' metrics, weighted-averaged as
    Flower's FedAvg would, with ``weighted_by_key`` = the replies' total weight."""
    if not replies:
        raise ValueError("no replies to merge")
    contents = [r.content for r in replies]
    records = [list(c.metric_records.values()) for c in contents]
    metrics = weighted_metrics(records, weighted_by_key)
    metrics[weighted_by_key] = sum(_number(r[0], weighted_by_key) for r in records)
    content = RecordDict({arrays_key: _record(arrays), metrics_key: metrics})
    return Message(content, reply_to=replies[0])


def aggregate_precomputed(
    strategy: Strategy,
    server_round: int,
    replies: Sequence[Message],
    mean: Callable[[], dict[str, np.ndarray]],
    padded: Callable[[], list[dict[str, np.ndarray]]],
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Run ``strategy.aggregate_train`` on an aggregate rf2 computed itself.

    ``mean()`` returns the rule's full-shape aggregate (e.g. ``aggregate_heterofl``);
    ``padded()`` returns one full-shape array dict per reply, in reply order, with the
    client's uncovered elements at w_t (e.g. ``heterofl.pad`` / ``mask_untouched``).
    Only the one the strategy needs is computed.
    """
    if not replies:
        return None, None
    if needs_each_reply(strategy):
        full = padded()
        return strategy.aggregate_train(
            server_round, [with_arrays(r, a) for r, a in zip(replies, full, strict=True)]
        )
    return strategy.aggregate_train(server_round, [merged_reply(replies, mean())])
