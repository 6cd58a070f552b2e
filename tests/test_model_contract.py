"""The model contract (``rf2.model.base``) and ``model._target_``: a model from outside rf2.

The plug-in lives in a module written to a temporary directory on ``sys.path``, as a
user's ``mylab/models.py`` would: a two-tower whose history and candidate embeddings are
one tied table. The cohort re-implements rf2's own two-tower maths, so it must not train
this model: it trains user by user, says why once, and gives the metrics that forcing
the per-user path gives.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import plugin_module, read_rows, small_run, without_timing

from rf2.cli.support import run_job
from rf2.core.config import DatasetConfig, ModelConfig
from rf2.core.errors import ConfigError
from rf2.data import load_dataset
from rf2.fl import client as client_module
from rf2.fl.user_task import RoundRecipe, UserTask
from rf2.model import HierIndexModel, TwoTower, build_model, user_examples
from rf2.model.base import CANDIDATE, HISTORY
from rf2.model.cohort import ClientJob, NotVectorisable, train_cohort

PLUGIN = '''
import torch
from rf2.model import TwoTower
from rf2.model.base import CANDIDATE, HISTORY


class TiedTwoTower(TwoTower):
    """A two-tower whose user tower pools the candidate table itself (tied embeddings)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.history_table  # one table for both roles

    def user_embedding(self, history):
        mask = (history >= 0).unsqueeze(-1).to(self.item_table.dtype)
        emb = self.item_table[history.clamp(min=0)] * mask
        return emb.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def row_tables(self):
        tables = dict(super().row_tables())
        del tables["history_table"]
        tables["item_table"] = frozenset({HISTORY, CANDIDATE})
        return tables


def tied_model(dataset, cfg, seed):
    return TiedTwoTower.from_dataset(dataset, cfg, seed)
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The plug-in's module name, importable for this test only."""
    name = plugin_module(tmp_path, monkeypatch, "mylab_models", PLUGIN)
    yield name
    sys.modules.pop(name, None)


def _ds():
    return load_dataset(DatasetConfig(num_users=60, num_items=50, num_groups=3), seed=2)


def test_contract_of_the_shipped_models() -> None:
    ds = _ds()
    for name, cls in (("two_tower", TwoTower), ("hier_index", HierIndexModel)):
        model = build_model(ModelConfig(name=name, dim=8), ds, seed=1)
        assert type(model) is cls
        assert model.cohort_unsupported_reason() is None
        assert model.row_tables() == {"history_table": {HISTORY}, "item_table": {CANDIDATE},
                                      "bias": {CANDIDATE}}
        assert set(model.dense_parameters()) == set(model.state_dict()) - set(model.row_tables())
        hist = torch.tensor([[0, 3, -1], [-1, -1, -1]])
        want = model.score_all(model.user_embedding(hist))
        torch.testing.assert_close(model.score_users(hist), want)


def test_rows_touched_are_history_items_and_candidates() -> None:
    ds = _ds()
    model = build_model(ModelConfig(name="two_tower", dim=8, loss="sampled", num_negatives=5),
                        ds, seed=1)
    hist = np.array([[4, 2, -1], [2, 9, 1]])
    tgt = np.array([7, 3])
    sample = model.draw_sample(torch.Generator().manual_seed(3))
    rows = model.rows_touched(hist, tgt, sample)
    np.testing.assert_array_equal(rows["history_table"], [1, 2, 4, 9])
    want = np.unique(np.concatenate([tgt, sample.negatives.numpy()]))
    np.testing.assert_array_equal(rows["item_table"], want)
    np.testing.assert_array_equal(rows["bias"], want)
    full = build_model(ModelConfig(name="two_tower", dim=8, loss="full"), ds, seed=1)
    assert len(full.rows_touched(hist, tgt, None)["item_table"]) == ds.num_items


def test_a_subclass_must_declare_cohort_support(plugin: str) -> None:
    ds = _ds()
    model = build_model(ModelConfig(_target_=f"{plugin}.TiedTwoTower", dim=8), ds, seed=1)
    reason = model.cohort_unsupported_reason()
    assert reason is not None and "TiedTwoTower" in reason and "cohort_vectorisable" in reason
    assert model.row_tables()["item_table"] == {HISTORY, CANDIDATE}
    assert "history_table" not in model.state_dict()
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    h, t = user_examples(ds, 0)
    with pytest.raises(NotVectorisable, match="TiedTwoTower"):
        train_cohort(model, arrays, [ClientJob(h, t, 1)], lr=0.5, local_epochs=1, batch_size=0)
    # A function (dataset, cfg, seed) works as a target too.
    again = build_model(ModelConfig(_target_=f"{plugin}.tied_model", dim=8), ds, seed=1)
    torch.testing.assert_close(again.item_table, model.item_table)


@pytest.mark.parametrize(("target", "says"), [
    ("no_such_module_xyz.Model", "cannot be imported"),
    ("rf2.core.config.ModelConfig", "FederatedModel"),
    ("Model", "cannot be imported"),
])
def test_a_bad_model_target_is_one_config_error(target: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        build_model(ModelConfig(_target_=target, dim=8), _ds(), seed=1)
    assert info.value.field == "model._target_"


def test_a_real_cohort_error_is_each_users_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a declared 'not vectorisable' falls back; a bug in training surfaces."""
    spec = client_module.client_spec_from(
        DatasetConfig(num_users=60, num_items=50, num_groups=3), ModelConfig(dim=8), seed=2)
    state = client_module.worker_state(spec)
    received = {k: v.numpy() for k, v in state.model.state_dict().items()}

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("boom")

    monkeypatch.setattr(client_module, "train_cohort", broken)
    recipe = RoundRecipe(server_round=1, lr=1.0, local_epochs=1, batch_size=0)
    out = client_module._train_cohort(state, received, recipe, [UserTask(user=u) for u in (0, 1)])
    assert [str(o) for o in out] == ["boom", "boom"]


def test_plugin_model_runs_federated_per_user_with_a_logged_reason_and_central(
    plugin: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    target = f"{plugin}.TiedTwoTower"
    client_module._LOGGED_FALLBACKS.clear()
    with caplog.at_level(logging.WARNING, logger="rf2.fl.client"):
        run_job(small_run(**{"model._target_": target, "model.loss": "full"}), tmp_path / "d")
    said = [r.getMessage() for r in caplog.records if "user by user" in r.getMessage()]
    assert len(said) == 1 and "TiedTwoTower" in said[0]
    forced = run_job(small_run(**{"model._target_": target, "model.loss": "full",
                                  "simulation.vectorise": False}), tmp_path / "p")
    default_rows = without_timing(read_rows(tmp_path / "d"))
    forced_rows = without_timing(read_rows(forced))
    # Equal to rounding: the two paths batch users into messages differently, so their
    # partial sums (rf2.fl.partial_sum) add the same updates in another order.
    assert [r.keys() for r in default_rows] == [r.keys() for r in forced_rows]
    for a, b in zip(default_rows, forced_rows, strict=True):
        for key, value in b.items():
            assert a[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                              else value), key
    # It learned: the tied model beats its own initial scores.
    assert default_rows[-1]["recall@20"] > default_rows[0]["recall@20"]
    central = run_job(small_run(**{"model._target_": target, "mode": "central",
                                   "central.epochs": 1}), tmp_path / "c")
    rows = read_rows(central)
    assert rows[-1]["recall@20"] > rows[0]["recall@20"]
    state = torch.load(central / "model.pt")
    assert "history_table" not in state and "item_table" in state
