"""privacy=dp: clipping bounds every client's contribution, the noise has the stated
scale, z = 0 and C = inf is FedAvg exactly, the logged epsilon is dp-accounting's for the
same (z, q, steps, delta), adaptive clipping follows Andrew et al.'s update, and bad
settings are one-line config errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from conftest import read_rows, small_run, without_timing
from dp_accounting import pld, rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAdagrad, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from rf2.core.config import PrivacyConfig, load_run_config
from rf2.core.errors import ConfigError
from rf2.fl.private_aggregation import PrivateAggregator
from rf2.fl.screening import UsableReply
from rf2.optim import sparse
from rf2.privacy.accounting import PrivacyLedger, epsilon_of, solve_noise_multiplier
from rf2.privacy.clipping import (
    AdaptiveClip,
    add_noise,
    clip_reply,
    noise_std,
    split_noise_multiplier,
    update_norm,
)
from rf2.privacy.plan import plan_privacy
from rf2.strategies.merge import aggregate_precomputed
from rf2.strategies.sampling import SAMPLING

Arrays = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the simulation engine sets before a ServerApp builds Messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def global_arrays(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"item_table": rng.normal(size=(30, 4)).astype(np.float32),
            "bias": rng.normal(size=30).astype(np.float32),
            "w": rng.normal(size=(4, 4)).astype(np.float32)}


def client_arrays(g: Arrays, seed: int, scale: float = 0.1) -> Arrays:
    """A trained model: a few item rows and the dense weight moved."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in g.items()}
    rows = rng.choice(30, size=5, replace=False)
    out["item_table"][rows] += scale * rng.normal(size=(5, 4)).astype(np.float32)
    out["bias"][rows] += scale * rng.normal(size=5).astype(np.float32)
    out["w"] += scale * rng.normal(size=(4, 4)).astype(np.float32)
    return out


def as_reply(g: Arrays, x: Arrays, sparse_reply: bool) -> Arrays:
    return sparse.encode_dense(g, x, ("item_table", "bias")) if sparse_reply else x


def dense_of(g: Arrays, reply: Arrays) -> Arrays:
    return sparse.densify(sparse.decode(reply), g) if sparse.is_sparse(reply) else reply


def norm_of(g: Arrays, x: Arrays) -> float:
    return math.sqrt(sum(float(np.sum((x[k].astype(np.float64) - g[k]) ** 2)) for k in g))


@pytest.mark.parametrize("sparse_reply", [False, True])
def test_clipping_bounds_each_update_and_keeps_small_ones_exact(sparse_reply: bool) -> None:
    g = global_arrays()
    big = as_reply(g, client_arrays(g, 1, scale=3.0), sparse_reply)
    small = as_reply(g, client_arrays(g, 2, scale=0.001), sparse_reply)
    raw = norm_of(g, dense_of(g, big))
    assert update_norm(big, g) == pytest.approx(raw, rel=1e-6)
    out = clip_reply(big, g, 0.5)
    assert out.norm == pytest.approx(raw, rel=1e-6) and out.factor == pytest.approx(0.5 / raw)
    clipped = dense_of(g, out.arrays)
    assert norm_of(g, clipped) == pytest.approx(0.5, rel=1e-5)
    # Same direction: the clipped update is the raw one scaled.
    for k in g:
        np.testing.assert_allclose(clipped[k] - g[k], out.factor * (dense_of(g, big)[k] - g[k]),
                                   atol=1e-6)
    kept = clip_reply(small, g, 0.5)
    assert kept.factor == 1.0
    assert all(np.array_equal(kept.arrays[k], small[k]) for k in small)
    assert clip_reply(big, g, None).factor == 1.0  # C = inf


def test_noise_scale_and_seeding() -> None:
    assert noise_std(2.0, 0.5, [1.0] * 8) == pytest.approx(2.0 * 0.5 / 8)
    assert noise_std(2.0, 0.5, [1.0, 3.0]) == pytest.approx(2.0 * 0.5 * 3 / 4)
    assert noise_std(0.0, None, [1.0]) == 0.0
    mean = {"a": np.zeros((400, 500), np.float32), "b": np.ones(10, np.float32)}
    one = add_noise(mean, 0.3, np.random.default_rng(5))
    two = add_noise(mean, 0.3, np.random.default_rng(5))
    assert np.array_equal(one["a"], two["a"]) and one["a"].dtype == np.float32
    assert np.std(one["a"]) == pytest.approx(0.3, rel=0.01)
    assert abs(float(np.mean(one["a"]))) < 0.003
    assert add_noise(mean, 0.0, np.random.default_rng(5))["a"] is mean["a"]


