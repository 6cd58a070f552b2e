"""RF²'s data protocol, its exact tierings, tier maps in and out (hand-built toys + ML-100K)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rf2.core.config import DatasetConfig, PopulationConfig
from rf2.core.errors import ConfigError, DataError
from rf2.data import load_dataset, split_rated
from rf2.data.base import FederatedDataset, Interactions, Ratings
from rf2.data.protocol import drop_unclicked
from rf2.hetero.devices import load_profile
from rf2.hetero.population import assign_tiers, population_summary
from rf2.hetero.rf2_tiers import MAX_REDRAWS, rf2_dirichlet, rf2_draws, rf2_random
from rf2.hetero.tier_file import read_tier_file, tier_csv_text


def _rated(rows: list[tuple[int, int, int, int]], num_users: int, num_items: int = 10,
           user_ids: list[int] | None = None) -> Interactions:
    """rows: (user, item, timestamp, label)."""
    u, i, t, y = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    click = y == 1
    return Interactions(u[click], i[click], t[click], num_users, num_items,
                        ratings=Ratings(u, i, t, y.astype(np.int8)),
                        user_ids=None if user_ids is None else np.array(user_ids))


# -- the protocol -------------------------------------------------------------------------
def test_rf2_split_ceil_rule_keeps_clickless_users_and_orders_ties() -> None:
    rows = [(0, k, 100 + k, int(k % 2 == 0)) for k in range(10)]  # 10 ratings -> 9 train
    rows += [(1, 3, 5, 0), (1, 4, 6, 0)]  # no click at all: stays a user
    # equal timestamps: non-click first, then item id (RF² sorts (time, click, item))
    rows += [(2, 7, 50, 1), (2, 2, 50, 0), (2, 1, 50, 1)]
    ds = split_rated(_rated(rows, 3), "toy", 0.9, 10)
    assert ds.num_users == 3
    assert ds.rated.train_counts.tolist() == [9, 2, 3]  # ceil(9.0), ceil(1.8), ceil(2.7)
    assert ds.rated.test_counts.tolist() == [1, 0, 0]
    assert ds.rated.test_items.tolist() == [9] and ds.rated.test_labels.tolist() == [0]
    assert ds.train_of(0).tolist() == [0, 2, 4, 6, 8] and ds.test_of(0).size == 0
    assert ds.train_of(1).size == 0  # kept, nothing to train on
    s, e = ds.rated.train_indptr[2], ds.rated.train_indptr[3]
    assert ds.rated.train_items[s:e].tolist() == [2, 1, 7]
    assert ds.rated.train_labels[s:e].tolist() == [0, 1, 1]
    assert ds.train_of(2).tolist() == [1, 7]


def test_rf2_split_first_ceil_of_ratings_train() -> None:
    rows = [(0, k % 10, k, 1) for k in range(11)] + [(1, k % 10, k, 1) for k in range(20)]
    ds = split_rated(_rated(rows, 2), "toy", 0.9, 10)
    assert ds.rated.train_counts.tolist() == [10, 18]  # ceil(9.9), ceil(18.0)
    assert ds.train_counts.tolist() == [10, 18] and ds.test_counts.tolist() == [1, 2]


def test_clicks_protocol_drops_clickless_users_and_keeps_raw_ids() -> None:
    rows = [(0, 1, 1, 1), (1, 2, 1, 0), (2, 3, 1, 1), (2, 4, 2, 1)]
    inter = drop_unclicked(_rated(rows, 3, user_ids=[10, 20, 30]))
    assert inter.num_users == 2 and inter.user.tolist() == [0, 1, 1]
    assert inter.user_ids.tolist() == [10, 30] and inter.ratings is None


def test_synthetic_protocol_rf2_adds_nonclick_exposures() -> None:
    cfg = DatasetConfig(name="synthetic", num_users=120, num_items=80, num_groups=4)
    clicks = load_dataset(cfg, 3)
    rf2 = load_dataset(DatasetConfig(**{**cfg.__dict__, "protocol": "rf2"}), 3)
    assert rf2.rated is not None and clicks.rated is None
    labels = np.concatenate([rf2.rated.train_labels, rf2.rated.test_labels])
    assert 0.5 < labels.mean() < 0.85  # up to one exposure per click (repeats dropped)
    r = load_dataset(DatasetConfig(**{**cfg.__dict__, "protocol": "rf2"}), 3).rated
    users = np.repeat(np.arange(120), r.train_counts)
    keys = users * 80 + r.train_items
    assert np.unique(keys).size == keys.size  # never an exposure of a clicked item
    assert (rf2.train_counts.sum() + rf2.test_counts.sum()
            == clicks.train_counts.sum() + clicks.test_counts.sum())  # same clicks


def test_lightgcn_refuses_rf2_protocol() -> None:
    with pytest.raises(ConfigError, match="dataset.protocol"):
        load_dataset(DatasetConfig(name="lightgcn", path="/nonexistent", protocol="rf2"), 0)


# -- RF²'s tierings on toys ----------------------------------------------------------------
def test_rf2_random_descending_stable_mod_three() -> None:
    tiers = rf2_random(np.array([3, 5, 5, 1, 2, 5]), 3)
    # order: users 1, 2, 5 (5 samples, by id), 0, 4, 3 -> positions 0..5, mod 3
    assert tiers.tolist() == [0, 0, 1, 2, 1, 2]


def _toy_clicks(test: dict[int, list[int]] | None = None) -> FederatedDataset:
    """Users 0-2 click item 5; users 2, 3 item 3; users 4, 5 item 4; user 6 nothing."""
    train = {0: [5], 1: [5], 2: [5, 3], 3: [3], 4: [4], 5: [4], 6: []}
    test = test or {}

    def csr(d: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        parts = [d.get(u, []) for u in range(7)]
        ptr = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return ptr, np.array([i for p in parts for i in p], dtype=np.int64)

    (a, b), (c, d) = csr(train), csr(test)
    return FederatedDataset("toy", 7, 8, a, b, c, d, 10)


class _Stub:
    """A generator with chosen Dirichlet draws and identity shuffles (records each list)."""

    def __init__(self, draws: list[list[float]]) -> None:
        self.draws = list(draws)
        self.used = 0
        self.shuffled: list[list[int]] = []

    def dirichlet(self, alpha: np.ndarray) -> np.ndarray:
        self.used += 1
        return np.array(self.draws.pop(0) if self.draws else [1.0, 0.0, 0.0])

    def shuffle(self, x: list[int]) -> None:
        self.shuffled.append(list(x))


def test_rf2_dirichlet_walk_order_and_tie_breaks() -> None:
    # counts: item 5: 3, item 4: 2, item 3: 2 (tie -> larger id 4 first), pseudo-item: 1.
    # one-hot shares -> everything to the smallest tier (ties: lower id):
    # item 5 -> {0,1,2} tier 0; item 4 -> {4,5} tier 1; item 3 -> {3} tier 2;
    # pseudo -> {6} tier 2 (sizes 3/2/1).
    rng = _Stub([[np.nan, 0.5, 0.5]])  # a NaN draw is redrawn
    tiers = rf2_dirichlet(_toy_clicks(), 3, 0.005, False, rng)  # type: ignore[arg-type]
    assert tiers.tolist() == [0, 0, 0, 2, 1, 1, 2]
    assert rng.used == 5  # 4 walk steps + 1 redraw


def test_rf2_dirichlet_share_cuts_use_int_of_cumulative() -> None:
    # 3 users on item 5 with sorted shares (0.5, 0.3, 0.2): d = 1.5, 0.9, 0.6
    # -> smallest tier takes int(1.5) = 1, next up to int(2.4) = 2, the last the rest.
    # Clickers come in RF²'s client order (most training samples first): 2, 0, 1.
    rng = _Stub([[0.2, 0.5, 0.3]])
    tiers = rf2_dirichlet(_toy_clicks(), 3, 0.005, False, rng)  # type: ignore[arg-type]
    assert rng.shuffled[0] == [2, 0, 1]
    assert tiers[[2, 0, 1]].tolist() == [0, 1, 2]


def test_rf2_dirichlet_nan_draws_are_bounded() -> None:
    # A generator that only ever returns NaN (legacy Dirichlet at alpha <~ 1e-8): each
    # step gives up after MAX_REDRAWS redraws and takes the alpha -> 0 limit (1, 0, 0),
    # which is the one-hot walk of test_rf2_dirichlet_walk_order_and_tie_breaks.
    class _AlwaysNaN(_Stub):
        def dirichlet(self, alpha: np.ndarray) -> np.ndarray:
            self.used += 1
            return np.full(alpha.size, np.nan)

    rng = _AlwaysNaN([])
    tiers = rf2_dirichlet(_toy_clicks(), 3, 1e-12, False, rng)  # type: ignore[arg-type]
    assert tiers.tolist() == [0, 0, 0, 2, 1, 1, 2]
    assert rng.used == 4 * (MAX_REDRAWS + 1)
    # RF²'s own generators at alpha = 1e-12 (NaN on nearly every draw) finish too
    real = rf2_dirichlet(_toy_clicks(), 3, 1e-12, False, rf2_draws(0))
    assert real.tolist() == [0, 0, 0, 2, 1, 1, 2]


def test_rf2_dirichlet_leak_test_uses_test_clicks() -> None:
    ds = _toy_clicks(test={6: [5], 3: [5]})  # test clicks on the head item
    free = rf2_dirichlet(ds, 3, 0.005, False, _Stub([]))  # type: ignore[arg-type]
    leaky = rf2_dirichlet(ds, 3, 0.005, True, _Stub([]))  # type: ignore[arg-type]
    assert free[6] == 2 and free[3] == 2
    assert leaky[6] == 0 and leaky[3] == 0  # joined the head item's tier through test clicks


def test_population_json_reports_training_samples(tmp_path: Path) -> None:
    rows = [(u, u % 4, t, int(t % 3 == 0)) for u in range(6) for t in range(u + 2)]
    ds = split_rated(_rated(rows, 6), "toy", 0.9, 10)
    pop = assign_tiers(ds, load_profile("rf2-3tier"), PopulationConfig(mode="rf2-random"), 0)
    summ = population_summary(ds, pop)
    assert sum(t["training_samples"] for t in summ["tiers"].values()) == ds.rated.train_counts.sum()


# -- tier maps in and out ----------------------------------------------------------------
def test_tier_csv_round_trip_and_json(tmp_path: Path) -> None:
    ids = np.array([7, 3, 12])
    text = tier_csv_text(ids, np.array([2, 0, 1]), ("low", "mid", "high"))
    assert text.splitlines() == ["user_id,tier", "7,high", "3,low", "12,mid"]
    f = tmp_path / "tiers.csv"
    f.write_text(text)
    assert read_tier_file(str(f), ids, ("low", "mid", "high")).tolist() == [2, 0, 1]
    j = tmp_path / "tiers.json"
    j.write_text(json.dumps({"12": "mid", "7": "high", "3": "low"}))
    assert read_tier_file(str(j), ids, ("low", "mid", "high")).tolist() == [2, 0, 1]


@pytest.mark.parametrize(("text", "needle"), [
    ("user_id,tier\n7,high\n3,low\n99,mid\n", "user_id 99 is not a user"),
    ("user_id,tier\n7,high\n3,low\n", "1 users of the dataset have no tier (first: user_id 12)"),
    ("user_id,tier\n7,high\n3,top\n12,mid\n", "tier 'top' is not a tier"),
    ("user_id,tier\n7,high\n7,low\n12,mid\n", "user_id 7 is listed twice"),
    ("user,tier\n7,high\n", "header user_id,tier"),
    ("user_id,tier\nx,high\n", "'x' is not an integer"),
])
def test_tier_file_errors_are_one_line(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "tiers.csv"
    f.write_text(text)
    with pytest.raises(DataError) as err:
        read_tier_file(str(f), np.array([7, 3, 12]), ("low", "mid", "high"))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("protocol", ["clicks", "rf2"])
def test_ml100k_tiers_csv_uses_movielens_user_ids(ml100k: Path, tmp_path: Path,
                                                   protocol: str) -> None:
    """A run's tiers.csv names users 1..943 under every protocol, and reads back."""
    from conftest import small_run

    from rf2.cli.support import run_job

    cfg = small_run(**{"dataset": {"name": "movielens100k", "path": str(ml100k),
                                   "protocol": protocol},
                       "devices.profile": "rf2-3tier", "population.mode": "rf2-random",
                       "num_rounds": 1, "clients_per_round": 5, "eval.max_users": 50})
    run = run_job(cfg, tmp_path / "run")
    lines = (run / "tiers.csv").read_text().splitlines()
    ids = [int(line.split(",")[0]) for line in lines[1:]]
    raw = np.loadtxt(ml100k / "u.data", dtype=np.int64)  # user item rating time
    clickers = np.unique(raw[raw[:, 2] == 5, 0]).tolist()  # 928 users
    assert ids == (list(range(1, 944)) if protocol == "rf2" else clickers)
    ds = load_dataset(DatasetConfig(name="movielens100k", path=str(ml100k),
                                    protocol=protocol), 7)  # type: ignore[arg-type]
    profile = load_profile("rf2-3tier")
    written = assign_tiers(ds, profile, PopulationConfig(mode="rf2-random"), 7).tier_of_user
    back = assign_tiers(ds, profile, PopulationConfig(mode="from-file",
                                                      path=str(run / "tiers.csv")), 7)
    assert np.array_equal(back.tier_of_user, written)


