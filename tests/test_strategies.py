"""Strategies against closed forms: FedAvg mean, FedProx's client step, q-FFL's update
(Li et al.), q-FFL/FedProx composed with a FedOpt step, and the pre-computed-mean glue.

Messages are built by hand, the way Flower's engine would: server messages need the
task identity set (as ``rf2.fl.simulation.InProcessGrid`` does), replies use ``reply_to``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import QFedAvg
from flwr.supercore.task_identity import TaskIdentity

from rf2.core.config import ClientConfig, StrategyConfig
from rf2.core.errors import ConfigError
from rf2.model.local_training import train_locally
from rf2.strategies import build_strategy
from rf2.strategies.merge import aggregate_precomputed
from rf2.strategies.qffl import needs_each_reply
from rf2.strategies.sampling import SAMPLING
from rf2.strategies.state import load_strategy_state, strategy_state

Arrays = dict[str, np.ndarray]
W0: Arrays = {"a": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32), "b": np.array([0.1, -0.4])}


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the simulation engine sets before a ServerApp builds Messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class _Nodes:
    """Stand-in Grid: ``configure_train`` only asks for node ids (rf2's RoundGrid shows
    exactly the selected ones)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def configure(strategy: Any, rnd: int, w: Arrays, n: int) -> list[Message]:
    msgs = strategy.configure_train(rnd, _record(w), ConfigRecord({"lr": 1.0}), _Nodes(n))
    return sorted(msgs, key=lambda m: m.metadata.dst_node_id)


def replies_for(msgs: list[Message], clients: list[tuple[Arrays, float, float]]) -> list[Message]:
    """One reply per (local weights, num-examples, train_loss), like rf2's client."""
    return [
        Message(
            RecordDict({"arrays": _record(w), "metrics": MetricRecord(
                {"num-examples": n, "train_loss": loss})}),
            reply_to=m,
        )
        for m, (w, n, loss) in zip(msgs, clients, strict=True)
    ]


def run_round(strategy: Any, rnd: int, w: Arrays, clients: list[tuple[Arrays, float, float]]
              ) -> Arrays:
    msgs = configure(strategy, rnd, w, len(clients))
    arrays, _ = strategy.aggregate_train(rnd, replies_for(msgs, clients))
    return {k: v.numpy() for k, v in arrays.items()}


def clients_around(w: Arrays, seed: int, n: int = 3) -> list[tuple[Arrays, float, float]]:
    rng = np.random.default_rng(seed)
    return [({k: (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype) for k, v in w.items()},
             float(rng.integers(1, 20)), float(rng.uniform(0.5, 3.0))) for _ in range(n)]


def build(name: str, opt: str = "none", lr: float = 1.0, **kw: Any) -> Any:
    return build_strategy(StrategyConfig(name=name, server_optimizer=opt, **kw),
                          ClientConfig(lr=lr))


def qffl_formula(w: Arrays, clients: list[tuple[Arrays, float, float]], q: float, lr: float
                 ) -> Arrays:
    """Li et al.: L = 1/lr, Δw_k = L(w_t − w_k), Δ_k = F^q Δw_k,
    h_k = q F^(q−1) ||Δw_k||² + L F^q, w_(t+1) = w_t − ΣΔ_k / Σh_k."""
    big_l = 1.0 / lr
    deltas, hs = [], 0.0
    for wk, _, f in clients:
        dw = {k: big_l * (w[k].astype(np.float64) - wk[k]) for k in w}
        sq = sum(float((d**2).sum()) for d in dw.values())
        deltas.append({k: f**q * d for k, d in dw.items()})
        hs += q * f ** (q - 1) * sq + big_l * f**q
    return {k: w[k] - sum(d[k] for d in deltas) / hs for k in w}


