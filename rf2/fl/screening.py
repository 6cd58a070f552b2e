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
from flwr.app import ArrayRecord, Message

from rf2.fl.params import record_to_numpy
from rf2.fl.records import number_in, record_of
from rf2.fl.tier_settings import TierSettings
from rf2.fl.user_batch import SUM, SUM_META
from rf2.hetero.faults import FAULT_REASONS, screen_reply
from rf2.optim import sparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartialSum:
    """One message's sum_k n_k Δ_k over its summed users (``rf2.fl.partial_sum``),
    decoded once: row tables as (rows, summed deltas), the rest whole."""

    update: sparse.SparseUpdate
    weight: float


@dataclass(frozen=True)
class UsableReply:
    """A client reply that passed screening, with its arrays decoded once (a sparse
    reply's ``<name>.rows``/``<name>.values`` as they came: ``rf2.optim.sparse``).
    A summed user has no arrays of its own: ``partial`` is its message's sum (the same
    object for every user of that sum)."""

    user: int
    message: Message
    arrays: dict[str, np.ndarray]
    partial: PartialSum | None = None


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
        # A sum is screened once (its users arrive as separate replies holding it).
        sums: dict[int, tuple[PartialSum | None, str | None]] = {}
        for user, reply in sorted(replies, key=lambda p: p[0]):
            if reply.has_error():
                late = "DeadlineExceeded" in (reply.error.reason or "")
                faults["timeout" if late else "client_error"] += 1
                log.warning("client %d failed in round %s: %s", user,
                            reply.metadata.group_id or "?", reply.error.reason)
                continue
            if SUM in reply.content:
                key = id(reply.content[SUM])
                if key not in sums:
                    sums[key] = _screen_sum(reply, global_arrays)
                partial, reason = sums[key]
                if partial is None:
                    faults[reason or "wrong_shape"] += 1
                    continue
                usable.append(UsableReply(user, reply, {}, partial))
                continue
            reference = self.tiers.reference_arrays(user, global_arrays)
            arrays = record_to_numpy(record_of(reply.content, "arrays", ArrayRecord))
            screen_fn = sparse.screen if sparse.is_sparse(arrays) else screen_reply
            reason = screen_fn(arrays, reference)
            if reason is not None:
                faults[reason] += 1
                continue
            usable.append(UsableReply(user, reply, arrays))
        return Screened(usable, faults)


def _screen_sum(reply: Message, global_arrays: dict[str, np.ndarray]
                ) -> tuple[PartialSum | None, str | None]:
    """A message's partial sum decoded, or None and the fault of all its users (shapes
    against w_t; NaN/Inf anywhere)."""
    arrays = record_to_numpy(record_of(reply.content, SUM, ArrayRecord))
    reason = sparse.screen(arrays, global_arrays)
    if reason is not None:
        return None, reason
    weight = float(number_in(reply.content, SUM_META, "weight"))
    return PartialSum(sparse.decode(arrays), weight), None
