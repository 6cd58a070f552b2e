"""The per-user path's row-sparse result: the rows a user's training gave a gradient
bound what it changed, so its reply and its share of a message's sum are built from
those rows alone, equal to comparing the whole trained model with what it received."""

from __future__ import annotations

import numpy as np
import pytest

from rf2.core.config import DatasetConfig, ModelConfig
from rf2.data import load_dataset
from rf2.fl.client import _row_update
from rf2.fl.params import state_to_numpy
from rf2.fl.partial_sum import SumBuilder
from rf2.model import build_model
from rf2.model.examples import num_training_examples, user_examples
from rf2.model.local_training import train_locally
from rf2.optim.sparse import changed_rows, encode, encode_dense

DS = load_dataset(DatasetConfig(num_users=60, num_items=80, num_groups=3), seed=2)
USER = int(np.flatnonzero(num_training_examples(DS) >= 6)[0])

CASES = [
    ({"name": "two_tower", "dim": 8, "loss": "full"}, {}),
    ({"name": "two_tower", "dim": 8, "loss": "sampled", "num_negatives": 7},
     {"proximal_mu": 0.5, "local_epochs": 2, "batch_size": 3}),
    ({"name": "fcf", "dim": 8, "loss": "sampled", "num_negatives": 7}, {"local_epochs": 2}),
    ({"name": "fcf", "dim": 8, "loss": "full"}, {}),
    ({"name": "hier_index", "dim": 8, "loss": "sampled", "num_negatives": 7}, {}),
]


def _trained(model_cfg: dict, kwargs: dict) -> tuple:  # noqa: ANN401
    model = build_model(ModelConfig(**model_cfg), DS, seed=1)
    held = state_to_numpy(model)
    hist, tgt = user_examples(DS, USER)
    opts = {"lr": 1.0, "local_epochs": 1, "batch_size": 0, **kwargs}
    result = train_locally(model, hist, tgt, seed=5, user=USER, track_rows=True, **opts)
    return model, held, result


@pytest.mark.parametrize(("model_cfg", "kwargs"), CASES)
def test_tracked_rows_bound_the_changes_and_give_the_whole_model_reply(
        model_cfg: dict, kwargs: dict) -> None:
    model, held, result = _trained(model_cfg, kwargs)
    full = state_to_numpy(model)
    tables = tuple(model.row_tables())
    assert result.touched is not None and set(result.touched) == set(tables)
    for name in tables:
        changed = changed_rows(full[name], held[name])
        assert len(changed) > 0, name  # the check below is not vacuous
        assert set(changed.tolist()) <= set(result.touched[name].tolist()), name
        # A sampled loss reads a few rows, not all (the index's balance term samples up
        # to 4,096 items: all 80 here).
        if model_cfg["loss"] == "sampled" and model_cfg["name"] != "hier_index":
            assert len(result.touched[name]) < len(full[name]), name
    update = _row_update(model, held, result)
    want = encode_dense(held, full, tables)
    got = encode(held, update.rows, update.values)
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    dense = update.dense(held)
    assert dense.keys() == full.keys()
    for key in full:
        assert np.array_equal(dense[key], full[key]), key
    # A message's sum: the same rows and values as from the whole model.
    by_rows, by_model = SumBuilder(held, tables), SumBuilder(held, tables)
    by_rows.add_user(0, 3.0, update.rows, update.values)
    by_model.add_full(0, 3.0, full)
    a, b = by_rows.arrays(), by_model.arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_row_table_without_gradient_is_not_tracked() -> None:
    """A row table that is not a trainable parameter may change without a gradient: the
    per-user path then compares the whole model (``touched`` None)."""
    model = build_model(ModelConfig(name="two_tower", dim=8), DS, seed=1)
    model.item_table.requires_grad_(False)
    hist, tgt = user_examples(DS, USER)
    result = train_locally(model, hist, tgt, lr=1.0, local_epochs=1, batch_size=0, seed=5,
                           track_rows=True)
    assert result.touched is None and result.num_examples == len(tgt)
    model.item_table.requires_grad_(True)  # trackable, but not asked for: not tracked
    plain = train_locally(model, hist, tgt, lr=1.0, local_epochs=1, batch_size=0, seed=5)
    assert plain.touched is None


def test_rows_with_gradient_dense_sparse_nan_and_empty() -> None:
    import torch

    from rf2.model.local_training import _rows_with_gradient

    dense = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0], [float("nan"), 0.0],
                          [-0.0, 0.0]])
    assert _rows_with_gradient(dense).tolist() == [0, 2, 3]  # NaN counts, -0.0 does not
    assert _rows_with_gradient(torch.tensor([0.0, 3.0, 0.0])).tolist() == [1]  # a bias
    assert _rows_with_gradient(torch.zeros(0, 4)).tolist() == []
    table = torch.nn.Embedding(6, 3, sparse=True)
    table(torch.tensor([4, 1, 4])).sum().backward()
    assert table.weight.grad is not None and table.weight.grad.is_sparse
    assert sorted(_rows_with_gradient(table.weight.grad).tolist()) == [1, 4]