# -- every combination ---------------------------------------------------------------
@pytest.mark.parametrize("opt", ["none", "adagrad", "adam", "yogi", "momentum"])
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "qffl"])
def test_every_combination_builds_and_trains(name: str, opt: str) -> None:
    s = build(name, opt, proximal_mu=0.1)
    assert (s.fraction_train, s.fraction_evaluate) == (1.0, 0.0)
    assert s.min_train_nodes == s.min_available_nodes == s.min_evaluate_nodes == 0
    w = W0
    for rnd in (1, 2):
        msgs = configure(s, rnd, w, 3)
        assert len(msgs) == 3
        cfg = msgs[0].content["config"]
        assert cfg.get("proximal-mu") == (0.1 if name == "fedprox" else None)
        arrays, metrics = s.aggregate_train(rnd, replies_for(msgs, clients_around(w, rnd)))
        new = {k: v.numpy() for k, v in arrays.items()}
        assert list(new) == list(w) and all(new[k].shape == w[k].shape for k in w)
        assert all(np.isfinite(v).all() and not np.allclose(v, w[k]) for k, v in new.items())
        assert metrics is not None and "train_loss" in metrics
        w = new
    assert needs_each_reply(s) == (name == "qffl")
    meta, moments = strategy_state(s)
    assert meta["class"] == type(s).__name__
    assert bool(moments) == (opt != "none")


def test_unknown_combination_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy(StrategyConfig(name="fedsgd"), ClientConfig())  # type: ignore[arg-type]


# -- FedAvg / FedProx ------------------------------------------------------------------
def test_fedavg_is_the_sample_weighted_mean() -> None:
    clients = clients_around(W0, seed=1)
    got = run_round(build("fedavg"), 1, W0, clients)
    total = sum(n for _, n, _ in clients)
    for k in W0:
        want = sum(n * wk[k].astype(np.float64) for wk, n, _ in clients) / total
        np.testing.assert_allclose(got[k], want, rtol=1e-6)


def test_fedprox_with_optimizer_is_fedopt_on_the_mean() -> None:
    """FedProx changes the clients only: on the same replies, FedProxAdam == FedAdam."""
    clients = clients_around(W0, seed=2)
    a = run_round(build("fedprox", "adam", proximal_mu=0.5), 1, W0, clients)
    b = run_round(build("fedavg", "adam"), 1, W0, clients)
    for k in W0:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


class _LeastSquares(torch.nn.Module):
    """loss = mean_i ½(h_i · w − t_i)²: the rf2 model interface on a closed-form loss."""

    def __init__(self, w0: np.ndarray) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))

    def loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((history.double() @ self.w - target.double()) ** 2).mean()


def test_fedprox_client_step_includes_mu_times_distance() -> None:
    """Two full-batch SGD steps (the prox gradient mu·(w − w_t) is zero at the first)."""
    h = np.array([[1, 2], [3, -1], [0, 1]], np.int64)
    t = np.array([2, -1, 1], np.int64)
    w0, lr, mu = np.array([0.3, -0.2]), 0.05, 0.7

    def grad(w: np.ndarray) -> np.ndarray:
        return h.T @ (h @ w - t) / len(t)

    w1 = w0 - lr * grad(w0)
    w2 = w1 - lr * (grad(w1) + mu * (w1 - w0))
    model = _LeastSquares(w0)
    train_locally(model, h, t, lr=lr, local_epochs=2, batch_size=0, proximal_mu=mu)
    np.testing.assert_allclose(model.w.detach().numpy(), w2, rtol=1e-12)


