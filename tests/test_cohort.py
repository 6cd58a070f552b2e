"""Cohort-vectorised training equals per-user training (the reference path), 1e-5."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import read_rows, small_run, without_timing

from rf2.cli.support import run_job
from rf2.core.config import DatasetConfig, IndexConfig, ModelConfig
from rf2.data import load_dataset
from rf2.fl.params import load_numpy_into, state_to_numpy
from rf2.model import build_model
from rf2.model.cohort import ClientJob, train_cohort
from rf2.model.examples import user_examples
from rf2.model.local_training import train_locally
from rf2.optim.heterofl import extract, kept, rules_for, slice_spec

USERS = [0, 3, 5, 8, 13, 21]


@pytest.fixture(scope="module")
def ds():  # noqa: ANN201
    return load_dataset(DatasetConfig(num_users=40, num_items=60, num_groups=4,
                                      mean_clicks_per_user=8), seed=1)


def _cfg(name: str, loss: str, **index: object) -> ModelConfig:
    icfg = IndexConfig(nodes_per_level=[4, 3], warmup_steps=0, **index)  # type: ignore[arg-type]
    return ModelConfig(name=name, dim=8, loss=loss, num_negatives=7, index=icfg)  # type: ignore[arg-type]


def _global(cfg: ModelConfig, ds, step: int = 3) -> tuple[torch.nn.Module, dict]:  # noqa: ANN001
    model = build_model(cfg, ds, seed=4)
    # A trained-looking global model: non-zero biases, spread rows.
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    if hasattr(model, "set_training_progress"):
        model.set_training_progress(step, 10)
    return model, state_to_numpy(model)


def _check(cfg: ModelConfig, ds, *, lr: float = 0.5, epochs: int = 1, bs: int = 0,  # noqa: ANN001
           mu: float = 0.0, width: float = 1.0, users: list[int] = USERS) -> None:
    model, arrays = _global(cfg, ds)
    if width < 1.0:
        shapes = {k: v.shape for k, v in arrays.items()}
        arrays = extract(arrays, slice_spec(shapes, width,
                                            rules_for(shapes, cfg.dim, model.width_rules())))
        cfg = dataclasses.replace(cfg, dim=kept(cfg.dim, width))
        model = build_model(cfg, ds, seed=4)
        if hasattr(model, "set_training_progress"):
            model.set_training_progress(3, 10)
    jobs = []
    for u in users:
        h, t = user_examples(ds, u)
        jobs.append(ClientJob(h, t, seed=1000 + u))
    updates = train_cohort(model, arrays, jobs, lr=lr, local_epochs=epochs, batch_size=bs,
                           proximal_mu=mu)
    assert len(updates) == len(jobs)
    moved = 0.0
    for job, upd in zip(jobs, updates, strict=True):
        ref = build_model(cfg, ds, seed=4)
        if hasattr(ref, "set_training_progress"):
            ref.set_training_progress(3, 10)
        load_numpy_into(ref, arrays)
        res = train_locally(ref, job.histories, job.targets, lr=lr, local_epochs=epochs,
                            batch_size=bs, proximal_mu=mu, seed=job.seed)
        assert upd.num_examples == res.num_examples
        assert upd.loss_before == pytest.approx(res.loss_before, abs=1e-5)
        assert upd.loss_after == pytest.approx(res.loss_after, abs=1e-5)
        want = state_to_numpy(ref)
        got = upd.dense(arrays)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)
            moved += float(np.abs(value - arrays[name]).sum())
        # Rows outside the reply did not move in the reference either.
        for name, rows in upd.rows.items():
            outside = np.setdiff1d(np.arange(arrays[name].shape[0]), rows)
            np.testing.assert_array_equal(want[name][outside], arrays[name][outside])
    assert moved > 0  # something trained


@pytest.mark.parametrize("name", ["two_tower", "hier_index"])
@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_cohort_equals_per_user_full_batch(ds, name: str, loss: str) -> None:  # noqa: ANN001
    _check(_cfg(name, loss), ds)


@pytest.mark.parametrize("name", ["two_tower", "hier_index"])
def test_cohort_equals_per_user_fedprox_minibatches_epochs(ds, name: str) -> None:  # noqa: ANN001
    _check(_cfg(name, "sampled"), ds, epochs=2, bs=3, mu=0.3)
    _check(_cfg(name, "full"), ds, epochs=2, bs=4, mu=0.1)


def test_cohort_equals_per_user_heterofl_width(ds) -> None:  # noqa: ANN001
    _check(_cfg("hier_index", "sampled"), ds, width=0.5)
    _check(_cfg("two_tower", "full"), ds, width=0.25, bs=2)


def test_cohort_balance_sample_and_single_user(ds) -> None:  # noqa: ANN001
    # Catalogue larger than the balance sample: the balance term uses sampled rows.
    _check(_cfg("hier_index", "sampled", balance_sample=16), ds, users=[7])
    _check(_cfg("hier_index", "full", balance_sample=16), ds, users=[2, 9])


def test_sampled_cohort_touches_only_its_rows(ds) -> None:  # noqa: ANN001
    cfg = _cfg("two_tower", "sampled")
    model, arrays = _global(cfg, ds)
    h, t = user_examples(ds, 5)
    (upd,) = train_cohort(model, arrays, [ClientJob(h, t, seed=3)], lr=1.0, local_epochs=1,
                          batch_size=0)
    hist_items = np.unique(h[h >= 0])
    np.testing.assert_array_equal(upd.rows["history_table"], hist_items)
    assert set(t.tolist()) <= set(upd.rows["item_table"].tolist())
    assert len(upd.rows["item_table"]) <= len(set(t.tolist())) + cfg.num_negatives
    assert upd.values["item_table"].shape == (len(upd.rows["item_table"]), cfg.dim)


# -- end to end: the vectorised client app against the per-user one ------------------
# Server Adam/Yogi/Adagrad with tau = 1e-9 move a coordinate by ~eta * sign(delta): a
# delta below float32 resolution (~1e-9 on a weight of 0.05) then flips with rounding,
# so after the first server step runs agree to rounding only where no such step was
# taken. Hence: server optimizers compared over one round, the rest over three.
@pytest.mark.parametrize(("extra", "rounds"), [
    ({"strategy": {"name": "fedprox", "proximal_mu": 0.5, "server_optimizer": "none"},
      "client": {"local_epochs": 2, "batch_size": 4}}, 3),
    ({"strategy": {"name": "fedprox", "proximal_mu": 0.5, "server_optimizer": "adam"},
      "model": {"dim": 16, "name": "two_tower"}}, 1),
    ({"strategy": {"name": "qffl", "q": 1.0, "server_optimizer": "none"},
      "model": {"dim": 16, "name": "two_tower", "loss": "sampled", "num_negatives": 20}}, 3),
    # HeteroFL widths and compression by tier, faults for some users.
    ({"devices": {"profile": "rf2-3tier"}, "strategy": {"server_optimizer": "none"},
      "optimization": {"width": {"low": 0.5}, "quant_bits": {"mid": 8}},
      "fault_injection": [{"kind": "raise", "users": list(range(0, 200, 7)), "rounds": [2]},
                          {"kind": "nan", "users": list(range(3, 200, 11))}]}, 3),
])
def test_vectorised_run_matches_per_user_run(tmp_path, extra: dict, rounds: int) -> None:  # noqa: ANN001
    rows = {}
    for vec in (True, False):
        cfg = small_run(num_rounds=rounds, **{"simulation.vectorise": vec})
        for key, value in extra.items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        run_job(cfg, tmp_path / str(vec))
        rows[vec] = without_timing(read_rows(tmp_path / str(vec)))
    assert len(rows[True]) == len(rows[False]) == rounds + 1
    assert rows[True][-1]["num_clients_trained"] > 0
    for a, b in zip(rows[True], rows[False], strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
            else:
                assert value == b[key], key
    assert rows[True][-1]["recall@20"] != rows[True][0]["recall@20"]
