"""Partial aggregation inside a cohort: a message replies sum_k n_k Δ_k and sum_k n_k, and
the server's round equals the per-user path's to rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_rows, small_run, without_timing

from rf2.cli.support import run_job
from rf2.core.config import DatasetConfig, IndexConfig, ModelConfig
from rf2.data import load_dataset
from rf2.fl import client as client_module
from rf2.model import build_model
from rf2.model.cohort import ClientJob, summed_step, train_cohort
from rf2.model.examples import user_examples
from rf2.optim import sparse

USERS = [0, 3, 5, 8, 13, 21, 30]


@pytest.fixture(scope="module")
def ds():  # noqa: ANN201
    return load_dataset(DatasetConfig(num_users=40, num_items=60, num_groups=4,
                                      mean_clicks_per_user=8), seed=1)


def _global(cfg: ModelConfig, ds) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:  # noqa: ANN001
    model = build_model(cfg, ds, seed=4)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.set_training_progress(3, 10)
    return model, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "loss"), [("two_tower", "full"), ("two_tower", "sampled"),
                                            ("hier_index", "full"), ("hier_index", "sampled")])
def test_summed_step_equals_the_sum_of_client_updates(ds, name: str, loss: str) -> None:  # noqa: ANN001
    icfg = IndexConfig(nodes_per_level=[4, 3], warmup_steps=0)
    cfg = ModelConfig(name=name, dim=8, loss=loss, num_negatives=7, index=icfg)  # type: ignore[arg-type]
    model, arrays = _global(cfg, ds)
    jobs = [ClientJob(*user_examples(ds, u), seed=100 + u) for u in USERS]
    summed, clients = summed_step(model, arrays, jobs, lr=0.5)
    updates = train_cohort(model, arrays, jobs, lr=0.5, local_epochs=1, batch_size=0)
    assert summed.weight == sum(u.num_examples for u in updates)
    for name_, g in arrays.items():
        want = np.zeros(g.shape, dtype=np.float64)
        for u in updates:
            full = u.dense(arrays)[name_].astype(np.float64)
            want += u.num_examples * (full - g)
        got = np.zeros(g.shape, dtype=np.float64)
        if name_ in summed.rows:
            got[summed.rows[name_]] = summed.deltas[name_]
        else:
            got = summed.deltas[name_]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))
    for s, u in zip(clients, updates, strict=True):
        assert s.num_examples == u.num_examples
        assert s.loss_before == pytest.approx(u.loss_before, rel=1e-5)
        for table, rows in u.rows.items():
            np.testing.assert_array_equal(s.rows[table], rows)


def _close_rows(got: list[dict], want: list[dict], touched_bytes: bool = False) -> None:
    """Same rows, numbers equal to rounding (bytes, counts and faults exactly).

    ``touched_bytes``: the direct summed step reports the rows each client's update
    covers; the per-client path leaves out the rows whose float32 update rounded to no
    change, so its ``bytes_up`` may be a little smaller.
    """
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if touched_bytes and "bytes_up" in key:
                assert value <= a[key] <= 1.1 * value, key
            elif isinstance(value, float) and "bytes" not in key:
                # Metrics of rounding-equal models (a near-tie in a ranking may flip).
                assert a[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
            else:
                assert a[key] == value, key


class _Spy:
    """Counts calls of a module function and keeps its results while forwarding them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.calls = 0
        self.results: list = []
        real = getattr(module, name)

        def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls += 1
            out = real(*args, **kwargs)
            self.results.append(out)
            return out

        monkeypatch.setattr(module, name, spy)