def test_adaptive_clip_follows_andrew_et_al() -> None:
    # z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2
    assert split_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="clipped-count std"):
        split_noise_multiplier(2.0, 1.0)
    clip = AdaptiveClip(clip_norm=2.5, target_quantile=0.25, learning_rate=0.2, count_std=0.0)
    fraction = clip.update([1.0, 2.0, 3.0, 4.0], np.random.default_rng(0))
    assert fraction == 0.5  # two of four norms <= 2.5
    assert clip.clip_norm == pytest.approx(2.5 * math.exp(-0.2 * (0.5 - 0.25)))
    clip.update([10.0] * 4, np.random.default_rng(0))  # all clipped: C grows
    assert clip.clip_norm == pytest.approx(2.5 * math.exp(-0.2 * 0.25) * math.exp(0.2 * 0.25))


def test_ledger_epsilon_is_dp_accountings() -> None:
    q, z, steps, delta = 0.05, 1.1, 40, 1e-5
    ledger = PrivacyLedger(delta)
    for _ in range(steps):
        ledger.record(q, z)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert ledger.epsilon() == acc.get_epsilon(delta)  # exactly
    assert ledger.steps == [(q, z, steps)] and ledger.releases == steps
    again = PrivacyLedger.from_state(ledger.state_dict())
    assert again.epsilon() == ledger.epsilon()
    # Varying rates compose in order (here: to within rounding of a different sum order).
    ledger.record(0.1, z)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(z)), 1)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    tight = PrivacyLedger(delta, "pld")
    for _ in range(3):
        tight.record(q, z)
    ref = pld.PLDAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 3)
    assert tight.epsilon() == pytest.approx(ref.get_epsilon(delta), rel=1e-6)
    assert math.isinf(epsilon_of([(q, 0.0, 5)], delta))  # no noise, no privacy
    assert epsilon_of([], delta) == 0.0


def test_target_epsilon_solves_the_noise() -> None:
    z = solve_noise_multiplier(4.0, 0.1, 30, 1e-3)
    assert 3.99 <= epsilon_of([(0.1, z, 30)], 1e-3) <= 4.0
    assert epsilon_of([(0.1, z * 0.98, 30)], 1e-3) > 4.0  # the smallest such z
    plan = plan_privacy(PrivacyConfig(name="dp", target_epsilon=4.0), population=200,
                        expected_selected=20, num_rounds=30, clients_per_round=20)
    assert plan.noise_multiplier == pytest.approx(solve_noise_multiplier(4.0, 0.1, 30, 0.005))
    assert plan.delta == 1 / 200 and plan.expected_rate == 0.1


# -- the aggregator against FedAvg ------------------------------------------------------
def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class _Nodes:
    """Stand-in Grid: ``configure_train`` only asks for node ids."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def usable_replies(g: Arrays, clients: list[Arrays], sparse_reply: bool,
                   strategy: Any) -> list[UsableReply]:
    """Replies to ``strategy``'s own instructions (a FedOpt strategy keeps w_t from
    configure_train), one per client, with FedAvg weights 3, 5, 7, ..."""
    instructions = sorted(strategy.configure_train(1, _record(g), ConfigRecord({}),
                                                   _Nodes(len(clients))),
                          key=lambda m: m.metadata.dst_node_id)
    out = []
    for i, (x, instruction) in enumerate(zip(clients, instructions, strict=True)):
        arrays = as_reply(g, x, sparse_reply)
        reply = Message(RecordDict({"arrays": _record(arrays), "metrics": MetricRecord(
            {"num-examples": 3 + 2 * i, "train_loss": 1.0 + i})}), reply_to=instruction)
        out.append(UsableReply(i, reply, arrays))
    return out


def plain_aggregate(strategy: Any, g: Arrays, usable: list[UsableReply]) -> Arrays:
    """rf2's non-DP routing (rf2.fl.aggregation) for FedAvg-family strategies."""
    replies = [r.message for r in usable]
    if sparse.is_sparse(usable[0].arrays):
        weights = [float(m.content["metrics"]["num-examples"]) for m in replies]
        updates = [sparse.decode(r.arrays) for r in usable]
        arrays, _ = aggregate_precomputed(strategy, 1, replies,
                                          lambda: sparse.weighted_mean(g, updates, weights),
                                          lambda: [])
    else:
        arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def dp_plan(**kwargs: Any) -> Any:
    cfg = PrivacyConfig(name="dp", **kwargs)
    return plan_privacy(cfg, population=100, expected_selected=4, num_rounds=10,
                        clients_per_round=4)


