"""Partial-coverage aggregation rules against hand-computed cases: HeteroFL sub-models
(``rf2.optim.heterofl``) and per-row embedding averaging (``rf2.optim.row_averaging``, RF²'s "fsl")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.core.config import ModelConfig
from rf2.fl.params import state_to_numpy
from rf2.model.two_tower import TwoTower
from rf2.optim.heterofl import (
    aggregate_heterofl,
    default_rules,
    extract,
    kept,
    pad,
    rules_for,
    slice_spec,
    sub_shapes,
)
from rf2.optim.row_averaging import (
    aggregate_rows,
    item_row_params,
    mask_untouched,
    touched_items,
    touched_rows_for,
)

G = {"w": np.arange(8, dtype=np.float64).reshape(2, 4)}  # (2, 4) global
HIDDEN = {"w": (0, 1)}  # both axes are width axes


def spec_at(width: float) -> dict[str, tuple[slice, ...]]:
    return slice_spec({"w": (2, 4)}, width, HIDDEN)


# -- HeteroFL ----------------------------------------------------------------------------
def test_two_clients_overlapping_slices() -> None:
    """Widths 0.5 ([:1, :2]) and 1.0 (all), 1 and 3 examples."""
    a = {"w": np.array([[10.0, 20.0]])}  # (1, 2)
    b = {"w": np.full((2, 4), -4.0)}  # (2, 4)
    got = aggregate_heterofl(G, [a, b], [spec_at(0.5), spec_at(1.0)], [1.0, 3.0])["w"]
    want = np.full((2, 4), -4.0)
    want[0, 0] = (1 * 10 + 3 * -4) / 4  # covered by both
    want[0, 1] = (1 * 20 + 3 * -4) / 4
    np.testing.assert_allclose(got, want)


def test_uncovered_elements_keep_their_old_value() -> None:
    a = {"w": np.array([[10.0, 20.0]])}  # width 0.5 -> [:1, :2]
    c = {"w": np.array([[30.0]])}  # width 0.25 -> [:1, :1]
    got = aggregate_heterofl(G, [a, c], [spec_at(0.5), spec_at(0.25)], [2.0, 1.0])["w"]
    want = G["w"].copy()
    want[0, 0] = (2 * 10 + 1 * 30) / 3
    want[0, 1] = 20.0
    np.testing.assert_allclose(got, want)


def test_mlp_slices_are_nested_top_left() -> None:
    """HeteroFL on in -> hidden -> hidden -> out: hidden rows shrink, the next layer keeps
    the previous layer's kept columns, first inputs and last outputs stay full."""
    shapes = {"fc1.weight": (6, 3), "fc1.bias": (6,), "fc2.weight": (6, 6),
              "fc3.weight": (2, 6), "fc3.bias": (2,)}
    rules = {"fc1.weight": (0,), "fc1.bias": (0,), "fc2.weight": (0, 1), "fc3.weight": (1,)}
    assert sub_shapes(slice_spec(shapes, 0.5, rules)) == {
        "fc1.weight": (3, 3), "fc1.bias": (3,), "fc2.weight": (3, 3),
        "fc3.weight": (2, 3), "fc3.bias": (2,)}


def test_kept_is_ceil_without_float_noise() -> None:
    assert kept(10, 0.3) == 3 and kept(10, 0.31) == 4 and kept(64, 0.25) == 16
    assert kept(3, 0.01) == 1


def test_two_tower_narrow_model_is_the_slice() -> None:
    """A width-r client is TwoTower(dim = ceil(r·D)): its state has the slice's shapes."""
    genres = np.eye(5, 3)  # (I=5, G=3)
    full = TwoTower(5, ModelConfig(dim=8), item_genres=genres)
    shapes = {k: tuple(v.shape) for k, v in state_to_numpy(full).items()}
    rules = rules_for(shapes, 8, full.width_rules())
    assert rules == {"history_table": (1,), "item_table": (1,), "genre_table": (1,), "bias": ()}
    assert default_rules(shapes, dim=8) == rules  # the generic guess agrees here
    for width in (0.25, 0.5, 1.0):
        narrow = TwoTower(5, ModelConfig(dim=kept(8, width)), item_genres=genres)
        if width < 1.0:  # the contract's sub-model is the same model at that width
            got = {k: tuple(v.shape) for k, v in state_to_numpy(full.at_width(width)).items()}
            assert got == {k: tuple(v.shape) for k, v in state_to_numpy(narrow).items()}
        spec = slice_spec(shapes, width, rules)
        want = {k: tuple(v.shape) for k, v in state_to_numpy(narrow).items()}
        assert sub_shapes(spec) == want
    sliced = extract(state_to_numpy(full), slice_spec(shapes, 0.5, rules))
    np.testing.assert_array_equal(sliced["item_table"], full.item_table.detach()[:, :4])


