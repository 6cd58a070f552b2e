"""Deliver pushed messages to Flower's simulation engine when they are pushed.

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) moves
messages from the LinkState to its worker queue with ``add_messages_to_queue``: every
0.1 s it calls ``state.get_message_ins(node_id, limit=1)`` for *every* registered node,
and each such call scans every stored message (delivered ones stay stored until their
reply is pulled). With 100 slots and 100 messages in flight that is 10,000 message
checks per sweep, ten sweeps a second, for the whole round: measured here as the
largest single cost in the driver process, on a 2-core machine that the two client
actors share with it. The ServerApp side then polls for replies every 0.1 s
(``InMemoryGrid.pull_interval``), so each round also idles ~0.1 s on the two sleeps.

:func:`prompt_delivery` swaps the extractor for one that asks the LinkState (through
its public ``get_message_ins``) only for the nodes rf2 has just pushed to, woken by the
push itself, and :class:`PromptGrid` pushes through the engine's grid, signals the
extractor, and pulls replies at a short interval. Messages, ids, TTLs, error replies
and the LinkState are Flower's own; only who-polls-when changes. The swap is undone
when the simulation returns. A Flower upgrade fails loudly instead of silently running
slow: :func:`check_engine_hooks` checks the hooked function before the run, and
:func:`prompt_delivery` checks after it that the engine actually called rf2's
extractor. Only with ``simulation.fast_transport=true`` (``rf2.fl.fast_transport``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from rf2.core.flower_version import FlowerCompatError
from rf2.fl.grid_view import GridView

# How often the ServerApp checks for replies (Flower's default: 0.1 s).
REPLY_POLL_S = 0.003
# The extractor also wakes this often without a push, to notice the stop event.
IDLE_WAKE_S = 0.1


class PushedNodes:
    """Node ids the server has pushed messages to that the engine has not fetched yet."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._nodes: set[int] = set()
        self.num_pushes = 0  # push_messages calls (behaviour check)
        self.extractor_runs = 0  # times Flower's engine started rf2's extractor

    def add(self, node_ids: Iterable[int]) -> None:
        with self._cond:
            self._nodes.update(node_ids)
            self.num_pushes += 1
            self._cond.notify_all()

    def take(self, timeout: float) -> set[int]:
        """Wait up to ``timeout`` for pushes; return (and forget) the pushed node ids."""
        with self._cond:
            if not self._nodes:
                self._cond.wait(timeout)
            nodes, self._nodes = self._nodes, set()
            return nodes


class PromptGrid(GridView):
    """The engine's grid, signalling :class:`PushedNodes` on push and polling replies fast."""

    def __init__(self, base: Grid, pushed: PushedNodes, poll_s: float = REPLY_POLL_S) -> None:
        super().__init__(base)
        self._pushed = pushed
        self._poll_s = poll_s

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._base.push_messages(messages))
        self._pushed.add(m.metadata.dst_node_id for m in messages)
        return ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        # Same contract as InMemoryGrid.send_and_receive: replies received before the
        # timeout (None = wait for all).
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll_s)
        return replies


def _make_extractor(pushed: PushedNodes) -> Any:  # noqa: ANN401 - Flower's thread target
    def add_messages_to_queue(
        state: Any, queue: Queue[Message], nodes_mapping: dict[int, int],  # noqa: ANN401
        f_stop: threading.Event,
    ) -> None:
        pushed.extractor_runs += 1
        while not f_stop.is_set():
            for node_id in sorted(pushed.take(IDLE_WAKE_S)):
                if node_id not in nodes_mapping:
                    continue
                for msg in state.get_message_ins(node_id=node_id, limit=None):
                    queue.put(msg)

    return add_messages_to_queue


def check_engine_hooks() -> None:
    """Raise if Flower's engine no longer has the function this module replaces."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError as ex:
        raise FlowerCompatError(f"rf2.fl.prompt_delivery cannot import Flower's engine: {ex}"
                                ) from ex
    hook = getattr(vce_api, "add_messages_to_queue", None)
    code = getattr(hook, "__code__", None)
    if not callable(hook) or code is None or code.co_varnames[:4] != (
        "state", "queue", "nodes_mapping", "f_stop"
    ):
        raise FlowerCompatError(
            "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue changed, which "
            "rf2.fl.prompt_delivery replaces"
        )


def verify_delivery_used(pushed: PushedNodes) -> None:
    """After a run: messages were pushed, so Flower's engine must have run rf2's extractor
    (if it kept a reference to its own, the patch silently did nothing)."""
    if pushed.num_pushes and not pushed.extractor_runs:
        raise FlowerCompatError(
            "the simulation engine never called rf2's add_messages_to_queue "
            "(rf2.fl.prompt_delivery); its messages went through Flower's own 0.1 s polling"
        )


@contextlib.contextmanager
def prompt_delivery(pushed: PushedNodes) -> Iterator[None]:
    """Use the push-driven extractor for the simulation run inside this block."""
    from flwr.server.superlink.fleet.vce import vce_api

    check_engine_hooks()
    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = _make_extractor(pushed)
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original
    verify_delivery_used(pushed)
