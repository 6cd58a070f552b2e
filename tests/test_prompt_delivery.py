"""The push-driven message delivery rf2 installs in Flower's simulation engine."""

from __future__ import annotations

import threading
import time
from queue import Queue

from flwr.server.superlink.fleet.vce import vce_api

from rf2.fl.prompt_delivery import PushedNodes, _make_extractor, check_engine_hooks, prompt_delivery


def test_the_installed_flower_has_the_hooked_function_and_it_is_restored() -> None:
    check_engine_hooks()  # fails loudly if a Flower upgrade renamed or reshaped it
    original = vce_api.add_messages_to_queue
    with prompt_delivery(PushedNodes()):
        assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original


def test_pushed_nodes_wakes_the_waiter_and_hands_each_node_over_once() -> None:
    pushed = PushedNodes()
    assert pushed.take(0.01) == set()
    threading.Timer(0.05, pushed.add, args=([3, 5],)).start()
    started = time.monotonic()
    assert pushed.take(5.0) == {3, 5}
    assert time.monotonic() - started < 2.0  # woken by the push, not the timeout
    assert pushed.take(0.01) == set()


class _State:
    """The LinkState calls the extractor makes: undelivered messages per node."""

    def __init__(self, pending: dict[int, list[str]]) -> None:
        self.pending = pending
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list[str]:
        self.asked.append(node_id)
        return self.pending.pop(node_id, [])


def test_extractor_asks_only_pushed_registered_nodes_and_queues_all_their_messages() -> None:
    pushed, queue, stop = PushedNodes(), Queue(), threading.Event()
    state = _State({1: ["a", "b"], 2: ["c"], 9: ["x"]})
    worker = threading.Thread(target=_make_extractor(pushed),
                              args=(state, queue, {1: 0, 2: 1}, stop))
    worker.start()
    pushed.add([2, 1, 9])  # 9 is not one of the engine's nodes
    got = [queue.get(timeout=5) for _ in range(3)]
    stop.set()
    worker.join(timeout=5)
    assert sorted(got) == ["a", "b", "c"] and queue.empty()
    assert state.asked == [1, 2]
