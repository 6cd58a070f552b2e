"""A per-round view of a Flower Grid that exposes exactly the clients rf2 selected.

Flower's strategies sample nodes themselves with ``random.sample`` over node ids drawn
from ``os.urandom`` (not reproducible, flower issue 3328). rf2 selects clients itself,
seeded and by partition id, and hands the strategy a grid whose ``get_node_ids()`` is
exactly that selection, so the strategy's own ``configure_train`` (FedProx's mu
injection, FedOpt's snapshot of the current arrays, ...) runs unchanged. On the way
out each message gets its user's per-client config (partition id, tier settings); on
the way back replies are returned in partition-id order, so aggregation is identical
whatever order clients finish in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class RoundGrid(Grid):
    def __init__(
        self,
        base: Grid,
        slots: list[int],
        users: list[int],
        per_client: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        if len(users) > len(slots):
            raise ValueError(f"{len(users)} clients selected but only {len(slots)} slots")
        self._base = base
        self.node_to_user = dict(zip(slots, users, strict=False))
        self._per_client = per_client or {}
        self.sent_users: list[int] = []

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
        return sorted(self.node_to_user)

    def _personalise(self, msg: Message) -> Message:
        user = self.node_to_user[msg.metadata.dst_node_id]
        content = msg.content
        config = ConfigRecord(dict(content["config"]))
        config["partition-id"] = user
        for key, value in self._per_client.get(user, {}).items():
            config[key] = value
        records = {k: v for k, v in content.items() if k != "config"}
        records["config"] = config
        self.sent_users.append(user)
        return Message(
            RecordDict(records),
            msg.metadata.dst_node_id,
            msg.metadata.message_type,
            group_id=msg.metadata.group_id or str(config.get("server-round", "")),
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._base.push_messages([self._personalise(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._base.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(
            self._base.send_and_receive([self._personalise(m) for m in messages], timeout=timeout)
        )
        return sorted(replies, key=lambda r: self.node_to_user.get(r.metadata.src_node_id, -1))

    def user_of(self, reply: Message) -> int:
        return self.node_to_user[reply.metadata.src_node_id]