# -- q-FFL ---------------------------------------------------------------------------
@pytest.mark.parametrize("q", [0.0, 2.0])
def test_qffl_matches_li_et_al(q: float) -> None:
    clients = clients_around(W0, seed=3)
    got = run_round(build("qffl", q=q, lr=0.5), 1, W0, clients)
    want = qffl_formula(W0, clients, q=q, lr=0.5)
    for k in W0:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_qffl_equals_flowers_qfedavg(q: float = 2.5) -> None:
    """rf2's QFFL only skips QFedAvg's per-reply gc.collect(): same numbers.
    (One case: Flower's QFedAvg itself is the slow one here.)"""
    clients = clients_around(W0, seed=9)
    ours = build("qffl", q=q, lr=0.25)
    flwr_s = QFedAvg(client_learning_rate=0.25, q=q, **SAMPLING)
    msgs = configure(ours, 1, W0, len(clients))
    replies = replies_for(msgs, clients)
    got, _ = ours.aggregate_train(1, replies)
    assert all(len(r.content["arrays"]) == len(W0) for r in replies)  # left intact
    msgs = configure(flwr_s, 1, W0, len(clients))
    want, _ = flwr_s.aggregate_train(1, replies_for(msgs, clients))
    for k in W0:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())


def test_qffl_q0_is_the_unweighted_mean() -> None:
    """q = 0: w_t − Σ L(w_t − w_k) / (K L) = mean_k w_k (clients count equally)."""
    clients = clients_around(W0, seed=4)
    got = run_round(build("qffl", q=0.0), 1, W0, clients)
    for k in W0:
        want = np.mean([wk[k].astype(np.float64) for wk, _, _ in clients], axis=0)
        np.testing.assert_allclose(got[k], want, rtol=1e-6)


def test_qffl_adagrad_is_adagrad_towards_the_qffl_point() -> None:
    s = build("qffl", "adagrad", lr=0.5, q=2.0, server_lr=0.1, tau=1e-3)
    w, v = dict(W0), {k: np.zeros_like(x, dtype=np.float64) for k, x in W0.items()}
    for rnd in (1, 2):
        clients = clients_around(w, seed=10 + rnd)
        target = qffl_formula(w, clients, q=2.0, lr=0.5)
        delta = {k: target[k] - w[k] for k in w}  # FedOpt's pseudo-gradient
        v = {k: v[k] + delta[k] ** 2 for k in w}  # Adagrad: m_t = Δ_t (beta_1 = 0)
        want = {k: w[k] + 0.1 * delta[k] / (np.sqrt(v[k]) + 1e-3) for k in w}
        got = run_round(s, rnd, w, clients)
        for k in w:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        w = got


# -- FedAvgM ------------------------------------------------------------------------------
def test_fedavg_momentum_equals_flowers_fedavgm_step_for_step() -> None:
    """rf2's FedAvgMomentum is Flower's FedAvgM arithmetic (w_t snapshotted each round)."""
    from flwr.serverapp.strategy import FedAvgM

    ours = build("fedavg", "momentum", server_lr=0.3, server_momentum=0.8)
    flowers = FedAvgM(server_learning_rate=0.3, server_momentum=0.8, **SAMPLING)
    w = dict(W0)
    for rnd in (1, 2, 3):
        clients = clients_around(w, seed=40 + rnd)
        a, b = run_round(ours, rnd, w, clients), run_round(flowers, rnd, w, clients)
        for k in w:
            np.testing.assert_array_equal(a[k], b[k])
        assert any(not np.allclose(a[k], w[k]) for k in w)
        w = a


def test_fedavg_momentum_is_sgd_with_momentum_on_the_pseudo_gradient() -> None:
    """g_t = w_t - mean_t, m_1 = g_1, m_t = beta m_(t-1) + g_t, w_(t+1) = w_t - eta m_t;
    eta 1 and beta 0 is plain FedAvg."""
    s = build("fedavg", "momentum", server_lr=0.5, server_momentum=0.9)
    w, m = dict(W0), None
    for rnd in (1, 2, 3):
        clients = clients_around(w, seed=50 + rnd)
        total = sum(n for _, n, _ in clients)
        mean = {k: sum(n * wk[k].astype(np.float64) for wk, n, _ in clients) / total for k in w}
        g = {k: w[k] - mean[k] for k in w}
        m = g if m is None else {k: 0.9 * m[k] + g[k] for k in w}
        want = {k: w[k] - 0.5 * m[k] for k in w}
        got = run_round(s, rnd, w, clients)
        for k in w:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        w = got
    clients = clients_around(W0, seed=60)
    plain = run_round(build("fedavg", "momentum", server_lr=1.0, server_momentum=0.0), 1, W0,
                      clients)
    fedavg = run_round(build("fedavg"), 1, W0, clients)
    for k in W0:
        np.testing.assert_array_equal(plain[k], fedavg[k])


