"""Tier assignment modes: seeded statistics on a synthetic 900-user taste-cluster dataset."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.core.config import PopulationConfig
from rf2.data.base import FederatedDataset
from rf2.hetero.devices import DeviceProfile, load_profile, profile_from_dict
from rf2.hetero.population import assign_tiers, population_summary, target_counts


def make_dataset(num_users: int = 900, num_items: int = 270, clusters: int = 9,
                 own: float = 0.97, seed: int = 0) -> FederatedDataset:
    """Power-law popularity inside each of ``clusters`` disjoint taste clusters.

    User u belongs to cluster u % clusters and clicks its own cluster's items with weight
    ``own``; per-user volume is lognormal (median 20); every 150th user has no train click.
    """
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(num_items) % clusters
    pop = 1.0 / (np.arange(num_items) // clusters + 1.0)  # (I,) rank within cluster
    counts = np.rint(rng.lognormal(np.log(20), 0.7, num_users)).astype(np.int64)
    counts[::150] = 0
    train, test = [], []
    for u in range(num_users):
        w = pop * np.where(item_cluster == u % clusters, own, 1 - own)
        n = min(int(counts[u]), num_items - 2)
        items = rng.choice(num_items, size=n + 2, replace=False, p=w / w.sum())
        train.append(items[:n])
        test.append(items[n:])

    def csr(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        indptr = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return indptr, np.concatenate(parts).astype(np.int64)

    (tr_ptr, tr), (te_ptr, te) = csr(train), csr(test)
    return FederatedDataset("synthetic-test", num_users, num_items, tr_ptr, tr, te_ptr, te, 10)


@pytest.fixture(scope="module")
def ds() -> FederatedDataset:
    return make_dataset()


@pytest.fixture(scope="module")
def three() -> DeviceProfile:
    return load_profile("rf2-3tier")


def _shares(tiers: np.ndarray, num_tiers: int) -> np.ndarray:
    return np.bincount(tiers, minlength=num_tiers) / len(tiers)


def _cfg(mode: str, **kw: float) -> PopulationConfig:
    return PopulationConfig(mode=mode, **kw)  # type: ignore[arg-type]


def _uneven() -> DeviceProfile:
    base = load_profile("rf2-3tier")
    tiers = tuple(replace(t, share=s) for t, s in zip(base.tiers, (0.5, 0.3, 0.2), strict=True))
    return replace(base, tiers=tiers)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6).filter(lambda w: sum(w) > 0),
       st.integers(0, 5000))
def test_target_counts_exact_up_to_rounding(weights: list[int], n: int) -> None:
    shares = np.array(weights, dtype=float) / sum(weights)
    counts = target_counts(shares, n)
    assert counts.sum() == n
    assert np.all(np.abs(counts - shares * n) < 1.0)


def test_independent_exact_shares_and_data_balance(ds: FederatedDataset) -> None:
    pop = assign_tiers(ds, _uneven(), _cfg("independent"), seed=1)
    assert np.bincount(pop.tier_of_user).tolist() == [450, 270, 180]
    means = [ds.train_counts[pop.tier_of_user == t].mean() for t in range(3)]
    overall = ds.train_counts.mean()
    assert all(abs(m / overall - 1) < 0.12 for m in means)


def test_assignment_is_deterministic_and_seeded(ds: FederatedDataset, three: DeviceProfile) -> None:
    for mode in ("independent", "activity", "popularity-dirichlet", "rf2-sorted"):
        a = assign_tiers(ds, three, _cfg(mode), seed=5)
        b = assign_tiers(ds, three, _cfg(mode), seed=5)
        assert np.array_equal(a.tier_of_user, b.tier_of_user)
        assert np.array_equal(a.download_mbps, b.download_mbps)
    five = assign_tiers(ds, three, _cfg("independent"), seed=5)
    six = assign_tiers(ds, three, _cfg("independent"), seed=6)
    assert not np.array_equal(five.tier_of_user, six.tier_of_user)


def test_rf2_sorted_is_position_mod_tiers(ds: FederatedDataset, three: DeviceProfile) -> None:
    pop = assign_tiers(ds, three, _cfg("rf2-sorted"), seed=0)
    order = np.argsort(ds.train_counts, kind="stable")
    assert np.array_equal(pop.tier_of_user[order], np.arange(ds.num_users) % 3)
    volume = np.bincount(pop.tier_of_user, weights=ds.train_counts) / ds.train_counts.sum()
    assert np.all(np.abs(volume - 1 / 3) < 0.02)
    uneven = assign_tiers(ds, _uneven(), _cfg("rf2-sorted"), seed=0)
    assert np.bincount(uneven.tier_of_user).tolist() == [450, 270, 180]
    means = [ds.train_counts[uneven.tier_of_user == t].mean() for t in range(3)]
    assert max(means) / min(means) < 1.05  # every tier spans the whole size range


def test_activity_low_tier_has_fewer_interactions(ds: FederatedDataset,
                                                  three: DeviceProfile) -> None:
    pop = assign_tiers(ds, three, _cfg("activity", strength=1.0), seed=0)
    assert np.bincount(pop.tier_of_user).tolist() == [300, 300, 300]
    means = [ds.train_counts[pop.tier_of_user == t].mean() for t in range(3)]
    assert means[0] < means[1] < means[2]
    assert means[2] / means[0] > 2.0
    strong = assign_tiers(ds, three, _cfg("activity", strength=100.0), seed=0)
    hi = [ds.train_counts[strong.tier_of_user == t].mean() for t in range(3)]
    assert hi[2] / hi[0] > means[2] / means[0]
    flat = assign_tiers(ds, three, _cfg("activity", strength=0.0), seed=0)
    lo = [ds.train_counts[flat.tier_of_user == t].mean() for t in range(3)]
    assert max(lo) / min(lo) < 1.2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_popularity_dirichlet_shares_and_taste_separation(ds: FederatedDataset,
                                                          three: DeviceProfile,
                                                          seed: int) -> None:
    dirich = assign_tiers(ds, three, _cfg("popularity-dirichlet", alpha=0.005), seed=seed)
    assert (dirich.tier_of_user >= 0).all()  # incl. users without train clicks
    assert np.all(np.abs(_shares(dirich.tier_of_user, 3) - 1 / 3) <= 0.05)
    indep = assign_tiers(ds, three, _cfg("independent"), seed=seed)
    j_dir = population_summary(ds, dirich)["mean_cross_tier_jaccard"]
    j_ind = population_summary(ds, indep)["mean_cross_tier_jaccard"]
    assert j_ind > 0.65
    assert j_dir < j_ind - 0.2


def test_popularity_dirichlet_uses_train_clicks_only(ds: FederatedDataset,
                                                     three: DeviceProfile) -> None:
    rng = np.random.default_rng(9)
    other_test = rng.integers(0, ds.num_items, ds.test_items.size)
    leaked = replace(ds, test_items=other_test)
    a = assign_tiers(ds, three, _cfg("popularity-dirichlet"), seed=0)
    b = assign_tiers(leaked, three, _cfg("popularity-dirichlet"), seed=0)
    assert np.array_equal(a.tier_of_user, b.tier_of_user)


def test_popularity_dirichlet_uneven_shares(ds: FederatedDataset) -> None:
    pop = assign_tiers(ds, _uneven(), _cfg("popularity-dirichlet"), seed=0)
    assert np.all(np.abs(_shares(pop.tier_of_user, 3) - [0.5, 0.3, 0.2]) <= 0.05)


def test_summary_is_json_and_has_pairwise_jaccard(ds: FederatedDataset,
                                                  three: DeviceProfile) -> None:
    pop = assign_tiers(ds, three, _cfg("popularity-dirichlet"), seed=0)
    summ = json.loads(json.dumps(population_summary(ds, pop)))
    assert set(summ["jaccard_top50"]) == {"low|mid", "low|high", "mid|high"}
    assert summ["num_users"] == 900
    tiers = summ["tiers"]
    assert sum(t["users"] for t in tiers.values()) == 900
    assert sum(t["interactions"] for t in tiers.values()) == int(ds.train_counts.sum())
    assert abs(sum(t["share"] for t in tiers.values()) - 1) < 1e-9
    for t in tiers.values():
        assert 0 <= t["top1pct_click_share"] <= 1
    mean_j = np.mean(list(summ["jaccard_top50"].values()))
    assert summ["mean_cross_tier_jaccard"] == pytest.approx(mean_j)


def test_device_draws_follow_the_tier(ds: FederatedDataset, three: DeviceProfile) -> None:
    pop = assign_tiers(ds, three, _cfg("independent"), seed=0)
    for t, spec in enumerate(three.tiers):
        mask = pop.tier_of_user == t
        assert np.all(pop.compute_ms_per_example[mask] == spec.compute_ms_per_example.value)
        assert np.all(pop.dropout[mask] == spec.dropout)
        assert np.all(pop.availability_period[mask] == 0)
        med = np.median(pop.download_mbps[mask])
        assert abs(med / (spec.download_mbps.median or 1) - 1) < 0.1
    flash = assign_tiers(ds, load_profile("flash"), _cfg("independent"), seed=0)
    assert np.all(flash.availability_period == 24)
    assert flash.availability_phase.min() >= 0 and flash.availability_phase.max() < 24
    assert len(np.unique(flash.compute_ms_per_example)) == 900
    low = np.flatnonzero(pop.tier_of_user == pop.tier_names.index("low"))
    assert low.size == 300
    assert pop.eligible_users(["low"]).size == 600
    assert not np.isin(pop.eligible_users(["low"]), low).any()


def test_zero_share_tier_gets_nobody(ds: FederatedDataset) -> None:
    tiers = [{"name": n, "share": s, "compute_ms_per_example": 1, "download_mbps": 1,
              "upload_mbps": 1} for n, s in (("a", 0.0), ("b", 0.5), ("c", 0.5))]
    prof = profile_from_dict({"tiers": tiers}, "z")
    for mode in ("independent", "popularity-dirichlet", "activity", "rf2-sorted"):
        pop = assign_tiers(ds, prof, _cfg(mode), seed=0)
        assert (pop.tier_of_user != 0).all(), mode


def test_popularity_dirichlet_caps_tiers_when_one_item_dominates(three: DeviceProfile) -> None:
    """RF²'s walk would put all 80% clickers of the head item into one tier; rf2 keeps
    every tier at its quota and spills the excess."""
    rng = np.random.default_rng(0)
    n, items = 300, 50
    seqs = []
    for u in range(n):
        own = rng.choice(np.arange(1, items), size=5, replace=False)
        seqs.append(np.concatenate([[0], own]) if u < 240 else own)  # item 0: 80% of users
    counts = np.array([len(s) for s in seqs])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    ds = FederatedDataset(name="head", num_users=n, num_items=items, train_indptr=indptr,
                          train_items=np.concatenate(seqs).astype(np.int64),
                          test_indptr=np.zeros(n + 1, dtype=np.int64),
                          test_items=np.zeros(0, dtype=np.int64), history_len=10)
    pop = assign_tiers(ds, three, _cfg("popularity-dirichlet"), seed=3)
    assert np.bincount(pop.tier_of_user, minlength=3).tolist() == [100, 100, 100]
