"""A per-round view of a Flower Grid that exposes exactly the clients rf2 selected.

Flower's strategies sample nodes themselves with ``random.sample`` over node ids drawn
from ``os.urandom`` (not reproducible, flower issue 3328). rf2 selects clients itself,
seeded and by partition id, and hands the strategy a grid whose ``get_node_ids()`` is
exactly the slots this round uses, so the strategy's own ``configure_train``
(FedProx's mu injection, FedOpt's snapshot of the current arrays, ...) runs unchanged.
On the way out each message is addressed to its batch of users (``rf2.fl.user_batch``:
each user's :class:`UserTask`); on the way back each batch reply is unpacked into one
reply per user, returned in partition-id order, so aggregation is identical whatever
order clients finish in and however users are batched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import Message
from flwr.serverapp import Grid

from rf2.fl.grid_view import GridView
from rf2.fl.user_batch import batch_instruction, unpack_reply
from rf2.fl.user_task import UserTask


class RoundGrid(GridView):
    def __init__(
        self,
        base: Grid,
        slots: list[int],
        users: list[int],
        tasks: Mapping[int, UserTask] | None = None,
        users_per_message: int = 1,
    ) -> None:
        num_messages = -(-len(users) // max(1, users_per_message))
        if num_messages > len(slots):
            raise ValueError(f"{len(users)} clients selected at {users_per_message} per message "
                             f"but only {len(slots)} slots")
        super().__init__(base)
        # Interleaved batches: equal sizes, and heavy users spread over the messages.
        self.node_to_users = {slots[j]: list(users[j::num_messages]) for j in range(num_messages)}
        self._tasks = tasks or {}  # users without one get the default UserTask
        self.sent_users: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.node_to_users)

    def _personalise(self, msg: Message) -> Message:
        users = self.node_to_users[msg.metadata.dst_node_id]
        self.sent_users.extend(users)
        return batch_instruction(msg, users, self._tasks)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._base.push_messages([self._personalise(m) for m in messages])

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return [reply for _, reply in self.exchange(messages, timeout=timeout)]

    def exchange(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[tuple[int, Message]]:
        """Send the strategy's instructions; return ``(user, reply)`` per user that
        answered, in partition-id order (so aggregation does not depend on which client
        finished first)."""
        replies = self._base.send_and_receive([self._personalise(m) for m in messages],
                                              timeout=timeout)
        pairs: list[tuple[int, Message]] = []
        for reply in replies:
            users = self.node_to_users[reply.metadata.src_node_id]
            pairs.extend(zip(users, unpack_reply(reply, len(users)), strict=True))
        return sorted(pairs, key=lambda p: p[0])
