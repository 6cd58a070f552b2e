"""Learned hierarchical index: codes, losses, gradients, aggregation, evaluation, TTT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_run

from rf2.core.config import DatasetConfig, IndexConfig, ModelConfig
from rf2.core.errors import ConfigError
from rf2.core.typed import from_dict
from rf2.data import load_dataset
from rf2.data.base import FederatedDataset
from rf2.eval.evaluation import Evaluator
from rf2.fl.params import load_numpy_into, state_to_numpy
from rf2.model import HierIndexModel, TwoTower, build_model, user_examples
from rf2.model.hier_index import hard_codes, sq_distances
from rf2.model.local_training import train_locally
from rf2.model.ttt import node_loss, node_pairs, run_ttt
from rf2.optim.heterofl import rules_for

torch.set_num_threads(1)


def _cfg(**index: object) -> ModelConfig:
    base: dict = {"nodes_per_level": [4, 3], "warmup_steps": 0}
    base.update(index)
    return ModelConfig(name="hier_index", dim=8, index=IndexConfig(**base))  # type: ignore[arg-type]


def _model(seed: int = 0, num_items: int = 40, **index: object) -> HierIndexModel:
    return HierIndexModel(num_items, _cfg(**index), None, history_len=3, seed=seed)


@pytest.fixture(scope="module")
def dataset() -> FederatedDataset:
    cfg = DatasetConfig(num_users=60, num_items=40, num_groups=4, mean_clicks_per_user=8)
    return load_dataset(cfg, 1)


def _toy_task(n_items: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic next item: history (i-1, i, i+1) predicts i+2 (mod n)."""
    i = torch.arange(n_items)
    hist = torch.stack([(i - 1) % n_items, i, (i + 1) % n_items], dim=1)  # (n, 3)
    return hist, (i + 2) % n_items


def test_build_model_dispatches_on_name(dataset: FederatedDataset) -> None:
    assert type(build_model(ModelConfig(name="two_tower"), dataset, 0)) is TwoTower
    model = build_model(ModelConfig(name="hier_index"), dataset, 0)
    assert isinstance(model, HierIndexModel)


def test_state_dict_holds_parameters_only() -> None:
    model = _model()
    state = model.state_dict()
    assert "codes" not in state
    assert set(state) == {name for name, _ in model.named_parameters()}
    assert state["node_vecs.0"].shape == (4, 8) and state["node_bias.1"].shape == (3,)
    no_bias = HierIndexModel(40, ModelConfig(name="hier_index", dim=8, item_bias=False), None, 3)
    assert not any(k.startswith("node_bias") for k in no_bias.state_dict())
    assert no_bias.item_keys().shape == (40, 8)


def test_keys_and_queries_reproduce_the_model_score() -> None:
    model = _model()
    user = torch.randn(5, 8)
    model.bias.data.normal_()  # type: ignore[union-attr]
    want = model.score_all(user)  # (B, I)
    got = model.query_vectors(user) @ model.item_keys().T
    assert torch.allclose(got, want, atol=1e-5)


def test_hard_codes_match_argmin_of_soft_assignment() -> None:
    model = _model(seed=3)
    keys = model.item_keys().detach()
    codes = model.refresh_index()  # (I, L)
    books = model.codebooks()
    # Level by level along the hard path: the code is the soft assignment's argmax.
    r = keys
    for level, book in enumerate(books):
        a = torch.softmax(-model.alpha() * sq_distances(r, book.detach()).sqrt(), dim=1)
        assert torch.equal(a.argmax(1), codes[:, level])
        r = r - book.detach()[codes[:, level]]
    # At a very low temperature the soft path is the hard path.
    with torch.no_grad():
        assign, recon = model.soft_assign(keys, alpha=1e7)
    for level, a in enumerate(assign):
        assert torch.equal(a.argmax(1), codes[:, level])
    hard_recon = sum(b.detach()[codes[:, lv]] for lv, b in enumerate(books))
    assert torch.allclose(recon, hard_recon, atol=1e-5)


def test_gradients_reach_every_node_embedding() -> None:
    model = _model(seed=1)
    hist, tgt = _toy_task()
    model.loss(hist, tgt).backward()
    for level in range(2):
        assert model.node_vecs[level].grad is not None
        assert model.node_vecs[level].grad.abs().sum() > 0  # type: ignore[union-attr]
        assert model.node_bias[level].grad.abs().sum() > 0  # type: ignore[index,union-attr]