def test_tier_file_with_token_user_ids(tmp_path: Path) -> None:
    ids = np.array(["A7", "b3", "c12"])
    f = tmp_path / "tiers.csv"
    f.write_text(tier_csv_text(ids, np.array([2, 0, 1]), ("low", "mid", "high")))
    assert f.read_text().splitlines()[1] == "A7,high"
    assert read_tier_file(str(f), ids, ("low", "mid", "high")).tolist() == [2, 0, 1]
    f.write_text("user_id,tier\nA7,high\nb3,low\nzz,mid\n")
    with pytest.raises(DataError, match="user_id zz is not a user"):
        read_tier_file(str(f), ids, ("low", "mid", "high"))


def test_cli_from_file_bad_tier_exits_2_without_run_folder(tmp_path: Path,
                                                           rf2_in_process: Any) -> None:
    """rf2's command, in this process (the check itself is tested in-process above)."""
    f = tmp_path / "tiers.csv"
    f.write_text("user_id,tier\n0,low\n1,nowhere\n")
    proc = rf2_in_process("simulation=inprocess", "devices=rf2-3tier", "population=from-file",
                          f"population.path={f}", "dataset.num_users=50", "clients_per_round=5",
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tier 'nowhere'" in lines[0], proc.stderr
    assert not list(tmp_path.rglob("config.yaml"))


def test_leak_test_only_with_rf2_dirichlet() -> None:
    with pytest.raises(ConfigError, match="population.leak_test"):
        PopulationConfig(mode="popularity-dirichlet", leak_test=True).validate()


# -- MovieLens-100K against DESIGN.md's numbers of RF²'s own maps ---------------------------
def _within(values: list[float], expected: list[float], tol: float = 0.02) -> bool:
    return all(abs(v - e) <= tol * e for v, e in zip(values, expected, strict=True))


def test_ml100k_rf2_random_matches_rf2(ml100k: Path) -> None:
    ds = load_dataset(DatasetConfig(name="movielens100k", path=str(ml100k), protocol="rf2"), 123)
    assert ds.num_users == 943  # users without a 5-star rating stay
    pop = assign_tiers(ds, load_profile("rf2-3tier"), PopulationConfig(mode="rf2-random"), 123)
    got_users = [int((pop.tier_of_user == t).sum()) for t in range(3)]
    got_samples = [float(ds.rated.train_counts[pop.tier_of_user == t].sum()) for t in range(3)]
    assert got_users == [315, 314, 314]
    assert _within(got_samples, [30.4e3, 30.1e3, 29.9e3], 0.01), got_samples


def test_ml100k_rf2_dirichlet_leaky_matches_rf2(ml100k: Path) -> None:
    """RF²'s leaky map for seed 123 (DESIGN.md): 348/292/303 users, 44.5k/22.5k/23.4k
    training samples -- exactly, since rf2 replays RF²'s generators."""
    ds = load_dataset(DatasetConfig(name="movielens100k", path=str(ml100k), protocol="rf2"), 123)
    cfg = PopulationConfig(mode="rf2-dirichlet", leak_test=True)
    t = assign_tiers(ds, load_profile("rf2-3tier"), cfg, seed=123).tier_of_user
    assert [int((t == k).sum()) for k in range(3)] == [348, 292, 303]
    samples = [int(ds.rated.train_counts[t == k].sum()) for k in range(3)]
    assert [round(s, -2) for s in samples] == [44_500, 22_500, 23_400], samples
    free = assign_tiers(ds, load_profile("rf2-3tier"),
                        PopulationConfig(mode="rf2-dirichlet", leak_test=False), seed=123)
    assert not np.array_equal(free.tier_of_user, t)  # test clicks change the map


@pytest.mark.parametrize(("fixture", "mode", "seed"), [
    ("dirichlet_seed124.json", "rf2-dirichlet", 124), ("random.json", "rf2-random", 124)])
def test_ml100k_maps_equal_rf2s_own_user_for_user(ml100k: Path, rf2_maps: Path, fixture: str,
                                                   mode: str, seed: int) -> None:
    """The maps RF²'s code wrote (../shared/fixtures/rf2-maps, see its README)."""
    ref = json.loads((rf2_maps / fixture).read_text())
    ds = load_dataset(DatasetConfig(name="movielens100k", path=str(ml100k), protocol="rf2"), seed)
    cfg = PopulationConfig(mode=mode, leak_test=mode == "rf2-dirichlet")  # type: ignore[arg-type]
    got = assign_tiers(ds, load_profile("rf2-3tier"), cfg, seed=seed).tier_of_user
    ids = ds.raw_user_ids().tolist()
    assert sorted(ids) == sorted(int(k) for k in ref["map"])  # 943 users, ids 1..943
    mismatched = [u for u, t in zip(ids, got.tolist(), strict=True) if ref["map"][str(u)] != t]
    assert mismatched == []
    for tier, stats in ref["stats_per_tier"].items():
        mask = got == int(tier)
        assert int(mask.sum()) == stats["users"]
        assert int(ds.rated.train_counts[mask].sum()) == stats["train_samples"]
