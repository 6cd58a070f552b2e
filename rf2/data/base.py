"""The in-memory form every loader produces: per-user click sequences, split in time.

Stored as CSR arrays (indptr + flat item ids) so 100k users pickle cheaply to Ray
workers and one user's slice is O(1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ratings:
    """Every rated (user, item) as one sample with a click label (RF²'s data protocol).

    Parallel arrays in the same user/item index space as the owning
    :class:`Interactions`; ``label`` = 1 where the rating is a click.
    """

    user: np.ndarray  # (R,) int64
    item: np.ndarray  # (R,) int64
    timestamp: np.ndarray  # (R,) int64
    label: np.ndarray  # (R,) int8 in {0, 1}


@dataclass(frozen=True)
class Interactions:
    """Raw implicit clicks after thresholding, with contiguous 0-based ids.

    ``user``, ``item``, ``timestamp`` are parallel arrays, one entry per click.
    ``ratings`` (loaders that read explicit ratings fill it) holds *every* rating as a
    labelled sample; then users are indexed over everyone who rated, so a user may have
    no click at all (``dataset.protocol=clicks`` drops such users again, see
    :func:`rf2.data.protocol.apply_protocol`). ``user_ids`` are the dataset's own user
    ids per index (None = the index itself).
    """

    user: np.ndarray  # (N,) int64 in [0, num_users)
    item: np.ndarray  # (N,) int64 in [0, num_items)
    timestamp: np.ndarray  # (N,) int64, used only for ordering
    num_users: int
    num_items: int
    item_genres: np.ndarray | None = None  # (num_items, G) float32 multi-hot
    genre_names: tuple[str, ...] = ()
    ratings: Ratings | None = None
    # (num_users,) the dataset's own user ids: int64, or str where the ids are tokens
    # that are not all integers (RecBole); None = the index is the id (synthetic).
    user_ids: np.ndarray | None = None


@dataclass(frozen=True)
class RatedSplit:
    """RF²'s samples per user: every rating, labelled, split in time like the clicks.

    CSR like the click arrays of :class:`FederatedDataset` (same users). Metrics such as
    ``rated_auc`` and RF²'s tierings read it; the retrieval model still trains on clicks.
    """

    train_indptr: np.ndarray  # (num_users + 1,) int64
    train_items: np.ndarray  # (num_train_samples,) int64
    train_labels: np.ndarray  # (num_train_samples,) int8
    test_indptr: np.ndarray  # (num_users + 1,) int64
    test_items: np.ndarray  # (num_test_samples,) int64
    test_labels: np.ndarray  # (num_test_samples,) int8

    @property
    def train_counts(self) -> np.ndarray:  # (num_users,) training samples per user
        return np.diff(self.train_indptr)

    @property
    def test_counts(self) -> np.ndarray:  # (num_users,)
        return np.diff(self.test_indptr)


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
    report: Mapping[str, object] | None = None
    rated: RatedSplit | None = None  # dataset.protocol=rf2 only
    # (num_users,) raw dataset ids (int64, or str tokens); None = the index is the id
    user_ids: np.ndarray | None = None

    def raw_user_ids(self) -> np.ndarray:
        """(num_users,) the dataset's own user ids (the index where it has none).

        int64 for numeric ids; str for RecBole token ids that are not all integers.
        """
        if self.user_ids is None:
            return np.arange(self.num_users, dtype=np.int64)
        ids = np.asarray(self.user_ids)
        return ids.astype(np.int64) if ids.dtype.kind in "iu" else ids

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

    def fingerprint(self) -> dict[str, Any]:
        """Sizes and a SHA-256 of the split: a resumed run checks it has the same data."""
        h = hashlib.sha256()
        for arr in (self.train_indptr, self.train_items, self.test_indptr, self.test_items):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return {"num_users": int(self.num_users), "num_items": int(self.num_items),
                "train_clicks": int(len(self.train_items)),
                "test_clicks": int(len(self.test_items)), "sha256": h.hexdigest()}