def test_every_loss_term_decreases_on_a_toy_problem() -> None:
    # Random nodes (k-means would start them balanced); reconstruction weighted up so it
    # is not outrun by the item embeddings growing under the item loss.
    model = _model(seed=2, init="random", balance_weight=1.0, reconstruction_weight=5.0,
                   max_alpha=5.0)
    model.finish_schedules()  # fixed temperature: the terms are comparable
    hist, tgt = _toy_task()

    def terms() -> dict[str, float]:
        with torch.no_grad():
            user = model.user_embedding(hist)
            out = {k: float(v) for k, v in model.index_losses(user, tgt).items()}
            out["item"] = float(model.item_loss(user, tgt))
        return out

    before = terms()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        model.loss(hist, tgt).backward()
        opt.step()
    after = terms()
    assert set(before) == {"item", "level0", "level1", "rec", "bal"}
    for key, value in before.items():
        assert after[key] < value, (key, value, after[key])


def test_schedules_warm_up_and_anneal() -> None:
    model = _model(warmup_steps=10, min_alpha=1.0, max_alpha=21.0, alpha_power=2.0,
                   index_loss_weight=0.5, anneal_steps=20)
    model.set_training_progress(5, 1000)  # absolute steps: the run's length is ignored
    assert model.index_weight() == pytest.approx(0.25)
    assert model.alpha() == pytest.approx(1.0 + 20.0 * 0.25**2)
    model.set_training_progress(40, 1000)
    assert model.index_weight() == pytest.approx(0.5) and model.alpha() == pytest.approx(21.0)
    whole_run = _model(min_alpha=0.0, max_alpha=8.0, anneal_steps=0)
    whole_run.set_training_progress(3, 12)
    assert whole_run.alpha() == pytest.approx(2.0)
    model.set_training_progress(0, 20)  # before warm-up the loss is the two-tower's
    hist, tgt = _toy_task()
    assert torch.allclose(model.loss(hist, tgt), model.item_loss(model.user_embedding(hist), tgt))


def test_width_rules_narrow_node_tables_along_d_only() -> None:
    model = _model(nodes_per_level=[8, 3])  # K_0 == D == 8: a square table, not a layer
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rules = rules_for(shapes, model.cfg.dim, model.width_rules())  # what TierSettings applies
    assert rules["node_vecs.0"] == (1,) and rules["node_vecs.1"] == (1,)
    assert rules["node_bias.0"] == () and rules["bias"] == ()
    assert rules["item_table"] == (1,) and rules["history_table"] == (1,)


def test_kmeans_init_quantises_better_than_random() -> None:
    def error(model: HierIndexModel) -> float:
        keys = model.item_keys().detach()
        codes = model.refresh_index()
        recon = sum(b.detach()[codes[:, lv]] for lv, b in enumerate(model.codebooks()))
        return float(((keys - recon) ** 2).sum(1).mean())

    assert error(_model(init="kmeans")) < 0.7 * error(_model(init="random"))


def test_federated_aggregation_keeps_codes_consistent(dataset: FederatedDataset) -> None:
    cfg = ModelConfig(name="hier_index", dim=8, index=IndexConfig(nodes_per_level=[4, 3]))
    server = build_model(cfg, dataset, 0)
    assert isinstance(server, HierIndexModel)
    global_arrays = state_to_numpy(server)
    codes_before = server.refresh_index().clone()
    updates = []
    for user in (0, 1, 2):
        client = build_model(cfg, dataset, 0)
        load_numpy_into(client, global_arrays)
        client.set_training_progress(1, 100)  # type: ignore[operator]
        hist, tgt = user_examples(dataset, user)
        train_locally(client, hist, tgt, lr=5.0, local_epochs=1, batch_size=0)
        updates.append(state_to_numpy(client))
    mean = {k: np.mean([u[k] for u in updates], axis=0) for k in global_arrays}  # FedAvg
    assert not np.allclose(mean["node_vecs.0"], global_arrays["node_vecs.0"])
    load_numpy_into(server, mean)
    retriever = server.build_retriever(beam=2)
    # The served codes are the argmin codes of the aggregated parameters ...
    keys = torch.from_numpy(np.concatenate([mean["item_table"], mean["bias"][:, None]], 1))
    if server.item_genres is not None:
        keys[:, :-1] += server.item_genres @ torch.from_numpy(mean["genre_table"])
    books = [torch.from_numpy(np.concatenate([mean[f"node_vecs.{lv}"],
                                              mean[f"node_bias.{lv}"][:, None]], 1))
             for lv in range(2)]
    assert torch.equal(server.codes, hard_codes(keys, books))
    assert not torch.equal(server.codes, codes_before)
    # ... and any process holding the same arrays serves the same index.
    other = build_model(cfg, dataset, 99)
    load_numpy_into(other, mean)
    other_ret = other.build_retriever(beam=2)  # type: ignore[operator]
    assert torch.equal(other.codes, server.codes)
    q = server.query_vectors(torch.randn(4, 8))
    assert torch.equal(retriever.topk(q, 5).item_ids, other_ret.topk(q, 5).item_ids)


