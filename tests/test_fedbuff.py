"""strategy=fedbuff: the schedule's staleness bookkeeping on a hand-built clock, rebasing
stale updates, config errors, synchronous FedAvg as the case concurrency = K (equal
runs), and a resumed asynchronous run equal to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import read_rows, small_run, without_timing

from rf2.core.config import load_run_config
from rf2.core.errors import ConfigError
from rf2.hetero.buffer_schedule import BufferSchedule
from rf2.optim import sparse
from rf2.optim.staleness import rebase, staleness_weight


def test_schedule_steps_after_k_arrivals_and_counts_staleness() -> None:
    s = BufferSchedule(concurrency=3, buffer_size=2)
    s.start(10, 5.0)  # a slow client
    s.start(11, 1.0)
    s.start(12, 3.0)
    assert s.free_slots() == 0
    with pytest.raises(ValueError, match="no free slot"):
        s.start(13, 1.0)
    arrivals, failures = s.collect()
    assert [w.user for w in arrivals] == [11, 12] and not failures
    assert s.now_s == 3.0 and [s.staleness(w) for w in arrivals] == [0, 0]
    assert s.step() == 1
    d = s.start(13, 1.0)  # starts at 3 s on version 1
    s.start(14, 10.0)
    assert (d.start_s, d.end_s, d.version) == (3.0, 4.0, 1)
    arrivals, _ = s.collect()
    assert [(w.user, s.staleness(w)) for w in arrivals] == [(13, 0), (10, 1)]  # 10 is stale
    assert s.now_s == 5.0
    s.step()
    s.start(15, 1.0, fails=True, fail_after_s=0.5)
    s.start(16, 1.0)
    arrivals, failures = s.collect()  # 15 fails at 5.5, 16 arrives at 6, 14 at 13
    assert [w.user for w in failures] == [15]
    assert [(w.user, s.staleness(w)) for w in arrivals] == [(16, 0), (14, 1)]
    assert s.now_s == 13.0 and not s.in_flight
    s.step()
    s.start(17, 2.0, fails=True, fail_after_s=1.0)
    arrivals, failures = s.collect()  # nobody left in flight: the buffer ends short
    assert arrivals == [] and [w.user for w in failures] == [17] and s.now_s == 14.0


def test_schedule_ties_state_and_limits() -> None:
    s = BufferSchedule(concurrency=3, buffer_size=3)
    for user in (5, 3, 4):
        s.start(user, 2.0)  # equal end times: start order decides
    copy = BufferSchedule(3, 3)
    copy.load_state_dict(s.state_dict())
    assert [w.user for w in copy.collect()[0]] == [5, 3, 4]
    assert copy.state_dict()["in_flight"] == [] and copy.now_s == 2.0
    with pytest.raises(ValueError, match="buffer_size"):
        BufferSchedule(concurrency=2, buffer_size=3)


def test_staleness_weight_and_rebase() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(3, 0.0) == 1.0
    rng = np.random.default_rng(0)
    pulled = {"item_table": rng.normal(size=(6, 2)).astype(np.float32),
              "w": rng.normal(size=3).astype(np.float32)}
    current = {k: (v + 1.0).astype(np.float32) for k, v in pulled.items()}
    trained = {k: (v + 0.2).astype(np.float32) for k, v in pulled.items()}
    moved = rebase(trained, pulled, current, 0.5)
    for k in pulled:  # current + 0.5 * (trained - pulled)
        np.testing.assert_allclose(moved[k], current[k] + 0.1, rtol=1e-6)
    reply = sparse.encode(pulled, {"item_table": np.array([1, 4])},
                          {"item_table": trained["item_table"][[1, 4]], "w": trained["w"]})
    out = rebase(reply, pulled, current, 0.5)
    assert np.array_equal(out["item_table.rows"], [1, 4])
    np.testing.assert_allclose(out["item_table.values"], current["item_table"][[1, 4]] + 0.1,
                               rtol=1e-6)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"round.deadline_s": 5.0}, "round.deadline_s"),
    ({"round.deadline_quantile": 0.8}, "round.deadline_quantile"),
    ({"round.overcommit": 0.3}, "round.overcommit"),
    ({"optimization.overselect": 0.3}, "optimization.overselect"),
    ({"strategy.concurrency": 5}, "strategy.concurrency"),
    ({"strategy.staleness_exponent": -1.0}, "strategy.staleness_exponent"),
    ({"privacy.name": "dp"}, "strategy.name"),
])
def test_synchronous_only_settings_are_one_line_errors(overrides: dict[str, Any],
                                                       field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(small_run(**{"strategy.name": "fedbuff", **overrides}))
    assert f"{field}=" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_concurrency_k_is_synchronous_fedavg(tmp_path: Path) -> None:
    from rf2.cli.support import run_job

    # Tiers of different speeds, dropout on; one reply per client in both (partial sums
    # inside a message, off under fedbuff, round differently).
    base = {"devices.profile": "rf2-3tier", "simulation.partial_aggregation": False}
    sync = without_timing(read_rows(run_job(small_run(num_rounds=3, **base), tmp_path / "s")))
    buff = without_timing(read_rows(run_job(small_run(num_rounds=3, **base, **{
        "strategy.name": "fedbuff", "strategy.concurrency": 20}), tmp_path / "b")))
    for a, b in zip(sync, buff, strict=True):
        shared = set(a) & set(b)
        assert {"recall@20", "auc", "sim_time_s", "num_clients_trained"} <= shared
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    assert {"train/train_loss", "tier/low/completed", "tier/low/dropped_dropout"} <= set(buff[1])
    assert all(r["staleness_max"] == 0 for r in buff[1:])


@pytest.mark.slow
def test_async_run_is_stale_in_slow_tiers_and_resumes_exactly(tmp_path: Path) -> None:
    from rf2.cli.support import run_job

    cfg = small_run(num_rounds=4, checkpoint_every=2, **{
        "devices.profile": "rf2-3tier", "strategy.name": "fedbuff"})
    full = without_timing(read_rows(run_job(cfg, tmp_path / "full")))
    assert max(r["staleness_max"] for r in full[1:]) >= 1
    low = sum(r["tier/low/staleness_mean"] * r["tier/low/arrivals"] for r in full[1:])
    high = sum(r["tier/high/staleness_mean"] * r["tier/high/arrivals"] for r in full[1:])
    assert low > high  # the slow tier's updates arrive staler
    assert all(r["arrivals"] == 20 for r in full[1:])
    sync = read_rows(run_job(small_run(num_rounds=4, **{"devices.profile": "rf2-3tier"}),
                             tmp_path / "sync"))
    assert full[-1]["sim_time_s"] < sync[-1]["sim_time_s"]  # no waiting for the slowest
    part = tmp_path / "part"
    run_job({**cfg, "num_rounds": 2}, part)
    assert read_rows(part)[-1]["in_flight"] > 0  # versions in flight went to the checkpoint
    (part / "DONE").unlink()
    (part / "model.pt").unlink()
    run_job({**cfg, "resume": str(part)}, tmp_path / "unused", overrides=["num_rounds=4"])
    assert without_timing(read_rows(part)) == full


@pytest.mark.slow
def test_async_fedavgm_steps_against_the_current_model_and_resumes_exactly(
        tmp_path: Path) -> None:
    """FedBuff with server momentum: stale versions train, the momentum step is taken
    against the current model (FedBuff sets the strategy's w_t before aggregating) and
    the momentum survives a resume."""
    from rf2.cli.support import run_job

    cfg = small_run(num_rounds=4, checkpoint_every=2, **{
        "devices.profile": "rf2-3tier", "strategy.name": "fedbuff",
        "strategy.server_optimizer": "momentum", "strategy.server_lr": 0.5})
    full = without_timing(read_rows(run_job(cfg, tmp_path / "full")))
    assert max(r["staleness_max"] for r in full[1:]) >= 1
    assert full[-1]["recall@20"] != full[0]["recall@20"]
    part = tmp_path / "part"
    run_job({**cfg, "num_rounds": 2}, part)
    (part / "DONE").unlink()
    (part / "model.pt").unlink()
    run_job({**cfg, "resume": str(part)}, tmp_path / "unused", overrides=["num_rounds=4"])
    assert without_timing(read_rows(part)) == full
