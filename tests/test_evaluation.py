"""rf2.eval.evaluation: the blocked, one-score-matrix evaluator against a plain reference,
metric-family selection, the stratified user sample and its standard error, threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rf2.eval.evaluation as evaluation
from rf2.core.config import METRIC_FAMILIES, DatasetConfig, EvalConfig, ModelConfig
from rf2.core.typed import from_dict
from rf2.data import load_dataset
from rf2.data.base import FederatedDataset
from rf2.eval.evaluation import (
    Evaluator,
    stratified_sample,
    stratified_se,
    topk_metrics,
    torch_threads,
)
from rf2.model import build_model
from rf2.model.examples import eval_histories
from rf2.model.retrieval import BruteForceRetriever

KS = [5, 10, 20]


@pytest.fixture(scope="module")
def dataset() -> FederatedDataset:
    cfg = DatasetConfig(num_users=150, num_items=90, num_groups=5, mean_clicks_per_user=12)
    return load_dataset(cfg, 4)


def reference(model: torch.nn.Module, dataset: FederatedDataset) -> dict[str, np.ndarray]:
    """Per test user (ascending id): the metrics computed the plain way, one user at a time
    over a full score matrix (NumPy, float64 ranks), as the pre-blocked evaluator defined
    them."""
    users = np.flatnonzero(dataset.test_counts > 0)
    with torch.no_grad():
        user = model.user_embedding(torch.from_numpy(eval_histories(dataset, users)))
        scores = model.score_all(user).numpy()  # (U, I)
        log_probs = torch.log_softmax(torch.from_numpy(scores).double(), 1).numpy()
    out: dict[str, list[float]] = {}
    for row, u in enumerate(users):
        s, ex = scores[row], set(dataset.train_of(int(u)).tolist())
        tg_list = dataset.test_of(int(u))
        tg = set(tg_list.tolist())
        allowed = [i for i in np.argsort(-s, kind="stable") if i not in ex]
        for k in KS:
            hits = [1.0 if i in tg else 0.0 for i in allowed[:k]]
            ideal = sum(1 / math.log2(r + 2) for r in range(min(k, len(tg))))
            out.setdefault(f"recall@{k}", []).append(sum(hits) / len(tg))
            out.setdefault(f"ndcg@{k}", []).append(
                sum(h / math.log2(r + 2) for r, h in enumerate(hits)) / ideal)
        pos = np.asarray(sorted(tg - ex))
        neg = np.asarray([i for i in range(len(s)) if i not in ex and i not in tg])
        p, n = s[pos][:, None], s[neg][None, :]
        out.setdefault("auc", []).append(float(((p > n) + 0.5 * (p == n)).mean()))
        out.setdefault("loss", []).append(float(-log_probs[row, tg_list].mean()))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("batch_size", [7, 1024])
def test_blocked_evaluation_equals_plain_reference(dataset: FederatedDataset,
                                                   batch_size: int) -> None:
    model = build_model(ModelConfig(name="two_tower", dim=8), dataset, 3)
    tiers = np.arange(dataset.num_users) % 3
    evaluator = Evaluator(dataset, KS, batch_size, tiers, ["low", "mid", "high"])
    row = evaluator.evaluate_model(model)
    want = reference(model, dataset)
    users = np.flatnonzero(dataset.test_counts > 0)
    for key, values in want.items():
        assert row[key] == pytest.approx(values.mean(), rel=1e-6), key
        for t, name in enumerate(["low", "mid", "high"]):
            assert row[f"tier/{name}/{key}"] == pytest.approx(
                values[tiers[users] == t].mean(), rel=1e-6), (name, key)
    assert "users_evaluated" not in row  # one name for one count
    assert row["eval_users"] == row["eval_users_total"] == users.size
    assert row["se/recall@10"] == 0.0  # every test user evaluated: no sampling error


def test_wide_catalogue_equals_plain_reference() -> None:
    """Enough items for the chunked top-k (and a short last chunk): still the reference,
    for both models, the index's served metrics included."""
    wide = load_dataset(DatasetConfig(num_users=90, num_items=2 * KS[-1] * 4 * 32 + 7,
                                      num_groups=4, mean_clicks_per_user=20), 5)
    for name in ("two_tower", "hier_index"):
        model = build_model(ModelConfig(name=name, dim=8), wide, 6)
        row = Evaluator(wide, KS, 32).evaluate_model(model)
        for key, values in reference(model, wide).items():
            assert row[key] == pytest.approx(values.mean(), rel=1e-6), (name, key)
    assert 0 < row["items_scored_frac"] < 1 and "index/recall@20" in row