def test_evaluator_logs_index_metrics_and_full_beam_is_brute_force(
    dataset: FederatedDataset,
) -> None:
    model = _model(num_items=dataset.num_items)
    evaluator = Evaluator(dataset, [5, 10], batch_size=16)
    model.cfg.index.beam = 12  # every path
    row = evaluator.evaluate_model(model)
    for k in (5, 10):
        assert row[f"index/recall@{k}"] == pytest.approx(row[f"recall@{k}"])
        assert row[f"index/ndcg@{k}"] == pytest.approx(row[f"ndcg@{k}"])
        assert row[f"exactness@{k}"] == pytest.approx(1.0)
    assert row["items_scored_frac"] == pytest.approx(1.0)
    model.cfg.index.beam = 1
    row = evaluator.evaluate_model(model)
    assert row["items_scored_frac"] < 1.0 and row["exactness@10"] < 1.0
    assert "tier/all/index/recall@10" not in row or np.isfinite(row["tier/all/index/recall@10"])


def test_two_tower_evaluation_has_no_index_keys(dataset: FederatedDataset) -> None:
    model = build_model(ModelConfig(name="two_tower", dim=8), dataset, 0)
    row = Evaluator(dataset, [5], batch_size=16).evaluate_model(model)
    assert "recall@5" in row and "index/recall@5" not in row and "exactness@5" not in row


def test_node_pairs_follow_the_rate_and_train_routing(dataset: FederatedDataset) -> None:
    model = _model(num_items=dataset.num_items)
    hist, tgt = user_examples(dataset, 0)
    ph, pc = node_pairs(model, hist, tgt, depth=2, rate=2.0)
    assert len(pc) == 2 * len(tgt) and pc.shape[1] == 2
    np.testing.assert_array_equal(pc[::2], model.refresh_index()[tgt].numpy())
    ph, pc = node_pairs(model, hist, tgt, depth=1, rate=0.5, seed=3)
    assert pc.shape[1] == 1 and len(pc) <= len(tgt)
    h, c = torch.from_numpy(hist), model.refresh_index()[torch.from_numpy(tgt)]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        start = float(node_loss(model, h, c))
    for _ in range(30):
        opt.zero_grad()
        node_loss(model, h, c).backward()
        opt.step()
    with torch.no_grad():
        assert float(node_loss(model, h, c)) < start


def test_test_time_training_reports_before_after(dataset: FederatedDataset) -> None:
    model = _model(num_items=dataset.num_items)
    evaluator = Evaluator(dataset, [20], batch_size=64)
    out = run_ttt(model, dataset, evaluator.evaluate_model,
                          IndexConfig(nodes_per_level=[4, 3], ttt_epochs=1), seed=0)
    for key in ("ttt/before/index/recall@20", "ttt/after/recall@20", "ttt/delta/exactness@20"):
        assert np.isfinite(out[key]), key
    assert out["ttt/pairs"] > 0


@pytest.mark.parametrize("field, value", [("ttt_depth", 3), ("min_alpha", 50.0),
                                          ("balance_sample", 0), ("ttt_rate", -1.0)])
def test_bad_index_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"model.index.{field}"):
        from_dict(ModelConfig, {"name": "hier_index", "index": {field: value}}, "model")


def test_federated_run_logs_index_metrics(tmp_path: Path) -> None:
    from rf2.cli.support import run_job

    cfg = small_run(num_rounds=2)
    cfg["model"] = {"name": "hier_index", "dim": 16, "index": {"nodes_per_level": [4, 4]}}
    run_job(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    for key in ("recall@20", "index/recall@20", "index/ndcg@20", "exactness@20",
                "items_scored_frac"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert 0 < rows[-1]["items_scored_frac"] <= 1


def test_ttt_switch_writes_its_effect(tmp_path) -> None:  # noqa: ANN001
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import small_run

    from rf2.cli.support import run_job

    run_job(small_run(num_rounds=2, **{"model.name": "hier_index", "model.index.ttt": True}),
            tmp_path / "run")
    ttt = json.loads((tmp_path / "run" / "ttt.json").read_text())
    assert ttt["ttt/pairs"] > 0 and ttt["ttt/depth"] == 2
    delta = ttt["ttt/after/index/recall@20"] - ttt["ttt/before/index/recall@20"]
    assert abs(ttt["ttt/delta/index/recall@20"] - delta) < 1e-12
