"""Stateful clients: FCF (``model=fcf``), the per-user state store, and a user's own
stateful model through ``model._target_``.

A user's vector never leaves its client: it is not in the federated arrays, replies or
the ``model/`` part of a checkpoint; the store keeps it between rounds (in-process, or in
a Ray actor), evaluation scores each user with its own vector, resume restores it.
"""

from __future__ import annotations

import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import plugin_module, read_rows, small_run, without_timing

from rf2.cli.support import run_job
from rf2.core.config import DatasetConfig, FCFConfig, ModelConfig
from rf2.core.errors import ConfigError
from rf2.data import load_dataset
from rf2.fl.params import load_numpy_into, state_to_numpy
from rf2.fl.user_state import MessageRows, UserStateStore
from rf2.model import FCF, build_model
from rf2.model.base import CANDIDATE
from rf2.model.local_training import train_locally
from rf2.runs.run_folder import RunFolder


def _ds():
    return load_dataset(DatasetConfig(num_users=60, num_items=50, num_groups=3), seed=2)


def fcf_run(**overrides: object) -> dict:
    """``small_run`` with FCF (full softmax, its defaults otherwise)."""
    return small_run(**{"model.name": "fcf", **overrides})


# -- the model ----------------------------------------------------------------------------


def test_fcf_declares_its_user_table_as_per_user_state() -> None:
    ds = _ds()
    model = build_model(ModelConfig(name="fcf", dim=8), ds, seed=1)
    assert isinstance(model, FCF)
    assert model.user_state_names() == ("user_table",)
    assert model.user_table.shape == (ds.num_users, 8)
    assert model.row_tables() == {"item_table": {CANDIDATE}, "bias": {CANDIDATE}}
    assert model.dense_parameters() == []
    # The federated state leaves the user table out; loading it leaves the table alone.
    arrays = state_to_numpy(model)
    assert set(arrays) == {"item_table", "bias"}
    before = model.user_table.detach().clone()
    arrays["item_table"] = arrays["item_table"] + 1.0
    load_numpy_into(model, arrays)
    torch.testing.assert_close(model.user_table.detach(), before)
    torch.testing.assert_close(model.item_table.detach(), torch.from_numpy(arrays["item_table"]))
    # Deterministic from the run seed, different for another seed.
    again = build_model(ModelConfig(name="fcf", dim=8), ds, seed=1)
    torch.testing.assert_close(again.user_table, model.user_table)
    other = build_model(ModelConfig(name="fcf", dim=8), ds, seed=2)
    assert not torch.equal(other.user_table, model.user_table)


def test_fcf_scores_each_user_with_its_own_vector() -> None:
    model = build_model(ModelConfig(name="fcf", dim=8), _ds(), seed=1)
    hist = torch.full((2, 3), -1)
    users = torch.tensor([4, 9])
    want = model.user_table[users] @ model.item_table.T + model.bias
    torch.testing.assert_close(model.score_users(hist, users), want)
    with pytest.raises(ValueError, match="user ids"):
        model.score_users(hist)


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_fcf_user_step_is_the_gradient_step_of_its_loss(loss: str) -> None:
    """``fit_user_state`` writes the gradient out by hand: it equals autograd's step."""
    cfg = ModelConfig(name="fcf", dim=8, loss=loss, num_negatives=10,
                      fcf=FCFConfig(user_steps=1, user_lr=0.5))
    model = FCF(50, 7, cfg, seed=1)
    with torch.no_grad():
        model.bias.normal_(generator=torch.Generator().manual_seed(0))
    target, users = torch.tensor([3, 5, 9, 3]), torch.full((4,), 2)
    hist = torch.full((4, 3), -1)
    sample = model.draw_sample(torch.Generator().manual_seed(0))
    if sample.negatives is not None:  # one accidental hit (the target 5), masked
        sample = type(sample)(negatives=torch.cat([sample.negatives, torch.tensor([5])]))
    start = model.user_table[2].detach().clone()
    loss_value = model.loss(hist, target, sample, users=users)
    grad = torch.autograd.grad(loss_value, model.user_table)[0].to_dense()[2]
    model.fit_user_state(hist, target, sample, users)
    torch.testing.assert_close(model.user_table[2].detach(), start - 0.5 * grad)