def test_logsumexp_rows_is_torch_logsumexp_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape, scale in (((7, 3001), 1.0), ((58, 35_648), 0.05), ((3, 5), 40.0)):
        scores = torch.randn(*shape, generator=gen) * scale
        scratch = torch.empty(shape[0] + 2, shape[1])  # a reused, larger buffer
        assert torch.equal(evaluation.logsumexp_rows(scores, scratch),
                           torch.logsumexp(scores, 1))


def test_rows_of_gathers_csr_rows_in_order() -> None:
    indptr = np.array([0, 2, 2, 5, 6])
    items = np.array([4, 1, 9, 8, 7, 3])
    ptr, got = evaluation.rows_of(indptr, items, np.array([3, 0, 1, 2, 0]))
    assert ptr.tolist() == [0, 1, 3, 3, 6, 8]
    assert got.tolist() == [3, 4, 1, 9, 8, 7, 4, 1]


def test_reorder_rows_and_in_sorted_equal_the_plain_way() -> None:
    rng = np.random.default_rng(2)
    num_rows, num_items = 40, 25
    keys = np.unique(rng.integers(0, num_rows * num_items, 300))
    order = rng.permutation(num_rows)
    rank = np.empty_like(order)
    rank[order] = np.arange(num_rows)  # old row -> new row
    want = np.sort(rank[keys // num_items] * num_items + keys % num_items)
    np.testing.assert_array_equal(evaluation.reorder_rows(keys, order, num_items), want)
    probe = rng.integers(0, num_rows * num_items + 5, 200)
    np.testing.assert_array_equal(evaluation.in_sorted(probe, keys), np.isin(probe, keys))
    assert not evaluation.in_sorted(probe, keys[:0]).any()


def test_blocks_and_threads_change_no_number(dataset: FederatedDataset) -> None:
    model = build_model(ModelConfig(name="hier_index", dim=8), dataset, 1)
    rows = [Evaluator(dataset, KS, bs, num_threads=t).evaluate_model(model)
            for bs, t in ((1024, 1), (5, 1), (5, 2), (5, 3))]
    for row in rows[1:]:
        assert row.keys() == rows[0].keys()
        for key, value in rows[0].items():
            # Float32 row reductions (the loss) may round differently by block layout.
            assert row[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
    # Each block runs single-threaded: the thread count changes no bit.
    assert rows[2] == rows[1] == rows[3] or all(
        rows[1][k] == rows[2][k] == rows[3][k] or np.isnan(rows[1][k]) for k in rows[1])


def test_index_metrics_equal_retriever_and_brute_force(dataset: FederatedDataset) -> None:
    model = build_model(ModelConfig(name="hier_index", dim=8), dataset, 2)
    model.cfg.index.beam = 2
    row = Evaluator(dataset, KS, 16).evaluate_model(model)
    users = np.flatnonzero(dataset.test_counts > 0)
    exclude = [dataset.train_of(int(u)) for u in users]
    targets = [dataset.test_of(int(u)) for u in users]
    with torch.no_grad():
        user = model.user_embedding(torch.from_numpy(eval_histories(dataset, users)))
        served = model.build_retriever().topk(model.query_vectors(user), max(KS), exclude)
        brute = BruteForceRetriever(model.item_keys()).topk(model.query_vectors(user), max(KS), exclude)
    want = topk_metrics(served.item_ids.numpy(), exclude, targets, KS, dataset.num_items,
                        prefix="index/")
    for key, values in want.items():
        assert row[key] == pytest.approx(values.mean(), rel=1e-9), key
    same = [np.intersect1d(a[:10], b[:10]).size / 10
            for a, b in zip(served.item_ids.numpy(), brute.item_ids.numpy(), strict=True)]
    assert row["exactness@10"] == pytest.approx(np.mean(same))
    assert row["items_scored_frac"] == pytest.approx(
        served.items_scored.double().mean().item() / dataset.num_items)
    assert 0 < row["items_scored_frac"] < 1


def test_metric_families_select_keys(dataset: FederatedDataset) -> None:
    model = build_model(ModelConfig(name="hier_index", dim=8), dataset, 0)
    full = Evaluator(dataset, KS, 32).evaluate_model(model)
    only = Evaluator(dataset, KS, 32, metrics=["auc", "index"])
    row = only.evaluate_model(model)
    assert "auc" in row and "index/recall@10" in row and "exactness@5" in row
    assert not any(k.startswith(("recall@", "ndcg@", "loss", "se/")) for k in row)
    assert row["auc"] == full["auc"] and row["index/ndcg@20"] == full["index/ndcg@20"]
    assert only.evaluate_popularity() == {}
    pop = Evaluator(dataset, KS, 32, metrics=["recall", "popularity"]).evaluate_popularity()
    assert set(pop) == {f"popularity/recall@{k}" for k in KS}
    loss_only = Evaluator(dataset, KS, 32, metrics=["loss"]).evaluate_model(model)
    assert loss_only["loss"] == full["loss"] and "auc" not in loss_only
    with pytest.raises(ValueError, match="allowed"):
        Evaluator(dataset, KS, 32, metrics=["recal"])


def test_sampled_users_are_fixed_stratified_and_report_their_error(
    dataset: FederatedDataset,
) -> None:
    model = build_model(ModelConfig(name="two_tower", dim=8), dataset, 3)
    tiers = (np.arange(dataset.num_users) % 4 == 0).astype(np.int64)  # 1/4 vs 3/4
    full = Evaluator(dataset, KS, 64, tiers, ["small", "large"])
    sampled = Evaluator(dataset, KS, 64, tiers, ["small", "large"], max_users=40, seed=5)
    again = Evaluator(dataset, KS, 64, tiers, ["small", "large"], max_users=40, seed=5)
    other = Evaluator(dataset, KS, 64, tiers, ["small", "large"], max_users=40, seed=6)
    np.testing.assert_array_equal(np.sort(sampled.users), np.sort(again.users))
    assert set(sampled.users) != set(other.users)
    assert set(sampled.users) <= set(full.users)
    n_small = int(np.sum(tiers[full.users] == 0))
    assert np.sum(tiers[sampled.users] == 0) == round(40 * n_small / len(full.users))
    row = sampled.evaluate_model(model)
    assert row["eval_users"] == 40 and row["eval_users_total"] == len(full.users)
    per_user = reference(model, dataset)["recall@10"]
    ids = np.flatnonzero(dataset.test_counts > 0)
    picked = np.isin(ids, sampled.users)
    assert row["recall@10"] == pytest.approx(per_user[picked].mean(), rel=1e-9)
    assert row["se/recall@10"] == pytest.approx(
        stratified_se(per_user[picked], tiers[ids[picked]],
                      {0: n_small, 1: len(full.users) - n_small}))
    assert row["se/recall@10"] > 0


def test_stratified_se_by_hand() -> None:
    values = np.array([0.0, 1.0, 0.5, 0.5, 1.0])
    strata = np.array([0, 0, 1, 1, 1])
    # Stratum 0: N=4, n=2, s^2=0.5; stratum 1: N=6, n=3, s^2=1/12.
    want = (0.4**2 * 0.5 * 0.5 / 2) + (0.6**2 * 0.5 * (1 / 12) / 3)
    assert stratified_se(values, strata, {0: 4, 1: 6}) == pytest.approx(math.sqrt(want))
    assert stratified_se(values, strata, {0: 2, 1: 3}) == 0.0  # every user evaluated
    assert math.isnan(stratified_se(values[1:], strata[1:], {0: 4, 1: 6}))  # n_0 = 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(1, 70),
       st.integers(0, 2**31))
def test_stratified_sample_sizes(strata_list: list[int], size: int, seed: int) -> None:
    strata = np.asarray(strata_list)
    picked = stratified_sample(strata, size, seed)
    assert picked.size == min(size, strata.size)
    assert np.unique(picked).size == picked.size and np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(picked, stratified_sample(strata, size, seed))
    names, counts = np.unique(strata, return_counts=True)
    got = np.asarray([np.sum(strata[picked] == h) for h in names])
    quota = counts * min(size, strata.size) / strata.size
    if np.all(quota >= 1):  # no stratum lifted to its minimum of one
        assert np.all(np.abs(got - quota) < 1 + 1e-9)  # proportional up to rounding
    assert np.all(got <= counts)
    if size >= names.size:
        assert np.all(got >= 1)  # every stratum represented


def test_torch_threads_restores_the_setting() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    with torch_threads(0) as n:
        assert n >= 1 and torch.get_num_threads() == n
    assert torch.get_num_threads() == before


def test_eval_config_names_the_allowed_families() -> None:
    from rf2.core.errors import UserInputError

    with pytest.raises(UserInputError, match="eval.metrics.*recall, ndcg, auc"):
        from_dict(EvalConfig, {"metrics": ["recall", "mrr"]}, "eval")
    with pytest.raises(UserInputError, match="eval.max_users"):
        from_dict(EvalConfig, {"max_users": -1}, "eval")
    with pytest.raises(UserInputError, match=r"eval.final_max_users.*null \(= max_users\)"):
        from_dict(EvalConfig, {"final_max_users": -2}, "eval")
    assert set(METRIC_FAMILIES) == {*evaluation.RANKING_FAMILIES, *evaluation.FAMILIES,
                                    "popularity", "rated"}


def test_all_cores_means_the_launchers_share_when_it_sets_omp_num_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert evaluation.resolve_threads(0) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what joblib's loky sets in each job
    assert evaluation.resolve_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "16")  # never more than the cores it may use
    assert evaluation.resolve_threads(0) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert evaluation.resolve_threads(0) == 4
    assert evaluation.resolve_threads(3) == 3  # an explicit eval.num_threads wins