def strategy_of(kind: str) -> Any:
    return FedAvg(**SAMPLING) if kind == "fedavg" else FedAdagrad(**SAMPLING, eta=0.1, eta_l=1.0)


@pytest.mark.parametrize("kind", ["fedavg", "fedadagrad"])
@pytest.mark.parametrize("sparse_reply", [False, True])
def test_no_noise_no_clipping_is_fedavg_exactly(kind: str, sparse_reply: bool) -> None:
    g = global_arrays()
    clients = [client_arrays(g, s, scale=1.0) for s in range(4)]
    plain = strategy_of(kind)
    want = plain_aggregate(plain, g, usable_replies(g, clients, sparse_reply, plain))
    strategy = strategy_of(kind)
    private = PrivateAggregator(dp_plan(noise_multiplier=0.0, clip_norm=None,
                                        weighting="examples"), strategy, seed=3)
    got, _, row = private.aggregate(1, g, usable_replies(g, clients, sparse_reply, strategy), 4)
    assert got is not None
    for k in g:
        assert np.array_equal(got[k], want[k]), k
    assert row["dp/noise_std"] == 0.0 and row["dp/clipped_fraction"] == 0.0
    assert math.isinf(private.row()["dp/epsilon"])


@pytest.mark.parametrize("sparse_reply", [False, True])
def test_one_client_moves_the_aggregate_by_at_most_2c_over_m(sparse_reply: bool) -> None:
    g = global_arrays()
    clients = [client_arrays(g, s, scale=1.0) for s in range(4)]
    rogue = client_arrays(g, 99, scale=1e4)  # any update at all in place of client 0
    c, m = 0.3, 4
    results = []
    for first in (clients[0], rogue):
        strategy = FedAvg(**SAMPLING)
        private = PrivateAggregator(dp_plan(noise_multiplier=0.0, clip_norm=c), strategy, seed=3)
        got, _, row = private.aggregate(1, g, usable_replies(g, [first, *clients[1:]],
                                                             sparse_reply, strategy), m)
        assert row["dp/clipped_fraction"] == 1.0  # every update here is above C
        assert norm_of(g, got) <= c * (1 + 1e-5)  # uniform mean of updates of norm <= C
        results.append(got)
    assert norm_of(results[0], results[1]) <= 2 * c / m * (1 + 1e-5)


def test_noise_is_seeded_by_round_and_has_the_stated_std() -> None:
    g = {"t": np.zeros((200, 100), np.float32)}
    clients = [{"t": np.full((200, 100), 0.01, np.float32)} for _ in range(4)]
    plan = dp_plan(noise_multiplier=2.0, clip_norm=1.0)
    outs = []
    for _ in range(2):
        strategy = FedAvg(**SAMPLING)
        private = PrivateAggregator(plan, strategy, seed=3)
        got, _, row = private.aggregate(5, g, usable_replies(g, clients, False, strategy), 4)
        outs.append(got["t"])
    assert np.array_equal(outs[0], outs[1])
    assert row["dp/noise_std"] == pytest.approx(2.0 * 1.0 / 4)
    assert np.std(outs[0] - 0.01) == pytest.approx(0.5, rel=0.02)
    strategy = FedAvg(**SAMPLING)
    other, _, _ = PrivateAggregator(plan, strategy, seed=3).aggregate(
        6, g, usable_replies(g, clients, False, strategy), 4)
    assert not np.array_equal(other["t"], outs[0])


