"""rf2.core.arrays: the sort-based unique equals NumPy's on every shape it is given."""

from __future__ import annotations

import numpy as np
import pytest

from rf2.core.arrays import sorted_unique


@pytest.mark.parametrize("keys", [
    np.zeros(0, dtype=np.int64), np.array([5], dtype=np.int64),
    np.array([3, 3, 3], dtype=np.int64), np.array([-1, 7, -1, 0, 7, 2**40], dtype=np.int64),
    np.array([[4, 1], [1, 9]], dtype=np.int64),  # flattened, as np.unique does
    np.array([2, 1, 2], dtype=np.int32),
])
def test_sorted_unique_equals_np_unique(keys: np.ndarray) -> None:
    got, want = sorted_unique(keys), np.unique(keys)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def test_sorted_unique_on_random_ids() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 17, 300, 10_000):
        keys = rng.integers(0, max(2, size // 3), size=size)
        assert np.array_equal(sorted_unique(keys), np.unique(keys))
