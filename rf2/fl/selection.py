"""Seeded, availability-aware client selection that walks "global epochs" (RF²-style).

RF²'s server walks a reshuffled list of clients, so every client trains once per pass
before anyone trains twice. We keep that, select by partition id from our own seeded
generator (Flower's node sampling is not reproducible, flower issue 3328), and add
availability: an offline client met on the walk is skipped *and loses its turn in this
pass*, which is how low availability turns into under-participation of a tier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class ClientSelector:
    """Walk a seeded permutation of ``eligible`` user ids; reshuffle after each pass."""

    def __init__(self, eligible: np.ndarray, seed: int) -> None:
        self.eligible = np.unique(np.asarray(eligible, dtype=np.int64))  # (E,)
        self._rng = np.random.default_rng([int(seed), 31])
        self._perm = self._rng.permutation(self.eligible)  # (E,) current pass
        self._pos = 0
        self.epoch = 0  # completed passes ("global epochs")

    def _new_pass(self, defer: set[int]) -> None:
        """Reshuffle; ids already seen in the current round go last in the new pass.

        They were selected (or found offline, which cannot change within the round) in
        this round, so putting them last keeps "each client once per pass" without
        selecting anyone twice in one round.
        """
        perm = self._rng.permutation(self.eligible)
        if defer:
            late = np.isin(perm, np.fromiter(defer, dtype=np.int64, count=len(defer)))
            perm = np.concatenate([perm[~late], perm[late]])
        self._perm, self._pos = perm, 0
        self.epoch += 1

    @property
    def passes_completed(self) -> int:
        """Passes walked to their end so far (a pass that ended mid-round counts at once).

        ``epoch`` only advances when the next pass starts; a pass whose last client was
        selected in the latest round is complete already.
        """
        return int(self.epoch) + int(self._pos >= self._perm.size and self._perm.size > 0)

    def select(self, k: int, is_online: Callable[[np.ndarray], np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
        """Return (selected online ids (<= k,), offline ids met and skipped).

        ``is_online(ids) -> bool array`` must be a pure function of the ids for this
        round. Fewer than ``k`` come back only when every eligible client has been met
        once in this call (not enough online).
        """
        chosen: list[int] = []
        offline: list[int] = []
        seen: set[int] = set()
        if self.eligible.size == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        while len(chosen) < k:
            if self._pos >= self._perm.size:
                self._new_pass(seen)
            need = k - len(chosen)
            chunk = self._perm[self._pos:self._pos + max(2 * need, 16)]  # (m,)
            stop = np.flatnonzero(np.isin(chunk, list(seen))) if seen else np.zeros(0, int)
            if stop.size:  # back at ids met earlier in this call: all were tried once
                chunk = chunk[:stop[0]]
                if chunk.size == 0:
                    break
            online = np.asarray(is_online(chunk), dtype=bool)  # (m,)
            hits = np.cumsum(online)
            take = chunk.size if hits[-1] < need else int(np.searchsorted(hits, need)) + 1
            used, used_online = chunk[:take], online[:take]
            chosen.extend(used[used_online].tolist())
            offline.extend(used[~used_online].tolist())
            seen.update(used.tolist())
            self._pos += take
            if stop.size and take == chunk.size and len(chosen) < k:
                break
        return np.asarray(chosen, dtype=np.int64), np.asarray(offline, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: the current pass, the position in it, the generator."""
        return {
            "perm": self._perm.tolist(), "pos": int(self._pos), "epoch": int(self.epoch),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        perm = np.asarray(state["perm"], dtype=np.int64)
        if perm.size != self.eligible.size or not np.array_equal(np.sort(perm), self.eligible):
            raise ValueError("selector checkpoint was made for a different eligible set")
        self._perm, self._pos, self.epoch = perm, int(state["pos"]), int(state["epoch"])
        self._rng.bit_generator.state = state["rng"]