def test_server_momentum_out_of_range_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.server_momentum"):
        StrategyConfig(server_optimizer="momentum", server_momentum=1.0).validate()


@pytest.mark.parametrize(("name", "opt"), [("qffl", "yogi"), ("fedavg", "momentum"),
                                           ("qffl", "momentum")])
def test_server_optimizer_state_round_trips(name: str, opt: str) -> None:
    a = build(name, opt, q=1.0)
    run_round(a, 1, W0, clients_around(W0, seed=5))
    meta, moments = strategy_state(a)
    assert moments  # the momentum / moments are in the checkpoint
    b = build(name, opt, q=1.0)
    load_strategy_state(b, meta, moments)
    clients = clients_around(W0, seed=6)
    ra, rb = run_round(a, 2, W0, clients), run_round(b, 2, W0, clients)
    for k in W0:
        np.testing.assert_array_equal(ra[k], rb[k])


# -- a mean rf2 computed itself (HeteroFL, per-row averaging) ---------------------------
def test_precomputed_mean_goes_through_the_server_optimizer() -> None:
    clients = clients_around(W0, seed=7)
    mean = {k: (x + 1.0).astype(x.dtype) for k, x in W0.items()}  # any rule's aggregate
    s = build("fedavg", "adagrad", server_lr=0.1, tau=1e-3)
    msgs = configure(s, 1, W0, len(clients))
    arrays, metrics = aggregate_precomputed(s, 1, replies_for(msgs, clients),
                                            lambda: mean, lambda: [])
    assert arrays is not None and metrics is not None
    for k in W0:  # first Adagrad step: w + eta·Δ/(|Δ| + tau), Δ = 1
        np.testing.assert_allclose(arrays[k].numpy(), W0[k] + 0.1 / (1 + 1e-3), rtol=1e-6)
    total = sum(n for _, n, _ in clients)
    want_loss = sum(n * f for _, n, f in clients) / total
    assert metrics["train_loss"] == pytest.approx(want_loss)


def test_precomputed_rule_gives_qffl_each_padded_reply() -> None:
    clients = clients_around(W0, seed=8)
    padded = [w for w, _, _ in clients]  # stand-in for heterofl.pad / mask_untouched
    s = build("qffl", q=2.0)
    msgs = configure(s, 1, W0, len(clients))
    stale = [({k: np.zeros_like(v) for k, v in W0.items()}, n, f) for _, n, f in clients]
    arrays, _ = aggregate_precomputed(s, 1, replies_for(msgs, stale),
                                      lambda: pytest.fail("q-FFL needs each reply"),
                                      lambda: padded)
    want = qffl_formula(W0, clients, q=2.0, lr=1.0)
    assert arrays is not None
    for k in W0:
        np.testing.assert_allclose(arrays[k].numpy(), want[k], rtol=1e-5, atol=1e-7)


def test_merged_metrics_equal_flowers_averaging() -> None:
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from rf2.strategies.merge import weighted_metrics

    rng = np.random.default_rng(3)
    contents = [RecordDict({"metrics": MetricRecord({
        "num-examples": int(rng.integers(1, 50)), "train_loss": float(rng.normal()),
        "bytes-up": int(rng.integers(1000)), "hist": [float(x) for x in rng.normal(size=3)]})})
        for _ in range(40)]
    want = aggregate_metricrecords(contents, "num-examples")
    got = weighted_metrics([list(c.metric_records.values()) for c in contents], "num-examples")
    assert dict(got) == dict(want)  # bit for bit
