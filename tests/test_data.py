"""Dataset layer: loaders on tiny hand-written fixtures, the split rule, errors, synthetic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.core.config import DatasetConfig
from rf2.core.errors import DataError
from rf2.data import (
    Interactions,
    generate_synthetic,
    load_dataset,
    load_interactions,
    n_train_for,
    split_interactions,
)
from rf2.data.split import sliding_histories
from rf2.model.examples import eval_histories

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def _ml(name: str, path: Path, threshold: float = 5.0) -> DatasetConfig:
    return DatasetConfig(name=name, path=str(path), click_threshold=threshold)  # type: ignore[arg-type]


# --- split rule -------------------------------------------------------------------------


def test_split_rule_counts() -> None:
    assert n_train_for([0, 1, 2, 10, 11], 0.9).tolist() == [0, 1, 1, 9, 9]
    assert n_train_for([3, 4, 100], 0.5).tolist() == [1, 2, 50]
    # 0.29 * 100 = 28.999999999999996 in floating point; the rule means 29.
    assert n_train_for(100, 0.29).tolist() == 29
    # the clamp: tiny fractions still train on 1, large ones still test on 1
    assert n_train_for([2, 5], 0.01).tolist() == [1, 1]
    assert n_train_for([2, 5], 0.99).tolist() == [1, 4]


def _toy() -> Interactions:
    # user 0: ties at t=20 keep file order (item 5 before item 4)
    # user 1: one click -> train only; user 2: two clicks -> 1 + 1
    return Interactions(
        user=np.array([0, 1, 0, 2, 0, 0, 2]),
        item=np.array([5, 9, 3, 1, 4, 7, 2]),
        timestamp=np.array([20, 1, 10, 8, 20, 5, 3]),
        num_users=3,
        num_items=10,
    )


def test_split_orders_by_time_with_stable_ties() -> None:
    ds = split_interactions(_toy(), "toy", train_fraction=0.9, history_len=2)
    assert ds.train_of(0).tolist() == [7, 3, 5]  # floor(0.9 * 4) = 3 train
    assert ds.test_of(0).tolist() == [4]
    assert ds.train_of(1).tolist() == [9] and ds.test_of(1).tolist() == []
    assert ds.train_of(2).tolist() == [2] and ds.test_of(2).tolist() == [1]
    assert ds.train_indptr.tolist() == [0, 3, 4, 5]
    assert ds.test_indptr.tolist() == [0, 1, 1, 2]


def _split_oracle(inter: Interactions, frac: float) -> list[tuple[list[int], list[int]]]:
    """Plain per-user reference of the split rule."""
    out = []
    for u in range(inter.num_users):
        clicks = [(t, pos, i) for pos, (uu, i, t) in
                  enumerate(zip(inter.user, inter.item, inter.timestamp, strict=True)) if uu == u]
        seq = [i for _, _, i in sorted(clicks)]
        k = len(seq) if len(seq) < 2 else min(max(int(frac * len(seq) + 1e-9), 1), len(seq) - 1)
        out.append((seq[:k], seq[k:]))
    return out


@settings(max_examples=40, deadline=None)
@given(
    clicks=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9), st.integers(0, 3)),
                    min_size=1, max_size=40),
    frac=st.floats(0.05, 0.95),
)
def test_split_matches_reference(clicks: list[tuple[int, int, int]], frac: float) -> None:
    users = sorted({u for u, _, _ in clicks})
    remap = {u: j for j, u in enumerate(users)}  # contiguous, as the loaders guarantee
    inter = Interactions(
        user=np.array([remap[u] for u, _, _ in clicks]), item=np.array([i for _, i, _ in clicks]),
        timestamp=np.array([t for _, _, t in clicks]), num_users=len(users), num_items=10,
    )
    ds = split_interactions(inter, "h", frac, history_len=3)
    for u, (train, test) in enumerate(_split_oracle(inter, frac)):
        assert ds.train_of(u).tolist() == train and ds.test_of(u).tolist() == test


def test_split_rejects_users_without_clicks() -> None:
    toy = _toy()
    inter = Interactions(toy.user, toy.item, toy.timestamp, num_users=4, num_items=10)
    with pytest.raises(ValueError, match="without clicks"):
        split_interactions(inter, "toy", 0.9, 2)


def test_history_features() -> None:
    ds = split_interactions(_toy(), "toy", train_fraction=0.9, history_len=2)
    # the last history_len train clicks, left-padded: only clicks before the split point
    assert eval_histories(ds, np.arange(3)).tolist() == [[3, 5], [-1, 9], [-1, 2]]
    # per train click, the clicks just before it, never crossing users (central mode)
    assert sliding_histories(ds.train_items, ds.train_indptr, 2, pad=99).tolist() == [
        [99, 99], [99, 7], [7, 3], [99, 99], [99, 99]
    ]


# --- MovieLens-100K format --------------------------------------------------------------

GENRES = ["unknown", "Action", "Adventure"] + [f"G{j}" for j in range(16)]


def _u_item_line(item: int, genre: int) -> str:
    flags = ["0"] * 19
    flags[genre] = "1"
    return f"{item}|Film {item} (1995)|01-Jan-1995||http://x|" + "|".join(flags)


def _ml100k(tmp: Path, data: str) -> Path:
    root = tmp / "ml-100k"
    _write(root / "u.data", data)
    # Item 4 is never rated and item 3 never clicked: both stay in the catalogue.
    items = "\n".join(_u_item_line(i, g) for i, g in [(1, 1), (2, 2), (3, 0), (4, 5)])
    _write(root / "u.item", items + "\n", encoding="latin-1")
    _write(root / "u.genre", "".join(f"{g}|{j}\n" for j, g in enumerate(GENRES)) + "\n")
    return root


ML100K_DATA = (
    "10\t1\t5\t100\n"
    "10\t2\t5\t50\n"
    "20\t2\t5\t7\n"
    "10\t3\t4\t10\n"
    "30\t1\t3\t1\n"  # user 30 never gives 5 stars -> dropped
)


def test_movielens100k_loader(tmp_path: Path) -> None:
    ds = load_dataset(_ml("movielens100k", _ml100k(tmp_path, ML100K_DATA)), seed=0)
    assert (ds.num_users, ds.num_items) == (2, 4)
    assert ds.train_of(0).tolist() == [1] and ds.test_of(0).tolist() == [0]  # by time
    assert ds.train_of(1).tolist() == [1] and ds.test_of(1).tolist() == []
    assert ds.genre_names[:3] == ("unknown", "Action", "Adventure") and ds.num_genres == 19
    assert ds.item_genres is not None and ds.item_genres.dtype == np.float32
    assert ds.item_genres.argmax(axis=1).tolist() == [1, 2, 0, 5]


def test_click_threshold(tmp_path: Path) -> None:
    ds = load_dataset(_ml("movielens100k", _ml100k(tmp_path, ML100K_DATA), 4.0), seed=0)
    assert ds.num_users == 2
    assert ds.train_of(0).tolist() == [2, 1] and ds.test_of(0).tolist() == [0]
    ds = load_dataset(_ml("movielens100k", _ml100k(tmp_path, ML100K_DATA), 1.0), seed=0)
    assert ds.num_users == 3 and ds.train_items.size + ds.test_items.size == 5


def test_movielens1m_loader(tmp_path: Path) -> None:
    root = tmp_path / "ml-1m"
    _write(root / "ratings.dat", "1::10::5::30\n1::1::5::20\n2::5::5::1\n2::1::2::2\n")
    _write(root / "movies.dat", "1::Toy Story (1995)::Animation|Comedy\n"
           "5::Heat: The Movie (1995)::Action\n10::Jumanji (1995)::Comedy\n"
           "7::Never Rated (1995)::Drama\n", encoding="latin-1")
    ds = load_dataset(_ml("movielens1m", root), seed=0)
    assert (ds.num_users, ds.num_items) == (2, 4)  # catalogue ids 1, 5, 7, 10 -> 0..3
    assert ds.train_of(0).tolist() == [0] and ds.test_of(0).tolist() == [3]
    assert ds.train_of(1).tolist() == [1]
    assert ds.genre_names == ("Action", "Animation", "Comedy", "Drama")
    assert ds.item_genres is not None
    assert ds.item_genres.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    (root / "movies.dat").unlink()  # optional: without it, the catalogue is the rated items
    ds = load_dataset(_ml("movielens1m", root), seed=0)
    assert ds.num_items == 3 and ds.item_genres is None and ds.genre_names == ()


def test_movielens20m_loader(tmp_path: Path) -> None:
    root = tmp_path / "ml-20m"
    _write(root / "ratings.csv", "userId,movieId,rating,timestamp\n"
           "1,2,5.0,30\n1,3,4.5,10\n1,1,5.0,20\n7,3,5.0,5\n7,2,0.5,6\n")
    _write(root / "movies.csv", 'movieId,title,genres\n1,"Heat, The (1995)",Action|Crime\n'
           '2,Toy Story (1995),Comedy\n3,Untitled,(no genres listed)\n')
    ds = load_dataset(_ml("movielens20m", root), seed=0)
    assert (ds.num_users, ds.num_items) == (2, 3)
    assert ds.train_of(0).tolist() == [0] and ds.test_of(0).tolist() == [1]
    assert ds.train_of(1).tolist() == [2]
    assert ds.genre_names == ("Action", "Comedy", "Crime")
    assert ds.item_genres is not None and ds.item_genres.sum(axis=1).tolist() == [2, 1, 0]
    ds = load_dataset(_ml("movielens20m", root, 4.5), seed=0)
    assert ds.train_of(0).tolist() == [2, 0] and ds.test_of(0).tolist() == [1]


def test_lightgcn_loader_keeps_given_split(tmp_path: Path) -> None:
    root = tmp_path / "gowalla"
    _write(root / "train.txt", "0 5 3 4\n1\n2 0 1\n")  # user 1 has no clicks: dropped
    _write(root / "test.txt", "0 7\n2 \n")
    cfg = DatasetConfig(name="lightgcn", path=str(root), history_len=2)
    ds = load_dataset(cfg, seed=0)
    assert (ds.num_users, ds.num_items) == (2, 8)
    assert ds.train_of(0).tolist() == [5, 3, 4] and ds.test_of(0).tolist() == [7]
    assert ds.train_of(1).tolist() == [0, 1] and ds.test_of(1).tolist() == []
    assert eval_histories(ds, np.arange(2)).tolist() == [[3, 4], [0, 1]]


# --- errors -----------------------------------------------------------------------------


def _error(cfg: DatasetConfig) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(cfg, seed=0)
    return str(info.value)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    assert "does not exist" in _error(_ml("movielens100k", tmp_path / "nope"))
    afile = _write(tmp_path / "afile", "x")
    assert "is not a directory" in _error(_ml("movielens100k", afile))
    assert "required file u.data is missing" in _error(_ml("movielens100k", tmp_path))
    _write(tmp_path / "u.data", ML100K_DATA)
    assert "required file u.item is missing" in _error(_ml("movielens100k", tmp_path))
    assert "ratings.dat" in _error(_ml("movielens1m", tmp_path))
    assert "ratings.csv" in _error(_ml("movielens20m", tmp_path))
    assert "train.txt" in _error(DatasetConfig(name="lightgcn", path=str(tmp_path)))


@pytest.mark.parametrize(
    ("data", "where", "problem"),
    [
        ("1\t1\t5\t1\n2\t1\t5\t2\n3\t1\t5\n", "u.data:3", "expected 4 fields"),
        ("1\t1\t5\t1\n\n2\tx\t5\t2\n", "u.data:3", "field item is 'x', not an integer"),
        ("1\t1\t5\t1\n1\t2\t5\t2\t9\n", "u.data:2", "found 5"),
        ("1,1,5,1\n", "u.data:1", "separator looks wrong: fields seem separated by ','"),
        ("1\t1\t5\t1\n\n1\t2\t6\t2\n", "u.data:3", "rating 6 out of range [1, 5]"),
        ("1\t9\t5\t1\n", "u.data:1", "item id 9 is not listed in u.item"),
        ("0\t1\t5\t1\n", "u.data:1", "user id 0 must be >= 1"),
        ("1\t1\t4\t1\n", "u.data", "no ratings >= 5.0 in u.data"),
        ("", "u.data", "holds no ratings"),
    ],
)
def test_bad_u_data(tmp_path: Path, data: str, where: str, problem: str) -> None:
    message = _error(_ml("movielens100k", _ml100k(tmp_path, data)))
    assert where in message and problem in message, message


def test_compressed_files_are_named_as_such(tmp_path: Path) -> None:
    import bz2
    import gzip

    root = _ml100k(tmp_path, ML100K_DATA)
    plain = (root / "u.data").read_bytes()
    (root / "u.data").write_bytes(gzip.compress(plain))
    message = _error(_ml("movielens100k", root))
    assert "u.data: is a gzip-compressed file" in message and "gunzip -k u.data" in message
    (root / "u.data").write_bytes(bz2.compress(plain))
    assert "is a bzip2-compressed file" in _error(_ml("movielens100k", root))
    (root / "u.data").unlink()
    (root / "u.data.gz").write_bytes(gzip.compress(plain))
    message = _error(_ml("movielens100k", root))
    assert "u.data is missing" in message and "found u.data.gz: decompress it" in message
    _write(tmp_path / "lg" / "train.txt", "0 1 2\n")
    (tmp_path / "lg" / "test.txt").write_bytes(gzip.compress(b"0 3\n"))
    message = _error(DatasetConfig(name="lightgcn", path=str(tmp_path / "lg")))
    assert "test.txt: is a gzip-compressed file" in message


def test_split_keeps_raw_user_ids() -> None:
    inter = Interactions(user=np.array([0, 1, 1]), item=np.array([1, 2, 3]),
                         timestamp=np.array([1, 2, 3]), num_users=2, num_items=5,
                         user_ids=np.array([10, 30]))
    ds = split_interactions(inter, "toy", 0.9, 2)
    assert ds.raw_user_ids().tolist() == [10, 30]
    assert split_interactions(_toy(), "toy", 0.9, 2).raw_user_ids().tolist() == [0, 1, 2]


def test_lightgcn_keeps_the_files_user_ids(tmp_path: Path) -> None:
    _write(tmp_path / "train.txt", "3 1 2\n5\n8 4\n")
    _write(tmp_path / "test.txt", "3 4\n")
    ds = load_dataset(DatasetConfig(name="lightgcn", path=str(tmp_path)), seed=0)
    assert ds.raw_user_ids().tolist() == [3, 8]  # user 5 has no training item: dropped


def test_bad_u_item(tmp_path: Path) -> None:
    root = _ml100k(tmp_path, ML100K_DATA)
    _write(root / "u.item", _u_item_line(1, 1) + "\n2|Short|0|1\n")
    message = _error(_ml("movielens100k", root))
    assert "u.item:2" in message and "genre flags" in message


def test_bad_movielens1m_and_20m(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "1::1::5::3\n1\t2\t5\t4\n")
    message = _error(_ml("movielens1m", tmp_path))
    assert "ratings.dat:2" in message and "separator looks wrong" in message
    _write(tmp_path / "ratings.csv", "user,movie,rating,ts\n1,1,5.0,1\n")
    message = _error(_ml("movielens20m", tmp_path))
    assert "ratings.csv:1" in message and "header" in message
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,5.0,1\n1,2,5.5,1\n")
    assert "ratings.csv:3: rating 5.5 out of range" in _error(_ml("movielens20m", tmp_path))


def test_bad_lightgcn(tmp_path: Path) -> None:
    cfg = DatasetConfig(name="lightgcn", path=str(tmp_path))
    _write(tmp_path / "train.txt", "0 1 2\n1 3\n")
    _write(tmp_path / "test.txt", "0 4\n5 6\n")
    assert "test.txt:2: user 5 has test items but no training items" in _error(cfg)
    _write(tmp_path / "train.txt", "0 1 2\n1,3\n")
    assert "train.txt:2: the separator looks wrong" in _error(cfg)
    _write(tmp_path / "train.txt", "0 1 2\n0 3\n")
    assert "train.txt:2: user 0 listed twice" in _error(cfg)


# --- synthetic --------------------------------------------------------------------------


def test_synthetic_is_deterministic() -> None:
    cfg = DatasetConfig(num_users=300, num_items=200)
    a, b = load_dataset(cfg, seed=7), load_dataset(cfg, seed=7)
    c = load_dataset(cfg, seed=8)
    for field in ("train_indptr", "train_items", "test_indptr", "test_items", "item_genres"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.array_equal(a.train_items, c.train_items)


def test_synthetic_structure() -> None:
    cfg = DatasetConfig(num_users=1000, num_items=1000, num_groups=20, num_genres=18)
    world = generate_synthetic(cfg, seed=123)
    inter = world.interactions
    assert (inter.num_users, inter.num_items) == (1000, 1000)
    assert inter.item_genres is not None and inter.item_genres.shape == (1000, 18)
    assert inter.item_genres.sum(axis=1).min() >= 1
    per_user = np.bincount(inter.user, minlength=1000)  # (U,)
    assert per_user.min() >= 2 and abs(per_user.mean() - 25.0) < 2.5
    assert per_user.max() > 5 * per_user.mean()  # long-tailed activity
    assert np.unique(inter.user * 1000 + inter.item).size == inter.user.size  # no repeats
    order = np.lexsort((inter.timestamp, inter.user))
    assert np.array_equal(order, np.arange(inter.user.size))  # time increases per user
    clicks = np.sort(np.bincount(inter.item, minlength=1000))[::-1]
    assert clicks[:100].sum() / clicks.sum() > 0.3  # top 10% of items: > 30% of clicks
    own = world.item_cluster[inter.item] == world.user_group[inter.user]
    assert own.mean() > 0.3  # vs 1/20 = 0.05 without taste groups
    ds = load_dataset(cfg, seed=123)
    assert ds.test_counts.sum() > 0 and (ds.test_counts > 0).all()
    test_user = np.repeat(np.arange(1000), ds.test_counts)
    in_test = world.item_cluster[ds.test_items] == world.user_group[test_user]
    assert in_test.mean() > 0.25  # drift is mild: history still predicts the test period
    # genres follow the clusters: the commonest genre of a cluster covers most of it
    top_share = [inter.item_genres[world.item_cluster == c].mean(axis=0).max() for c in range(20)]
    assert np.mean(top_share) > 0.6


@pytest.mark.parametrize("groups", [1, 10])
def test_synthetic_edge_sizes(groups: int) -> None:
    cfg = DatasetConfig(num_users=50, num_items=10, num_groups=groups,
                        mean_clicks_per_user=8.0, num_genres=0)
    inter = load_interactions(cfg, seed=1)
    per_user = np.bincount(inter.user, minlength=50)
    assert per_user.min() >= 2 and per_user.max() <= 5  # at most num_items // 2
    assert np.unique(inter.user * 10 + inter.item).size == inter.user.size
    assert inter.item_genres is None and inter.genre_names == ()
    ds = load_dataset(cfg, seed=1)
    assert ds.num_users == 50 and (ds.test_counts >= 1).all()


# --- the real MovieLens-100K, when shared/ is next to the checkout ------------------------


def test_real_movielens100k() -> None:
    root = Path(os.environ.get("RF2_ML100K") or REPO.parent / "shared" / "data" / "ml-100k")
    if not (root / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {root} (set RF2_ML100K)")
    every = load_interactions(_ml("movielens100k", root, threshold=1.0), seed=0)
    assert (every.user.size, every.num_users, every.num_items) == (100_000, 943, 1682)
    ds = load_dataset(_ml("movielens100k", root), seed=0)
    assert (ds.num_users, ds.num_items, ds.num_genres) == (928, 1682, 19)
    assert ds.train_items.size + ds.test_items.size == 21_201
    assert (ds.train_items.size, ds.test_items.size) == (18_665, 2_536)
    # raw MovieLens user ids, not indices: the 928 users with a 5-star rating in u.data
    raw = np.loadtxt(root / "u.data", dtype=np.int64)  # (100000, 4) user item rating time
    assert ds.raw_user_ids().tolist() == np.unique(raw[raw[:, 2] == 5, 0]).tolist()
    assert every.user_ids.tolist() == list(range(1, 944))
