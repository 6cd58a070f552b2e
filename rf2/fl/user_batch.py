"""Several users per Flower message: the wire format on both sides.

Every user is still one client: trained on its own from the same global model, with its
own seed, and replying its own arrays and metrics, which the server unpacks into one
reply Message per user before screening and aggregation. Only the transport is shared:
each Flower message (and so each Ray task) carries a batch of users, because Flower's
simulation engine costs ~10 ms of driver, raylet and actor CPU per message on this
machine, which at one user per message is several times the user's own training
(benchmarks/sim_overhead.py).

Instruction (server -> client): the strategy's ``arrays`` and ``config`` records (the
round's ``RoundRecipe``), plus one record per user under ``user/<i>`` holding its
``UserTask`` (both encoded by ``rf2.fl.user_task``), and ``num-users`` in ``config``.

Reply (client -> server): per user ``i``, either ``arrays/<i>`` + ``metrics/<i>``
(+ ``rf2/<i>``) or ``error/<i>`` with the exception's reason. A client that raises
outside a user's training (or a whole batch that times out) fails all its users.
Users in the message's partial sum (``rf2.fl.partial_sum``) reply ``metrics/<i>`` only;
the sum travels once as ``sum/arrays`` with ``sum/users`` (their positions, the weight
sum), and each of their unpacked replies carries it as ``sum`` / ``sum-users``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from rf2.fl.params import numpy_to_record
from rf2.fl.records import number_in, record_of
from rf2.fl.user_task import RoundRecipe, UserTask, read_recipe, read_task, task_record

USER_KEY = "user/{}"
NUM_USERS = "num-users"  # in the shared config
REPLY_KEYS = ("arrays", "metrics", "rf2")
ERROR_KEY = "error/{}"
SUM_ARRAYS, SUM_USERS = "sum/arrays", "sum/users"  # in a batch reply
SUM, SUM_META = "sum", "sum-users"  # in each summed user's unpacked reply


def batch_instruction(msg: Message, users: Sequence[int], tasks: Mapping[int, UserTask]) -> Message:
    """A copy of the strategy's instruction ``msg`` addressed to ``users`` (a user with
    no entry in ``tasks`` gets the default task: no override)."""
    content = msg.content
    records: dict[str, Any] = {k: v for k, v in content.items() if k != "config"}
    config = ConfigRecord(dict(record_of(content, "config", ConfigRecord)))
    config[NUM_USERS] = len(users)
    records["config"] = config
    for i, user in enumerate(users):
        records[USER_KEY.format(i)] = task_record(tasks.get(user) or UserTask(user=int(user)))
    return Message(
        RecordDict(records),
        msg.metadata.dst_node_id,
        msg.metadata.message_type,
        group_id=msg.metadata.group_id or str(read_recipe(config).server_round),
    )


def user_tasks(msg: Message) -> tuple[RoundRecipe, list[UserTask]]:
    """Client side: the message's shared recipe and each user's task, in batch order."""
    config = record_of(msg.content, "config", ConfigRecord)
    n = int(number_in(msg.content, "config", NUM_USERS)) if NUM_USERS in config else 0
    return read_recipe(config), [read_task(msg.content[USER_KEY.format(i)]) for i in range(n)]


def error_reason(ex: BaseException) -> str:
    """Flower's own wording for a raising ClientApp."""
    return f"{type(ex)}:<'{ex}'>"


def pack_results(results: Sequence[dict[str, Any] | BaseException]) -> RecordDict:
    """Client side: each user's reply records (or the exception it raised) in one RecordDict."""
    records: dict[str, Any] = {}
    for i, result in enumerate(results):
        if isinstance(result, BaseException):
            records[ERROR_KEY.format(i)] = ConfigRecord({"reason": error_reason(result)})
            continue
        for key, record in result.items():
            records[f"{key}/{i}"] = record
    return RecordDict(records)


def pack_sum(content: RecordDict, arrays: Mapping[str, Any], positions: Sequence[int],
             weight: float) -> None:
    """Client side: add a partial sum of the users at ``positions`` to a batch reply."""
    content[SUM_ARRAYS] = numpy_to_record(dict(arrays))
    content[SUM_USERS] = ConfigRecord({"positions": [int(p) for p in positions],
                                       "weight": float(weight)})


def unpack_reply(reply: Message, num_users: int) -> list[Message]:
    """Server side: one reply Message per user of the batch, in batch order.

    Each carries the batch reply's metadata (so Flower's reply checks hold), and either
    the user's own records under their usual names or the user's error.
    """
    if reply.has_error():
        return [_reply_like(reply, error=reply.error) for _ in range(num_users)]
    content = reply.content
    summed = _summed_positions(content) if SUM_USERS in content else set()
    out = []
    for i in range(num_users):
        error_key = ERROR_KEY.format(i)
        if i in summed and f"metrics/{i}" in content:
            records = {"metrics": content[f"metrics/{i}"], SUM: content[SUM_ARRAYS],
                       SUM_META: content[SUM_USERS]}
            out.append(_reply_like(reply, content=RecordDict(records)))
            continue
        if error_key in content:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                          reason=str(content[error_key]["reason"]))
            out.append(_reply_like(reply, error=error))
            continue
        records = {key: content[f"{key}/{i}"] for key in REPLY_KEYS if f"{key}/{i}" in content}
        if "arrays" not in records or "metrics" not in records:
            error = Error(code=ErrorCode.UNKNOWN, reason=f"reply has no records for user {i}")
            out.append(_reply_like(reply, error=error))
            continue
        out.append(_reply_like(reply, content=RecordDict(records)))
    return out


def _summed_positions(content: RecordDict) -> set[object]:
    positions = record_of(content, SUM_USERS, ConfigRecord)["positions"]
    if not isinstance(positions, list):
        raise TypeError(f"{SUM_USERS}['positions'] is {positions!r}, expected a list")
    return set(positions)


def _reply_like(reply: Message, content: RecordDict | None = None, error: Error | None = None
                ) -> Message:
    """A Message with ``content`` or ``error`` and a copy of ``reply``'s metadata."""
    # Message's implementation takes metadata= (Flower rebuilds its own messages so), but
    # none of its public overloads declares it.
    return Message(content=content, error=error, metadata=copy.copy(reply.metadata))  # type: ignore[call-overload]