def test_local_training_moves_only_the_users_row_and_touched_items() -> None:
    ds = _ds()
    model = build_model(ModelConfig(name="fcf", dim=8, loss="sampled", num_negatives=5),
                        ds, seed=1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    user = 3
    items = ds.train_of(user)
    hist = np.full((len(items), 2), -1)
    train_locally(model, hist, items, lr=1.0, local_epochs=1, batch_size=0, seed=4, user=user)
    changed_users = torch.nonzero((model.user_table != before["user_table"]).any(1)).flatten()
    assert changed_users.tolist() == [user]
    changed_items = set(torch.nonzero((model.item_table != before["item_table"]).any(1))
                        .flatten().tolist())
    assert set(items.tolist()) <= changed_items and len(changed_items) <= len(set(items)) + 5
    with pytest.raises(ValueError, match="user="):
        train_locally(model, hist, items, lr=1.0, local_epochs=1, batch_size=0)


# -- the store ----------------------------------------------------------------------------


def test_store_keeps_rows_and_its_memory_is_users_times_dim_times_4() -> None:
    ds = _ds()
    model = build_model(ModelConfig(name="fcf", dim=8), ds, seed=1)
    store = UserStateStore.of_model(model)
    assert store is not None and UserStateStore.of_model(
        build_model(ModelConfig(name="two_tower", dim=8), ds, seed=1)) is None
    assert store.nbytes() == ds.num_users * 8 * 4
    rows = MessageRows.fetch(store, model, [5, 2])
    np.testing.assert_array_equal(rows.rows["user_table"][1], model.user_table[2].detach().numpy())
    worker = build_model(ModelConfig(name="fcf", dim=8), ds, seed=99)  # another skeleton
    rows.load_into(worker, 2)
    torch.testing.assert_close(worker.user_table[2], model.user_table[2])
    with torch.no_grad():
        worker.user_table[2] += 1.0
    rows.keep(worker, 2)
    rows.write_back(store)
    table = store.tables()["user_table"]
    np.testing.assert_allclose(table[2], model.user_table[2].detach().numpy() + 1.0)
    np.testing.assert_array_equal(table[5], model.user_table[5].detach().numpy())  # not kept
    with pytest.raises(TypeError, match="to_ray"):
        pickle.dumps(store)  # an in-process store is never shipped with a spec


# -- federated runs -------------------------------------------------------------------------


def test_fcf_runs_federated_learns_and_keeps_vectors_on_the_clients(tmp_path: Path) -> None:
    run = run_job(fcf_run(num_rounds=4, checkpoint_every=2), tmp_path / "run")
    rows = read_rows(run)
    assert rows[-1]["recall@20"] > rows[0]["recall@20"]
    assert "tier/all/recall@20" in rows[-1]
    ckpt = RunFolder(run).latest_checkpoint()
    assert ckpt is not None
    assert not any(k.startswith("model/user_table") for k in ckpt.arrays)
    stored = ckpt.arrays["user_state/user_table"]  # the store, checkpointed
    init = build_model(ModelConfig(name="fcf", dim=16), load_dataset(
        DatasetConfig(name="synthetic", num_users=200, num_items=150, num_groups=5), 7), 7)
    moved = np.flatnonzero(np.any(stored != init.user_table.detach().numpy(), axis=1))
    # 4 rounds x 20 clients: the users that trained moved, the others kept their start.
    assert 20 <= len(moved) <= 80
    final = torch.load(run / "model.pt")
    np.testing.assert_array_equal(final["user_table"].numpy(), stored)
    # What a client sends up is (at most) the item part with its row ids, never the
    # user table (12.8 kB here, more than the 10.2 kB item part).
    item_bytes = sum(v.nbytes for k, v in ckpt.arrays.items() if k.startswith("model/"))
    per_client = rows[1]["bytes_up"] / rows[1]["num_clients_trained"]
    assert per_client <= 1.25 * item_bytes < item_bytes + stored.nbytes


def test_fcf_with_heterofl_width_is_one_config_error(tmp_path: Path) -> None:
    cfg = fcf_run(devices={"profile": "rf2-3tier"}, optimization={"width": {"low": 0.5}})
    with pytest.raises(ConfigError) as info:
        run_job(cfg, tmp_path / "run")
    assert info.value.field == "optimization.width" and "at_width" in info.value.allowed
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("overrides", [
    {"strategy.name": "fedprox", "strategy.proximal_mu": 0.1},
    {"strategy.name": "qffl", "strategy.server_optimizer": "none"},
    {"strategy.name": "fedbuff", "strategy.server_optimizer": "none"},
    {"strategy.server_optimizer": "adam", "strategy.server_lr": 0.03, "model.loss": "sampled",
     "model.num_negatives": 20},
    {"privacy.name": "dp", "privacy.noise_multiplier": 0.1, "privacy.clip_norm": 1.0},
    {"devices.profile": "rf2-3tier", "optimization.prune_rate": {"low": 0.5},
     "optimization.exclude_tiers": ["low"]},
    {"optimization.per_row_embedding_avg": True},
])
def test_fcf_works_with_the_strategies_and_tier_policies(tmp_path: Path,
                                                         overrides: dict) -> None:
    rows = read_rows(run_job(fcf_run(num_rounds=3, **overrides), tmp_path / "run"))
    assert all(np.isfinite(r["recall@20"]) for r in rows if "recall@20" in r)
    assert sum(r["num_clients_trained"] for r in rows) > 0
    if "devices.profile" in overrides:
        assert "tier/mid/recall@20" in rows[-1]


def test_partial_aggregation_gives_the_per_client_result(tmp_path: Path) -> None:
    a = without_timing(read_rows(run_job(fcf_run(), tmp_path / "a")))
    b = without_timing(read_rows(run_job(
        fcf_run(**{"simulation.partial_aggregation": False}), tmp_path / "b")))
    for x, y in zip(a, b, strict=True):
        assert x["recall@20"] == pytest.approx(y["recall@20"], rel=1e-5)
        assert x["num_clients_trained"] == y["num_clients_trained"]


def test_fcf_central_trains_every_user_vector(tmp_path: Path) -> None:
    run = run_job(fcf_run(mode="central", **{"central.epochs": 2}), tmp_path / "c")
    rows = read_rows(run)
    assert rows[-1]["recall@20"] > rows[0]["recall@20"]
    final = torch.load(run / "model.pt")["user_table"]
    init = build_model(ModelConfig(name="fcf", dim=16), load_dataset(
        DatasetConfig(name="synthetic", num_users=200, num_items=150, num_groups=5), 7), 7)
    assert bool((final != init.user_table.detach()).any(1).all())


# -- a user's own stateful model ------------------------------------------------------------

PLUGIN = '''
import torch
from torch import nn
from rf2.model import TwoTower


class PersonalTwoTower(TwoTower):
    """The two-tower plus a personal offset vector per user, kept on the user's device."""

    def __init__(self, num_items, num_users, cfg, seed=0):
        super().__init__(num_items, cfg, seed=seed)
        self.personal = nn.Parameter(torch.zeros(num_users, cfg.dim))  # (U, D)

    @classmethod
    def from_dataset(cls, dataset, cfg, seed):
        return cls(dataset.num_items, dataset.num_users, cfg, seed=seed)

    def user_state_names(self):
        return ("personal",)

    def score_users(self, histories, users=None):
        return self.score_all(self.user_embedding(histories) + self.personal[users])

    def loss(self, history, target, sample=None, users=None):
        user = self.user_embedding(history) + self.personal[users]
        return self.item_loss(user, target, sample)
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = plugin_module(tmp_path, monkeypatch, "mylab_personal", PLUGIN)
    yield name
    sys.modules.pop(name, None)


def test_a_users_own_stateful_model_runs_federated_and_central(plugin: str,
                                                               tmp_path: Path) -> None:
    target = f"{plugin}.PersonalTwoTower"
    run = run_job(small_run(**{"model._target_": target, "model.loss": "full",
                               "num_rounds": 3}), tmp_path / "f")
    rows = read_rows(run)
    assert rows[-1]["recall@20"] > rows[0]["recall@20"]
    personal = torch.load(run / "model.pt")["personal"]
    trained = int((personal != 0).any(1).sum())
    assert 20 <= trained <= 60  # 3 rounds x 20 clients: only they moved their own vector
    central = run_job(small_run(**{"model._target_": target, "mode": "central",
                                   "central.epochs": 1}), tmp_path / "c")
    assert bool((torch.load(central / "model.pt")["personal"] != 0).any(1).all())


# -- Ray, resume, real data (slow) --------------------------------------------------------


@pytest.mark.slow
def test_ray_store_is_an_actor_and_ray_runs_match_inprocess(
        tmp_path: Path, plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import ray

    ray_tmp = tempfile.mkdtemp(prefix="rf2u")
    try:
        ray.init(num_cpus=1, _temp_dir=ray_tmp, include_dashboard=False, log_to_driver=False)
        try:
            table = np.arange(4000 * 16, dtype=np.float32).reshape(4000, 16)
            store = UserStateStore({"user_table": table})
            store.to_ray()
            assert len(pickle.dumps(store)) < 2000 < table.nbytes  # the handle, not the rows

            @ray.remote(num_cpus=0)
            def client(s: UserStateStore) -> None:  # a worker writes its users' rows
                rows = s.fetch([7, 3])
                s.write([7, 3], {"user_table": rows["user_table"] * -1})

            ray.get(client.remote(store))
            store.from_ray()
        finally:
            ray.shutdown()
        got = store.tables()["user_table"]
        np.testing.assert_array_equal(got[[3, 7]], -table[[3, 7]])
        np.testing.assert_array_equal(np.delete(got, [3, 7], 0), np.delete(table, [3, 7], 0))
        cfg = fcf_run(simulation={"backend": "ray", "ray_temp_dir": ray_tmp})
        on_ray = run_job(cfg, tmp_path / "ray")
        # A user's own stateful model on Ray (its module importable by the workers).
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")]))
        personal = run_job(small_run(**{
            "model._target_": f"{plugin}.PersonalTwoTower", "model.loss": "full",
            "simulation": {"backend": "ray", "ray_temp_dir": ray_tmp}}), tmp_path / "p")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    here = run_job(fcf_run(), tmp_path / "here")
    assert without_timing(read_rows(on_ray)) == without_timing(read_rows(here))
    torch.testing.assert_close(torch.load(on_ray / "model.pt")["user_table"],
                               torch.load(here / "model.pt")["user_table"])
    rows = read_rows(personal)
    assert rows[-1]["recall@20"] > rows[0]["recall@20"]
    assert 20 <= int((torch.load(personal / "model.pt")["personal"] != 0).any(1).sum()) <= 60


@pytest.mark.slow
def test_fcf_resumes_after_sigkill_to_the_uninterrupted_result(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    args = ["model=fcf", "simulation=inprocess", "num_rounds=5", "checkpoint_every=1",
            "seed=5", "dataset.num_users=300", "clients_per_round=30", "progress=false"]

    def cli(run_dir: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "rf2", *args, f"hydra.run.dir={run_dir}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)

    reference, victim = cli(tmp_path / "reference"), cli(tmp_path / "victim")
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # killed after round 2's row: mid-round 3
        if metrics.exists() and metrics.read_text().count("\n") > 2:
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "victim" / "DONE").exists()
    resumed = subprocess.run([sys.executable, "-m", "rf2", f"resume={tmp_path / 'victim'}",
                              f"hydra.run.dir={tmp_path / 'resume-log'}"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0
    got, want = read_rows(tmp_path / "victim"), read_rows(tmp_path / "reference")
    assert [r["round"] for r in got] == list(range(6))
    assert without_timing(got) == without_timing(want)
    torch.testing.assert_close(torch.load(tmp_path / "victim" / "model.pt")["user_table"],
                               torch.load(tmp_path / "reference" / "model.pt")["user_table"])


@pytest.mark.slow
def test_fcf_beats_popularity_on_movielens_100k(ml100k: Path, tmp_path: Path) -> None:
    # 10 rounds of 100 clients (each user trains about once): 0.199 vs 0.159 (seed 0).
    cfg = {"num_rounds": 10, "clients_per_round": 100, "progress": False,
           "dataset": {"name": "movielens100k", "path": str(ml100k)},
           "model": {"name": "fcf"}, "simulation": {"backend": "inprocess"},
           "eval": {"every": 10, "distributions": False}}
    rows = read_rows(run_job(cfg, tmp_path / "run"))
    assert rows[-1]["recall@20"] > rows[0]["popularity/recall@20"] > rows[0]["recall@20"]
