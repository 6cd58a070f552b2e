"""Simulated clock (closed-form times, round policies) and the seeded client selector."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.core.config import RoundConfig
from rf2.fl.selection import ClientSelector
from rf2.hetero.clock import SimClock, num_to_select, tier_counts
from rf2.hetero.devices import profile_from_dict
from rf2.hetero.population import Population, draw_devices


def make_population(n: int = 12, num_tiers: int = 3, ms: float = 10.0, down: float = 8.0,
                    up: float = 4.0, availability: float = 1.0, dropout: float = 0.0,
                    period: int | None = None) -> Population:
    """Constant-speed tiers; user u is in tier u % num_tiers."""
    tiers = [{"name": f"t{t}", "share": 1 / num_tiers, "compute_ms_per_example": ms,
              "download_mbps": down, "upload_mbps": up, "availability": availability,
              "availability_period": period, "dropout": dropout} for t in range(num_tiers)]
    tiers[-1]["share"] = 1 - (num_tiers - 1) / num_tiers
    prof = profile_from_dict({"tiers": tiers}, "test")
    return draw_devices(np.arange(n) % num_tiers, prof, seed=0)


def test_closed_form_completion_time() -> None:
    clock = SimClock(make_population(), seed=0, model_bytes_down=1e6, update_bytes_up=1e6,
                     local_epochs=2)
    t = clock.completion_times(np.array([0, 1, 2]), np.array([100, 0, 50]), rnd=0)
    # down 1e6*8/8e6 = 1 s; up 1e6*8/4e6 = 2 s; compute n * 2 epochs * 10 ms
    np.testing.assert_allclose(t, [1 + 2 + 2.0, 1 + 2 + 0.0, 1 + 2 + 1.0])
    per_user = clock.completion_times(np.array([0]), np.array([100]), 0, bytes_down=0.0,
                                      bytes_up=np.array([5e5]))
    np.testing.assert_allclose(per_user, [2.0 + 1.0])


def test_deadline_drops_exactly_the_clients_over_it() -> None:
    clock = SimClock(make_population(), seed=0, model_bytes_down=0, update_bytes_up=0)
    sel = np.arange(6)
    n_ex = np.array([100, 300, 200, 500, 400, 600])  # times 1..6 s
    plan = clock.plan_round(0, sel, n_ex, RoundConfig(deadline_s=3.5))
    assert sorted(plan.dropped_deadline.tolist()) == [3, 4, 5]
    assert sorted(plan.completed.tolist()) == [0, 1, 2]
    assert plan.duration_s == 3.5 and plan.deadline_s == 3.5
    q = clock.plan_round(0, sel, n_ex, RoundConfig(deadline_quantile=0.5))
    assert q.deadline_s == pytest.approx(3.5)  # median of 1..6
    assert sorted(q.dropped_deadline.tolist()) == [3, 4, 5]
    none = clock.plan_round(0, sel, n_ex, RoundConfig())
    assert none.dropped_deadline.size == 0 and none.duration_s == pytest.approx(6.0)


def test_overcommit_keeps_the_k_fastest() -> None:
    clock = SimClock(make_population(n=20), seed=0, model_bytes_down=0, update_bytes_up=0)
    assert num_to_select(100, 0.3) == 130 and num_to_select(10, 0.0) == 10
    sel = np.arange(13)
    n_ex = np.array([130, 10, 120, 20, 110, 30, 100, 40, 90, 50, 80, 60, 70])
    plan = clock.plan_round(0, sel, n_ex, RoundConfig(overcommit=0.3), k=10)
    fastest = sel[np.argsort(n_ex)[:10]]
    assert sorted(plan.completed.tolist()) == sorted(fastest.tolist())
    assert sorted(plan.dropped_overcommit.tolist()) == [0, 2, 4]
    assert plan.duration_s == pytest.approx(1.0)  # the 10th fastest: 100 examples


def test_dropout_counts_partial_time() -> None:
    clock = SimClock(make_population(dropout=1.0), seed=3, model_bytes_down=0,
                     update_bytes_up=0)
    plan = clock.plan_round(0, np.arange(6), np.full(6, 100), RoundConfig())
    assert plan.completed.size == 0 and plan.dropped_dropout.size == 6
    assert 0 < plan.duration_s < 1.0  # failed part-way through 1 s of work
    off = clock.plan_round(0, np.arange(6), np.full(6, 100), RoundConfig(dropout=False))
    assert off.completed.size == 6 and off.duration_s == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(n_sel=st.integers(0, 30), drop=st.floats(0, 1), k_frac=st.floats(0.1, 1.0),
       quant=st.one_of(st.none(), st.floats(0.05, 1.0)), rnd=st.integers(0, 1000),
       absolute=st.one_of(st.none(), st.floats(0.1, 5.0)))
def test_plan_partitions_selected(n_sel: int, drop: float, k_frac: float,
                                  quant: float | None, rnd: int,
                                  absolute: float | None) -> None:
    pop = make_population(n=40, dropout=drop)
    clock = SimClock(pop, seed=1, model_bytes_down=1e5, update_bytes_up=1e5)
    sel = np.random.default_rng(rnd).permutation(40)[:n_sel]
    n_ex = np.random.default_rng(rnd + 1).integers(0, 300, n_sel)
    k = max(1, int(k_frac * n_sel))
    cfg = RoundConfig(deadline_s=absolute, deadline_quantile=quant, overcommit=0.5)
    plan = clock.plan_round(rnd, sel, n_ex, cfg, k=k)
    parts = [plan.completed, plan.dropped_deadline, plan.dropped_dropout,
             plan.dropped_overcommit]
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == sorted(sel.tolist())  # disjoint and complete
    assert plan.completed.size <= k
    assert not np.isin(plan.dropped_dropout, plan.completed).any()
    t = dict(zip(sel.tolist(), plan.completion_s.tolist(), strict=True))
    if plan.deadline_s is not None:
        assert all(t[u] <= plan.deadline_s for u in plan.completed.tolist())
        assert plan.duration_s <= plan.deadline_s + 1e-12
    assert all(t[u] <= plan.duration_s + 1e-12 for u in plan.completed.tolist())
    again = SimClock(pop, seed=1, model_bytes_down=1e5, update_bytes_up=1e5)
    assert np.array_equal(again.plan_round(rnd, sel, n_ex, cfg, k=k).completed, plan.completed)


def test_iid_availability_rate_and_call_order_independence() -> None:
    clock = SimClock(make_population(n=3000, availability=0.7), seed=2, model_bytes_down=0,
                     update_bytes_up=0)
    users = np.arange(3000)
    online = clock.is_online(users, rnd=5)
    assert abs(online.mean() - 0.7) < 0.03
    other = SimClock(clock.population, seed=2, model_bytes_down=0, update_bytes_up=0)
    other.is_online(users[:10], rnd=4)
    assert np.array_equal(other.is_online(users[::-1], 5), online[::-1])
    assert not np.array_equal(clock.is_online(users, 6), online)


def test_on_off_availability_pattern() -> None:
    clock = SimClock(make_population(n=50, availability=0.3, period=10), seed=0,
                     model_bytes_down=0, update_bytes_up=0)
    grid = np.stack([clock.is_online(np.arange(50), r) for r in range(20)])  # (R, U)
    assert np.all(grid[:10].sum(axis=0) == 3) and np.all(grid[10:].sum(axis=0) == 3)
    for u in range(50):  # 3 consecutive rounds (cyclically), repeating every period
        on = set(np.flatnonzero(grid[:10, u]).tolist())
        assert any(on == {(s + j) % 10 for j in range(3)} for s in range(10))
        assert np.array_equal(grid[:10, u], grid[10:, u])
    assert len(np.unique(clock.population.availability_phase)) > 1


def test_clock_state_round_trip_and_tier_counts() -> None:
    pop = make_population(n=30, dropout=0.2)
    clock = SimClock(pop, seed=4, model_bytes_down=1e6, update_bytes_up=1e6)
    sel = np.arange(10)
    plan = clock.plan_round(3, sel, np.full(10, 50), RoundConfig(deadline_quantile=0.8))
    clock.advance(plan)
    state = json.loads(json.dumps(clock.state_dict()))
    resumed = SimClock(pop, seed=4, model_bytes_down=1e6, update_bytes_up=1e6)
    resumed.load_state_dict(state)
    assert resumed.now_s == clock.now_s == plan.duration_s
    cfg = RoundConfig(deadline_quantile=0.8)
    a = clock.plan_round(4, sel, np.full(10, 50), cfg)
    b = resumed.plan_round(4, sel, np.full(10, 50), cfg)
    assert np.array_equal(a.completion_s, b.completion_s)
    assert np.array_equal(a.dropped_dropout, b.dropped_dropout)
    counts = tier_counts(plan, pop, offline_ids=np.array([10, 11]))
    assert counts["tier/t0/selected"] == 4 and counts["tier/t1/offline"] == 1
    assert sum(counts[f"tier/t{t}/selected"] for t in range(3)) == 10
    done = sum(counts[f"tier/t{t}/{w}"] for t in range(3) for w in
               ("completed", "dropped_deadline", "dropped_dropout", "dropped_overcommit"))
    assert done == 10
    with pytest.raises(ValueError):
        SimClock(pop, seed=5, model_bytes_down=0, update_bytes_up=0).load_state_dict(state)


def _always(ids: np.ndarray) -> np.ndarray:
    return np.ones(len(ids), dtype=bool)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_selector_visits_each_client_once_per_pass(n: int, k: int, seed: int) -> None:
    eligible = np.arange(0, 3 * n, 3)  # non-contiguous ids
    sel = ClientSelector(eligible, seed)
    times = dict.fromkeys(eligible.tolist(), 0)
    total = 0
    for _ in range(3 * n // k + 2):
        chosen, offline = sel.select(k, _always)
        assert offline.size == 0
        assert chosen.size == min(k, n) and len(set(chosen.tolist())) == chosen.size
        for u in chosen.tolist():
            times[u] += 1
        total += chosen.size
        # passes are walked in full before anyone repeats: counts differ by at most 1,
        # and all are equal whenever a whole number of passes has been walked
        assert max(times.values()) - min(times.values()) <= 1
        if total % n == 0:
            assert set(times.values()) == {total // n}


def test_selector_skips_offline_and_excludes_tiers() -> None:
    pop = make_population(n=30)
    eligible = pop.eligible_users(["t0"])
    sel = ClientSelector(eligible, seed=7)

    def even_online(ids: np.ndarray) -> np.ndarray:
        return ids % 2 == 0

    chosen, offline = sel.select(5, even_online)
    assert chosen.size == 5 and (chosen % 2 == 0).all() and (offline % 2 == 1).all()
    t0 = np.flatnonzero(pop.tier_of_user == 0)
    assert not np.isin(np.concatenate([chosen, offline]), t0).any()
    everyone, _ = ClientSelector(eligible, seed=7).select(100, even_online)
    assert sorted(everyone.tolist()) == [u for u in eligible.tolist() if u % 2 == 0]
    empty = ClientSelector(np.array([], dtype=np.int64), seed=0).select(3, _always)
    assert empty[0].size == 0 and empty[1].size == 0


def test_selector_state_round_trip_reproduces_future() -> None:
    clock = SimClock(make_population(n=50, availability=0.6), seed=1, model_bytes_down=0,
                     update_bytes_up=0)
    sel = ClientSelector(np.arange(50), seed=3)
    for r in range(4):
        sel.select(9, clock.online_fn(r, RoundConfig()))
    state = json.loads(json.dumps(sel.state_dict()))
    resumed = ClientSelector(np.arange(50), seed=3)
    resumed.load_state_dict(state)
    for r in range(4, 12):
        a = sel.select(9, clock.online_fn(r, RoundConfig()))
        b = resumed.select(9, clock.online_fn(r, RoundConfig()))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert sel.epoch == resumed.epoch >= 1
    with pytest.raises(ValueError):
        ClientSelector(np.arange(49), seed=3).load_state_dict(state)