def _pair(tmp_path: Path, tag: str, atol: float = 1e-5, **overrides: object
          ) -> tuple[list[dict], list[dict]]:
    """Rows of a run with partial sums and of the same run without; their final models
    equal to ``atol``."""
    on = run_job(small_run(**overrides), tmp_path / f"{tag}-on")
    off = run_job(small_run(**{**overrides, "simulation.partial_aggregation": False}),
                  tmp_path / f"{tag}-off")
    a, b = torch.load(on / "model.pt"), torch.load(off / "model.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol)
    return without_timing(read_rows(on)), without_timing(read_rows(off))


# Server Adagrad/Adam/Yogi with tau = 1e-9 move a coordinate by ~eta * delta / |delta|:
# a mean delta near float32 resolution changes that step visibly with its last bit, so
# (as in test_cohort.py) runs with a server optimizer are compared over one round, on
# the mean the optimizer is given (to rounding) and on the model it makes (loosely).
@pytest.mark.parametrize(("strategy", "optimizer", "loss"), [
    ("fedavg", "none", "full"),
    ("fedavg", "adagrad", "full"),
    ("fedavg", "adagrad", "sampled"),
    ("fedavg", "adam", "sampled"),
    ("fedavg", "yogi", "full"),
    ("fedavg", "momentum", "sampled"),
    ("fedprox", "adagrad", "full"),
])
def test_summed_rounds_equal_the_per_client_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, optimizer: str, loss: str,
) -> None:
    mean = _Spy(monkeypatch, sparse, "mean_with_sums")
    reference = _Spy(monkeypatch, sparse, "weighted_mean")
    direct = _Spy(monkeypatch, client_module, "summed_step")
    rounds = 3 if optimizer == "none" else 1
    atol = 1e-5 if optimizer == "none" else 1e-3
    on, off = _pair(tmp_path, "r", atol=atol, num_rounds=rounds, **{"strategy.name": strategy,
                                      "strategy.server_optimizer": optimizer,
                                      "model.loss": loss, "model.name": "two_tower"})
    assert mean.calls == rounds and direct.calls >= rounds  # summed, by the direct step
    for got, want in zip(mean.results, reference.results, strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)
    _close_rows(on, off, touched_bytes=True)
    assert on[-1]["bytes_up"] > 0 and on[-1]["recall@20"] != on[0]["recall@20"]


def test_several_local_steps_sum_the_trained_updates(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Not one full-batch step: each user trains alone, the message sums their deltas."""
    direct = _Spy(monkeypatch, client_module, "summed_step")
    for vectorise in (True, False):
        on, off = _pair(tmp_path, f"v{vectorise}", **{
            "client.local_epochs": 2, "client.batch_size": 4, "client.lr": 0.3,
            "simulation.vectorise": vectorise, "model.name": "two_tower",
            "strategy.server_optimizer": "none"})
        _close_rows(on, off)
    assert direct.calls == 0


def test_per_client_transforms_keep_single_replies(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Faulty users reply alone (and are screened) beside the sums; q-FFL never sums."""
    mean = _Spy(monkeypatch, sparse, "mean_with_sums")
    faults = [{"kind": "nan", "users": list(range(0, 200, 3)), "rounds": [2]}]
    on, off = _pair(tmp_path, "f", fault_injection=faults, **{
        "model.name": "two_tower", "strategy.server_optimizer": "none"})
    _close_rows(on, off, touched_bytes=True)
    assert on[2]["fault/non_finite"] > 0 and mean.calls == 3
    mean.calls = 0
    on, off = _pair(tmp_path, "q", **{"strategy.name": "qffl", "model.name": "two_tower"})
    assert on == off and mean.calls == 0


@pytest.mark.slow
def test_summed_replies_on_ray_equal_one_reply_per_client(tmp_path: Path) -> None:
    """Sums travel through Flower's Ray engine as through the in-process one."""
    import shutil
    import tempfile

    over = {"model.name": "two_tower", "model.loss": "sampled", "model.num_negatives": 20,
            "strategy.server_optimizer": "none", "num_rounds": 2}
    ray_tmp = tempfile.mkdtemp(prefix="rf2ray")
    try:
        ray = run_job(small_run(**over, **{"simulation.backend": "ray",
                                           "simulation.ray_temp_dir": ray_tmp}), tmp_path / "r")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    ref = run_job(small_run(**over, **{"simulation.partial_aggregation": False}), tmp_path / "i")
    _close_rows(without_timing(read_rows(ray)), without_timing(read_rows(ref)),
                touched_bytes=True)
    a, b = torch.load(ray / "model.pt"), torch.load(ref / "model.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
