"""Reply screening: which client replies may be aggregated, and why the others may not.

A reply is dropped when the client raised (``client_error``), or when its arrays do not
look like the model this user was sent (wrong keys or shapes for its HeteroFL slice,
NaN/Inf, absurd norms: ``rf2.hetero.faults.screen_reply``). Users that never answered
are counted as ``timeout``. The counts become the row's ``fault/<reason>`` keys.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from rf2.fl.params import record_to_numpy
from rf2.fl.tier_settings import TierSettings
from rf2.hetero.faults import FAULT_REASONS, screen_reply
from rf2.optim import sparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsableReply:
    """A client reply that passed screening, with its arrays decoded once (a sparse
    reply's ``<name>.rows``/``<name>.values`` as they came: ``rf2.optim.sparse``)."""

    user: int
    message: Message
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Screened:
    """One round's replies after screening."""

    usable: list[UsableReply]  # in partition-id order
    faults: Counter[str]  # reason -> number of users

    def fault_row(self) -> dict[str, int]:
        """``fault/<reason>`` for every known reason (zeros included, stable columns)."""
        return {f"fault/{reason}": int(self.faults[reason]) for reason in FAULT_REASONS}


class ReplyScreen:
    """Checks each reply against what its user was sent (its tier's slice of w_t)."""

    def __init__(self, tiers: TierSettings) -> None:
        self.tiers = tiers

    def screen(
        self,
        replies: list[tuple[int, Message]],
        missing: list[int],
        global_arrays: dict[str, np.ndarray],
    ) -> Screened:
        faults: Counter[str] = Counter()
        faults["timeout"] += len(missing)
        usable = []
        for user, reply in sorted(replies, key=lambda p: p[0]):
            if reply.has_error():
                late = "DeadlineExceeded" in (reply.error.reason or "")
                faults["timeout" if late else "client_error"] += 1
                log.warning("client %d failed in round %s: %s", user,
                            reply.metadata.group_id or "?", reply.error.reason)
                continue
            reference = self.tiers.reference_arrays(user, global_arrays)
            arrays = record_to_numpy(reply.content["arrays"])
            screen_fn = sparse.screen if sparse.is_sparse(arrays) else screen_reply
            reason = screen_fn(arrays, reference)
            if reason is not None:
                faults[reason] += 1
                continue
            usable.append(UsableReply(user, reply, arrays))
        return Screened(usable, faults)
