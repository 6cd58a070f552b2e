"""Client deadlines that hold on both backends.

Design: a call that may hang (a ClientApp call in-process; one user's training inside
a batch message on Ray) runs in a daemon worker thread, and the caller waits at most
until the deadline. A call past it is *abandoned*: its result, if it ever comes, is
dropped, and the user is counted under ``fault/timeout``. Python cannot kill a thread,
so an abandoned call may keep running in the background; it only ever touches the
worker's model skeleton it was handed, which is therefore retired
(``rf2.fl.client.retire_worker_model``): the next call builds a fresh one, and the
shared dataset is read-only. Processes (one per call) would make the kill clean but
cost a fork and a model transfer per message, i.e. the in-process backend's point.

Why threads are exact here: calls still run one at a time in submission order (the
caller waits for each), so results, and hence ``metrics.jsonl``, are unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

TIMEOUT_PREFIX = "timeout:"  # an error reason the server counts as fault/timeout


class DeadlineExceeded(Exception):  # noqa: N818 - reads as the event it reports
    """A user's training did not finish before its deadline (reported per user)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no result within {seconds:.1f} s")
        self.seconds = seconds


class _Box(Generic[T]):
    def __init__(self) -> None:
        self.value: T | None = None
        self.error: BaseException | None = None


def call_with_deadline(fn: Callable[[], T], timeout_s: float | None) -> T:
    """``fn()``, or DeadlineExceeded if it has not returned after ``timeout_s`` seconds.

    ``timeout_s`` None: call directly (no thread). An exception of ``fn`` is re-raised.
    """
    if timeout_s is None:
        return fn()
    if timeout_s <= 0:
        raise DeadlineExceeded(0.0)
    box: _Box[T] = _Box()

    def target() -> None:
        try:
            box.value = fn()
        except BaseException as ex:  # noqa: BLE001 - handed to the caller
            box.error = ex

    worker = threading.Thread(target=target, name="rf2-client-call", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise DeadlineExceeded(timeout_s)
    if box.error is not None:
        raise box.error
    return box.value  # type: ignore[return-value]
