"""The resident memory of a process and all its descendants (Ray workers are descendants
of the driver), shared by the benchmarks that report peak RSS."""

from __future__ import annotations

from typing import Any


def tree_rss(proc: Any) -> int:  # psutil.Process
    """Bytes resident in ``proc`` and its descendants; processes that vanish count 0."""
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total