def test_pad_writes_the_slice_into_the_global_weights() -> None:
    spec = spec_at(0.5)
    full = pad(G, {"w": np.array([[-1.0, -2.0]])}, spec)["w"]
    want = G["w"].copy()
    want[0, :2] = [-1.0, -2.0]
    np.testing.assert_array_equal(full, want)
    with pytest.raises(ValueError, match="slice"):
        aggregate_heterofl(G, [{"w": np.zeros((2, 2))}], [spec], [1.0])


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_full_width_is_fedavg(weights: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    clients = [{"w": rng.normal(size=(2, 4))} for _ in weights]
    got = aggregate_heterofl(G, clients, [spec_at(1.0)] * len(weights), weights)["w"]
    want = sum(w * c["w"] for w, c in zip(weights, clients, strict=True)) / sum(weights)
    np.testing.assert_allclose(got, want, rtol=1e-10)


# -- per-row embedding averaging ("fsl") ---------------------------------------------
def test_rows_average_over_the_clients_that_touched_them() -> None:
    glob = {"table": np.zeros((4, 2)), "bias": np.full(4, 9.0), "dense": np.zeros(2)}
    a = {"table": np.full((4, 2), 1.0), "bias": np.full(4, 1.0), "dense": np.array([1.0, 2.0])}
    b = {"table": np.full((4, 2), 5.0), "bias": np.full(4, 5.0), "dense": np.array([5.0, 6.0])}
    rows = ("table", "bias")
    touched = [touched_rows_for(np.array([0, 1, 1]), rows),  # a: rows 0, 1
               touched_rows_for(np.array([2, 1, -1]), rows)]  # b: rows 1, 2 (PAD dropped)
    got = aggregate_rows(glob, [a, b], touched, weights=[1.0, 3.0])
    row1 = (1 * 1.0 + 3 * 5.0) / 4
    np.testing.assert_allclose(got["table"], [[1, 1], [row1, row1], [5, 5], [0, 0]])
    np.testing.assert_allclose(got["bias"], [1, row1, 5, 9])  # row 3 untouched: old value
    np.testing.assert_allclose(got["dense"], [(1 + 15) / 4, (2 + 18) / 4])  # plain mean


def test_touching_every_row_is_fedavg() -> None:
    rng = np.random.default_rng(0)
    glob = {"t": np.zeros((3, 2))}
    clients = [{"t": rng.normal(size=(3, 2))} for _ in range(3)]
    touched = [{"t": np.arange(3)}] * 3
    got = aggregate_rows(glob, clients, touched, [1.0, 2.0, 5.0])["t"]
    want = (clients[0]["t"] + 2 * clients[1]["t"] + 5 * clients[2]["t"]) / 8
    np.testing.assert_allclose(got, want)


def test_touched_items_and_row_params_of_the_two_tower() -> None:
    model = TwoTower(6, ModelConfig(dim=4), item_genres=np.eye(6, 2))
    shapes = {k: tuple(v.shape) for k, v in state_to_numpy(model).items()}
    assert set(item_row_params(shapes, num_items=6)) == {"history_table", "item_table", "bias"}
    hist = np.array([[3, -1, -1], [0, 3, 5]])  # (n=2, H=3), PAD = -1
    np.testing.assert_array_equal(touched_items(hist, np.array([4, 3])), [0, 3, 4, 5])


def test_mask_untouched_resets_rows_to_global() -> None:
    glob = {"t": np.zeros((3, 2)), "d": np.zeros(1)}
    client = {"t": np.ones((3, 2)), "d": np.ones(1)}
    got = mask_untouched(glob, client, {"t": np.array([1])})
    np.testing.assert_array_equal(got["t"], [[0, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(got["d"], [1])


def test_inconsistent_row_reports_are_rejected() -> None:
    glob = {"t": np.zeros((3, 2))}
    with pytest.raises(ValueError, match="same parameters"):
        aggregate_rows(glob, [glob, glob], [{"t": np.array([0])}, {}], [1.0, 1.0])


def test_hier_index_node_tables_narrow_along_the_embedding_axis_only() -> None:
    """A 16 x 16 node table is not a hidden layer: a width-r client is exactly a
    hierarchical-index model of dim ceil(r D)."""
    from rf2.core.config import DatasetConfig, IndexConfig, ModelConfig
    from rf2.data import load_dataset
    from rf2.model import build_model
    from rf2.optim.heterofl import extract, kept, rules_for, slice_spec

    ds = load_dataset(DatasetConfig(num_users=50, num_items=60, num_groups=3), seed=1)
    cfg = ModelConfig(name="hier_index", dim=16, index=IndexConfig(nodes_per_level=[16, 4]))
    full = build_model(cfg, ds, seed=1)
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    spec = slice_spec(shapes, 0.5, rules_for(shapes, 16, full.width_rules()))
    sub = extract({k: v.numpy() for k, v in full.state_dict().items()}, spec)
    narrow = build_model(ModelConfig(name="hier_index", dim=kept(16, 0.5),
                                     index=IndexConfig(nodes_per_level=[16, 4])), ds, seed=1)
    assert {k: v.shape for k, v in sub.items()} == {
        k: tuple(v.shape) for k, v in narrow.state_dict().items()}
