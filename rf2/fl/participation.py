"""Per-user participation counts over a run: how often each user was selected, and how
often its training reached aggregation. Their Gini coefficients (overall, per tier) go
in every round's row (``dist/selections/gini``, ``dist/trainings/gini``;
:func:`rf2.eval.distribution.participation_row`) and the counts in checkpoints, so a
resumed run logs what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rf2.eval.distribution import participation_row


class Participation:
    def __init__(self, num_users: int) -> None:
        self.selected = np.zeros(num_users, dtype=np.int64)  # (U,)
        self.trained = np.zeros(num_users, dtype=np.int64)  # (U,)

    def record(self, selected: Sequence[int] | np.ndarray, trained: Sequence[int] | np.ndarray
               ) -> None:
        """One round: its selected users and those whose replies were aggregated."""
        np.add.at(self.selected, np.asarray(selected, dtype=np.int64), 1)
        np.add.at(self.trained, np.asarray(trained, dtype=np.int64), 1)

    def row(self, tier_of_user: np.ndarray | None, tier_names: Sequence[str]) -> dict[str, float]:
        return participation_row(self.selected, self.trained, tier_of_user, tier_names)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"selected": self.selected, "trained": self.trained}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """Counts from a checkpoint (``arrays``); a checkpoint without them keeps zeros."""
        for name in ("selected", "trained"):
            if name in arrays:
                value = np.asarray(arrays[name], dtype=np.int64)
                if value.shape != getattr(self, name).shape:
                    raise ValueError(f"participation/{name} in the checkpoint has "
                                     f"{value.size} users, the run has {self.selected.size}")
                setattr(self, name, value.copy())
