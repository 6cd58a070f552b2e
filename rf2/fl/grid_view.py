"""A Flower Grid that forwards every call to another Grid: the base of rf2's grid views
(:class:`rf2.fl.round_grid.RoundGrid`, :class:`rf2.fl.prompt_delivery.PromptGrid`), which
override only what they change."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class GridView(Grid):
    def __init__(self, base: Grid) -> None:
        self._base = base

    def set_run(self, run: Run) -> None:
        self._base.set_run(run)

    @property
    def run(self) -> Run:
        return self._base.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._base.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._base.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._base.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._base.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._base.send_and_receive(messages, timeout=timeout)
