"""Sparse client updates: wire format, screening, and aggregation equal to the dense one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, small_run, without_timing

from rf2.cli.support import run_job
from rf2.optim import sparse

ROW_TABLES = ("history_table", "item_table", "bias")  # the two-tower's (row_tables())


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"history_table": rng.normal(size=(30, 4)).astype(np.float32),
            "item_table": rng.normal(size=(30, 4)).astype(np.float32),
            "bias": rng.normal(size=30).astype(np.float32),
            "genre_table": rng.normal(size=(3, 4)).astype(np.float32)}


def _client(g: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A trained model that moved a few random rows (and the whole genre table)."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in g.items()}
    for name in ("history_table", "item_table", "bias"):
        rows = rng.choice(30, size=5, replace=False)
        out[name][rows] += rng.normal(size=out[name][rows].shape).astype(np.float32)
    out["genre_table"] += 0.1
    return out


def test_encode_keeps_changed_rows_and_densify_restores() -> None:
    g = _global()
    c = _client(g, 1)
    enc = sparse.encode_dense(g, c, ROW_TABLES)
    assert list(enc)[0].endswith(".values")  # a value array first (fault injection)
    upd = sparse.decode(enc)
    for name in ("history_table", "item_table", "bias"):
        np.testing.assert_array_equal(upd.rows[name], sparse.changed_rows(c[name], g[name]))
        assert len(upd.rows[name]) == 5
    for name, value in sparse.densify(upd, g).items():
        np.testing.assert_array_equal(value, c[name])
    assert sparse.screen(enc, g) is None


def test_changed_rows_of_tables_vectors_and_empty_row_sets() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    b = a.copy()
    b[2, 1, 0] += 1
    assert sparse.changed_rows(b, a).tolist() == [2]  # any element of a row
    assert sparse.changed_rows(np.array([1.0, 5.0]), np.array([1.0, 2.0])).tolist() == [1]
    for shape in ((0, 4), (3, 0)):  # no row; rows of nothing (nothing differs)
        assert sparse.changed_rows(np.zeros(shape), np.zeros(shape)).tolist() == []


def test_weighted_mean_equals_dense_fedavg() -> None:
    g = _global()
    unchanged = {k: (v + 0.1 if k == "genre_table" else v.copy()) for k, v in g.items()}
    clients = [_client(g, s) for s in range(4)] + [unchanged]  # the last moved no row
    weights = [3.0, 1.0, 5.0, 2.0, 4.0]
    updates = [sparse.decode(sparse.encode_dense(g, c, ROW_TABLES)) for c in clients]
    got = sparse.weighted_mean(g, updates, weights)
    w = np.asarray(weights) / sum(weights)
    for name in g:
        want = sum(wk * c[name].astype(np.float64) for wk, c in zip(w, clients, strict=True))
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6)
    # A row nobody touched stays exactly w_t (a zero pseudo-gradient, not rounding noise).
    untouched = np.setdiff1d(np.arange(30), np.concatenate([u.rows["item_table"] for u in updates]))
    assert len(untouched) > 0
    np.testing.assert_array_equal(got["item_table"][untouched], g["item_table"][untouched])


@pytest.mark.parametrize(("corrupt", "reason"), [
    (lambda e: e.__setitem__("bias.rows", e["bias.rows"][::-1].copy()), "wrong_shape"),
    (lambda e: e.__setitem__("bias.rows", e["bias.rows"] + 100), "wrong_shape"),
    (lambda e: e.__setitem__("item_table.values", np.zeros((1, 4), np.float32)), "wrong_shape"),
    (lambda e: e.pop("genre_table"), "wrong_shape"),
    (lambda e: e["item_table.values"].__setitem__((0, 0), np.nan), "non_finite"),
    (lambda e: e["genre_table"].__setitem__((0, 0), np.inf), "non_finite"),
])
def test_screen_catches_bad_sparse_replies(corrupt, reason: str) -> None:  # noqa: ANN001
    g = _global()
    enc = {k: v.copy() for k, v in sparse.encode_dense(g, _client(g, 2), ROW_TABLES).items()}
    corrupt(enc)
    assert sparse.screen(enc, g) == reason


def _compare(tmp_path: Path, base: dict, extra: dict, rounds: int) -> list[dict]:
    rows = {}
    for on in (True, False):
        cfg = {**base, "num_rounds": rounds}
        cfg["simulation"] = {**cfg["simulation"], "sparse_updates": on}
        for key, value in extra.items():
            cfg[key] = {**cfg.get(key, {}), **value}
        run_job(cfg, tmp_path / f"{on}")
        rows[on] = without_timing(read_rows(tmp_path / f"{on}"))
    for a, b in zip(rows[True], rows[False], strict=True):
        for key, value in a.items():
            if "bytes_up" in key or "bytes_down" in key or key == "sim_time_s":
                # What is shipped differs (that is the point), and so does the clock's
                # transfer time; who completes a round does not on these configs.
                continue
            if isinstance(value, float):
                assert value == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
            else:
                assert value == b[key], key
    return rows[True], rows[False]


# FedAvg/q-FFL without a server optimizer: with one, a dense reply's untouched rows carry
# Flower's float32 rounding of the mean (~1e-9) and Adagrad/Adam turn that into a step of
# ~eta * sign(noise); a sparse reply's untouched rows have exactly zero delta. So the two
# agree to rounding only without a server optimizer (with Adagrad, AUC differed by 4e-4
# after one round on this config: the dense run's noise steps, not the sparse one's).
CASES = [
    ({"strategy": {"server_optimizer": "none"}}, 3),
    ({"strategy": {"name": "qffl", "server_optimizer": "none"}}, 3),
    ({"strategy": {"server_optimizer": "none"}, "optimization": {"per_row_embedding_avg": True}}, 2),
    ({"strategy": {"server_optimizer": "none"}, "devices": {"profile": "rf2-3tier"},
      "optimization": {"width": {"low": 0.5}}}, 2),
]


@pytest.mark.parametrize(("extra", "rounds"), CASES)
def test_sparse_run_matches_dense_run(tmp_path: Path, extra: dict, rounds: int) -> None:
    base = small_run(**{"model.name": "two_tower", "model.loss": "sampled",
                        "model.num_negatives": 20})
    sparse_rows, dense_rows = _compare(tmp_path, base, extra, rounds)
    assert sparse_rows[-1]["recall@20"] != sparse_rows[0]["recall@20"]
    assert sum(r.get("bytes_up", 0) for r in sparse_rows) < 0.6 * sum(
        r.get("bytes_up", 0) for r in dense_rows)


@pytest.mark.slow
def test_sparse_matches_dense_on_movielens(tmp_path: Path, ml100k: Path) -> None:
    base = small_run(**{"dataset": {"name": "movielens100k", "path": str(ml100k)},
                        "model.name": "two_tower", "clients_per_round": 50})
    for i, (extra, rounds) in enumerate(CASES[:2]):
        _compare(tmp_path / str(i), base, extra, rounds)
