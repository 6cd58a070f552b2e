"""The population build's fast paths equal the slow, obvious computations they replace."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.core.config import DatasetConfig
from rf2.data import generate_synthetic, load_dataset
from rf2.data import synthetic as synthetic_module
from rf2.data.sorting import first_of_each, lex_stable_argsort, stable_argsort
from rf2.data.split import time_order
from rf2.data.synthetic import skip_float32

ints = st.lists(st.integers(-50, 50), min_size=0, max_size=300)


@settings(max_examples=60, deadline=None)
@given(ints)
def test_stable_argsort_is_numpys_stable_argsort(values: list[int]) -> None:
    keys = np.array(values, dtype=np.int64)
    assert np.array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


def test_stable_argsort_falls_back_when_keys_do_not_pack() -> None:
    keys = np.array([2**62, -(2**62), 5, 5, 0], dtype=np.int64)  # span * n overflows int64
    assert np.array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-3, 3), st.integers(0, 1)),
                min_size=1, max_size=200))
def test_lex_stable_argsort_is_lexsort(rows: list[tuple[int, int, int]]) -> None:
    a, b, c = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    assert np.array_equal(lex_stable_argsort(c, b, a), np.lexsort((c, b, a)))


@settings(max_examples=60, deadline=None)
@given(ints)
def test_first_of_each_marks_first_occurrences(values: list[int]) -> None:
    keys = np.array(values, dtype=np.int64)
    expected = np.zeros(keys.size, dtype=bool)
    if keys.size:
        expected[np.unique(keys, return_index=True)[1]] = True
    assert np.array_equal(first_of_each(keys), expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=1, max_size=100))
def test_time_order_fast_path_equals_the_sort(rows: list[tuple[int, int]]) -> None:
    user, ts = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    expected = np.lexsort((ts, user))
    assert np.array_equal(time_order(user, ts), expected)
    o = np.lexsort((np.arange(user.size), ts, user))  # already in order: identity
    assert np.array_equal(time_order(user[o], ts[o]), np.arange(user.size))


@pytest.mark.parametrize("drawn_before", [0, 1, 2, 3])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 10, 4_001])
def test_skip_float32_advances_like_drawing(drawn_before: int, count: int) -> None:
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    a.random(drawn_before, dtype=np.float32)
    b.random(drawn_before, dtype=np.float32)  # odd counts leave half a word buffered
    a.random(count, dtype=np.float32)
    skip_float32(b, count)
    assert np.array_equal(a.random(7, dtype=np.float32), b.random(7, dtype=np.float32))
    assert np.array_equal(a.random(3), b.random(3))


def _per_user(items: np.ndarray, user: np.ndarray, n: int) -> list[list[int]]:
    ptr = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=n))])
    return [items[ptr[u]:ptr[u + 1]].tolist() for u in range(n)]


def test_synthetic_finish_changes_only_the_users_it_finishes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Users short after two rounds are finished on their own stream; nothing else moves.

    With no with-replacement finishing rounds every short user goes to the exact dense
    fill instead: same timestamps, genres and click counts, and every user that needed
    no finishing has the same clicks either way.
    """
    cfg = DatasetConfig(num_users=400, num_items=60, num_groups=4, mean_clicks_per_user=20)
    fast = generate_synthetic(cfg, seed=3).interactions
    monkeypatch.setattr(synthetic_module, "_FILL_ROUNDS", 0)
    dense = generate_synthetic(cfg, seed=3).interactions
    assert np.array_equal(fast.timestamp, dense.timestamp)
    assert np.array_equal(fast.user, dense.user)  # same clicks per user
    assert np.array_equal(fast.item_genres, dense.item_genres)
    a, b = _per_user(fast.item, fast.user, 400), _per_user(dense.item, dense.user, 400)
    same = [x == y for x, y in zip(a, b, strict=True)]
    assert 0.3 < np.mean(same) < 1.0  # a small catalogue sends many users to the finish
    assert all(len(set(x)) == len(x) for x in a)  # still no repeated item per user
    counts = np.bincount(fast.user, minlength=400)
    assert counts[~np.array(same)].mean() > counts[np.array(same)].mean()  # the heavy ones


def test_synthetic_finished_users_keep_their_taste() -> None:
    """Where many users are finished, clicks still follow taste groups and popularity."""
    cfg = DatasetConfig(num_users=2000, num_items=200, num_groups=10, mean_clicks_per_user=40)
    world = generate_synthetic(cfg, seed=11)
    inter = world.interactions
    per_user = np.bincount(inter.user, minlength=2000)
    assert per_user.max() <= 100  # num_items // 2
    assert np.unique(inter.user * 200 + inter.item).size == inter.user.size  # no repeats
    own = world.item_cluster[inter.item] == world.user_group[inter.user]
    assert own.mean() > 0.25  # vs 1/10 without taste groups
    heavy = per_user[inter.user] >= 60  # users that nearly exhaust their cluster's items
    assert own[heavy].mean() > 0.15
    clicks = np.sort(np.bincount(inter.item, minlength=200))[::-1]
    assert clicks[:20].sum() / clicks.sum() > 0.2  # popular items stay popular


def test_synthetic_exposures_only_for_the_rf2_protocol() -> None:
    cfg = DatasetConfig(num_users=100, num_items=80, num_groups=4)
    clicks = generate_synthetic(cfg, seed=2).interactions
    rf2 = generate_synthetic(DatasetConfig(**{**cfg.__dict__, "protocol": "rf2"}), 2).interactions
    assert clicks.ratings is None and rf2.ratings is not None
    assert np.array_equal(clicks.item, rf2.item) and np.array_equal(clicks.timestamp, rf2.timestamp)
    a = load_dataset(cfg, 2)
    assert a.rated is None and a.train_items.size > 0