# -- configuration ----------------------------------------------------------------------
def config_error(**overrides: Any) -> str:
    data = small_run(**overrides)
    with pytest.raises(ConfigError) as info:
        load_run_config(data)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("overrides", "field"), [
    ({"strategy.name": "qffl"}, "strategy.name"),
    ({"devices.profile": "rf2-3tier", "optimization.width": {"low": 0.5}}, "optimization.width"),
    ({"optimization.per_row_embedding_avg": True}, "optimization.per_row_embedding_avg"),
    ({"strategy._target_": "flwr.serverapp.strategy.FedAvg"}, "strategy._target_"),
    ({"mode": "central"}, "privacy.name"),
    ({"privacy.clip_norm": None}, "privacy.clip_norm"),
    ({"privacy.clip_norm": -1.0}, "privacy.clip_norm"),
    ({"privacy.noise_multiplier": -0.5}, "privacy.noise_multiplier"),
    ({"privacy.delta": 1.5}, "privacy.delta"),
    ({"privacy.target_epsilon": 0.0}, "privacy.target_epsilon"),
    ({"privacy.clipping": "adaptive", "privacy.noise_multiplier": 3.0}, "privacy.noise_multiplier"),
    ({"privacy.target_quantile": 1.5}, "privacy.target_quantile"),
    ({"privacy.accountant": "gdp"}, "privacy.accountant"),
])
def test_bad_dp_settings_are_one_line_errors(overrides: dict[str, Any], field: str) -> None:
    assert f"{field}=" in config_error(**{"privacy.name": "dp", **overrides})


def test_no_clipping_is_allowed_without_noise_only() -> None:
    cfg = load_run_config(small_run(**{"privacy.name": "dp", "privacy.clip_norm": None,
                                       "privacy.noise_multiplier": 0.0}))
    assert cfg.privacy.clip_norm is None
    assert "privacy.clip_norm=" in config_error(**{"privacy.name": "dp",
                                                    "privacy.clip_norm": None,
                                                    "privacy.target_epsilon": 8.0})


# -- whole runs ---------------------------------------------------------------------------
def _dp_free(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("dp/")} for r in without_timing(rows)]


@pytest.mark.slow
def test_run_with_z0_and_no_clipping_equals_fedavg(tmp_path: Path) -> None:
    from rf2.cli.support import run_job

    # The reference aggregates one reply per client: partial sums inside a message (on by
    # default, off under DP) round differently.
    plain = run_job(small_run(num_rounds=2, **{"simulation.partial_aggregation": False}),
                    tmp_path / "plain")
    private = run_job(small_run(num_rounds=2, privacy={
        "name": "dp", "noise_multiplier": 0.0, "clip_norm": None, "weighting": "examples"}),
        tmp_path / "dp")
    rows = read_rows(private)
    assert _dp_free(rows) == _dp_free(read_rows(plain))
    assert math.isinf(rows[-1]["dp/epsilon"]) and rows[-1]["dp/releases"] == 2


@pytest.mark.slow
def test_logged_epsilon_is_dp_accountings_and_resume_adds_the_same_noise(tmp_path: Path) -> None:
    import shutil

    from rf2.cli.support import run_job

    dp = {"name": "dp", "noise_multiplier": 1.3, "clip_norm": 0.5, "clipping": "adaptive",
          "clipped_count_stddev": 2.0}
    cfg = small_run(num_rounds=4, checkpoint_every=2, privacy=dp,
                    **{"round.availability": False, "round.dropout": False})
    full = run_job(cfg, tmp_path / "full")
    rows = read_rows(full)
    q, delta = 20 / 200, 1 / 200  # 20 clients per round of 200 eligible users
    for row in rows[1:]:
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.3)),
                    row["round"])
        assert row["dp/sampling_rate"] == q and row["dp/delta"] == delta
        assert row["dp/epsilon"] == acc.get_epsilon(delta)
    assert len({r["dp/clip_norm"] for r in rows[1:]}) > 1  # adaptive: C moved
    # A run stopped after round 2 and resumed: same noise, same C, same epsilon.
    part = tmp_path / "part"
    run_job({**cfg, "num_rounds": 2}, part)
    (part / "DONE").unlink()
    (part / "model.pt").unlink()
    run_job({**cfg, "resume": str(part)}, tmp_path / "unused", overrides=["num_rounds=4"])
    assert without_timing(read_rows(part)) == without_timing(rows)
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
