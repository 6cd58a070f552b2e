"""The LightGCN benchmark split (Gowalla, Yelp2018, Amazon-Book): ``train.txt``/``test.txt``.

Each line is ``user item item ...`` (space-separated, 0-based ints; the list may be
empty). There are no ratings and no timestamps: every listed item is a click and the
published split is used as-is, so results compare with the HILL/LightGCN tables
(Recall@20, NDCG@20). ``click_threshold`` and ``train_fraction`` do not apply. Train
order is the order listed, which is what the history features see.

Users without training clicks cannot be clients; they are dropped and the remaining
ids re-indexed contiguously (sorted by original id). A user with test clicks but no
training clicks is an error: the split would be unusable for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rf2.core.errors import DataError
from rf2.data.base import FederatedDataset
from rf2.data.movielens import require_dir, require_file

_WRONG_SEPARATORS = (",", ";", "|", "::", ":")


def _bad_token_problem(line: str, token: str) -> str:
    for sep in _WRONG_SEPARATORS:
        if sep in line:
            return (f"the separator looks wrong: found {sep!r} but fields must be "
                    "separated by spaces ('user item item ...')")
    return f"{token!r} is not a non-negative integer (expected 'user item item ...')"


def read_user_lists(path: Path) -> dict[int, tuple[np.ndarray, int]]:
    """``{user: (items (n,) int64 in listed order, line number)}`` from one split file."""
    out: dict[int, tuple[np.ndarray, int]] = {}
    with open(path, encoding="latin-1") as f:
        for lineno, raw in enumerate(f, start=1):
            parts = raw.split()
            if not parts:
                continue
            bad = next((p for p in parts if not p.isdigit()), None)
            if bad is not None:
                raise DataError(str(path), _bad_token_problem(raw.strip(), bad), lineno)
            user = int(parts[0])
            if user in out:
                raise DataError(str(path), f"user {user} listed twice (first on line "
                                f"{out[user][1]})", lineno)
            items = np.fromiter(map(int, parts[1:]), dtype=np.int64, count=len(parts) - 1)
            out[user] = (items, lineno)
    return out


def load_lightgcn(path: str | None, history_len: int, name: str = "lightgcn") -> FederatedDataset:
    """Load ``train.txt`` + ``test.txt`` into a FederatedDataset, keeping their split."""
    root = require_dir(path, "lightgcn", "train.txt and test.txt")
    train_f, test_f = (require_file(root, n, "lightgcn") for n in ("train.txt", "test.txt"))
    train, test = read_user_lists(train_f), read_user_lists(test_f)
    for user, (items, lineno) in test.items():
        if items.size and (user not in train or train[user][0].size == 0):
            raise DataError(str(test_f), f"user {user} has test items but no training items "
                            f"in {train_f.name}", lineno)
    users = sorted(u for u, (items, _) in train.items() if items.size)
    if not users:
        raise DataError(str(train_f), "no training interactions (every user list is empty)")
    empty = np.zeros(0, dtype=np.int64)
    train_lists = [train[u][0] for u in users]
    test_lists = [test[u][0] if u in test else empty for u in users]
    train_items = np.concatenate(train_lists)  # (num_train,)
    test_items = np.concatenate(test_lists)  # (num_test,)
    num_items = int(max(train_items.max(), test_items.max(initial=-1))) + 1
    return FederatedDataset(
        name=name,
        num_users=len(users),
        num_items=num_items,
        train_indptr=_indptr(train_lists),
        train_items=train_items,
        test_indptr=_indptr(test_lists),
        test_items=test_items,
        history_len=history_len,
        user_ids=np.asarray(users, dtype=np.int64),  # the file's ids, before re-indexing
    )


def _indptr(lists: list[np.ndarray]) -> np.ndarray:
    sizes = np.fromiter((a.size for a in lists), dtype=np.int64, count=len(lists))  # (U,)
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (U + 1,)
