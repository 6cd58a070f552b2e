"""The in-memory form every loader produces: per-user click sequences, split in time.

Stored as CSR arrays (indptr + flat item ids) so 100k users pickle cheaply to Ray
workers and one user's slice is O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interactions:
    """Raw implicit clicks after thresholding, with contiguous 0-based ids.

    ``user``, ``item``, ``timestamp`` are parallel arrays, one entry per click.
    """

    user: np.ndarray  # (N,) int64 in [0, num_users)
    item: np.ndarray  # (N,) int64 in [0, num_items)
    timestamp: np.ndarray  # (N,) int64, used only for ordering
    num_users: int
    num_items: int
    item_genres: np.ndarray | None = None  # (num_items, G) float32 multi-hot
    genre_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FederatedDataset:
    """One client per user. Train/test clicks per user, each in chronological order."""

    name: str
    num_users: int
    num_items: int
    train_indptr: np.ndarray  # (num_users + 1,) int64
    train_items: np.ndarray  # (num_train_clicks,) int64, per user in time order
    test_indptr: np.ndarray  # (num_users + 1,) int64
    test_items: np.ndarray  # (num_test_clicks,) int64
    history_len: int
    item_genres: np.ndarray | None = None  # (num_items, G) float32 multi-hot
    genre_names: tuple[str, ...] = ()
    # How train/test were made: "chronological" (per user by time), "random" (seeded
    # per-user order, for data without timestamps) or "given" (a published split).
    split: str = "chronological"
    # Loader's account of reading and filtering (rows read, users dropped, ...).
    report: dict[str, object] | None = None

    def train_of(self, user: int) -> np.ndarray:
        return self.train_items[self.train_indptr[user] : self.train_indptr[user + 1]]

    def test_of(self, user: int) -> np.ndarray:
        return self.test_items[self.test_indptr[user] : self.test_indptr[user + 1]]

    @property
    def train_counts(self) -> np.ndarray:  # (num_users,) clicks in train per user
        return np.diff(self.train_indptr)

    @property
    def test_counts(self) -> np.ndarray:  # (num_users,)
        return np.diff(self.test_indptr)

    @property
    def num_genres(self) -> int:
        return 0 if self.item_genres is None else int(self.item_genres.shape[1])

    def history_before_test(self, user: int) -> np.ndarray:
        """The last ``history_len`` train clicks: the user's features at test time."""
        return self.train_of(user)[-self.history_len :]

    def summary(self) -> dict[str, object]:
        """What a run folder records about the data (``data.json``): sizes and the split."""
        return {
            "name": self.name, "split": self.split,
            "users": self.num_users, "items": self.num_items,
            "train_interactions": int(self.train_items.size),
            "test_interactions": int(self.test_items.size),
            "users_with_test": int((self.test_counts > 0).sum()),
            "genres": self.num_genres,
            **({"loader": self.report} if self.report else {}),
        }

    def item_popularity(self) -> np.ndarray:
        """(num_items,) train click counts per item."""
        return np.bincount(self.train_items, minlength=self.num_items)
