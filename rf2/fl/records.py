"""Typed reads of a Flower ``RecordDict``: the record under a key as the kind rf2's
protocol puts there, and a number inside it.

``content[key]`` is typed as any of the three record kinds (and a value in it as any
value of any kind); these narrow it, with an error naming the key when a message
breaks the protocol. ``RecordDict.array_records`` (and its siblings) would narrow too,
but build a new dict of all records per access: too slow per user of a batch.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)


def record_of(content: RecordDict, key: str, kind: type[R]) -> R:
    """``content[key]``, which must be a ``kind`` record."""
    record = content[key]
    if not isinstance(record, kind):
        raise TypeError(f"record {key!r} is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def number_in(content: RecordDict, key: str, name: str) -> int | float:
    """``content[key][name]`` of a metric or config record, which must be a number."""
    value = content[key][name]
    if not isinstance(value, (int, float)):
        raise TypeError(f"{key}[{name!r}] is {value!r}, expected a number")
    return value
