"""rf2.eval.ranking and rf2.eval.fairness: hand-computed cases, a brute-force oracle, summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.eval.fairness import activity_quartile, fairness_summary, group_means, mdac, relative_change
from rf2.eval.ranking import CHUNK, best_of, ranking_metrics, top_ids

L3 = 1 / math.log2(3)  # gain at rank 2


def arr(*items: int) -> np.ndarray:
    return np.asarray(items, dtype=np.int64)


def oracle(scores: np.ndarray, exclude: list, targets: list, ks: list[int]) -> dict:
    """Brute force per user; assumes distinct scores among allowed items for recall/ndcg."""
    out: dict[str, list[float]] = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
    out["auc"] = []
    for s, ex, tg in zip(scores, exclude, targets, strict=True):
        ex, tg = set(ex.tolist()), set(tg.tolist())
        allowed = [i for i in np.argsort(-s, kind="stable") if i not in ex]
        for k in ks:
            hits = [1.0 if i in tg else 0.0 for i in allowed[:k]]
            ideal = sum(1 / math.log2(r + 2) for r in range(min(k, len(tg))))
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            out[f"recall@{k}"].append(sum(hits) / len(tg) if tg else math.nan)
            out[f"ndcg@{k}"].append(dcg / ideal if tg else math.nan)
        pos = [s[i] for i in tg - ex]
        neg = [s[i] for i in range(len(s)) if i not in ex and i not in tg]
        wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
        out["auc"].append(wins / (len(pos) * len(neg)) if pos and neg else math.nan)
    return {k: np.asarray(v) for k, v in out.items()}


def test_one_user_six_items_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    # Item 0 (best score) is a training item: the ranking is 1, 2, 3, 4, 5.
    m = ranking_metrics(scores, [arr(0)], [arr(2, 4)], ks=[1, 2, 4, 10])
    assert m["recall@1"][0] == 0.0
    assert m["recall@2"][0] == pytest.approx(0.5)
    assert m["recall@4"][0] == pytest.approx(1.0)
    assert m["recall@10"][0] == pytest.approx(1.0)  # k > I is clamped
    assert m["ndcg@2"][0] == pytest.approx(L3 / (1 + L3))
    assert m["ndcg@4"][0] == pytest.approx((L3 + 1 / math.log2(5)) / (1 + L3))
    # Positives 2 (0.7), 4 (0.5) vs negatives 1 (0.8), 3 (0.6), 5 (0.4): 2 + 1 of 6 pairs.
    assert m["auc"][0] == pytest.approx(3 / 6)
    assert set(m) == {"recall@1", "ndcg@1", "recall@2", "ndcg@2", "recall@4", "ndcg@4",
                      "recall@10", "ndcg@10", "auc"}


def test_two_users_five_items_with_ties_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.3, 0.9], [0.2, 0.4, 0.6, 0.8, 1.0]])
    m = ranking_metrics(scores, [arr(4), arr()], [arr(1), arr(0, 3, 4)], ks=[2, 3, 5])
    # User 0: item 4 excluded; target 1 ties with negative 2, beats 0 and 3.
    assert m["auc"][0] == pytest.approx(2.5 / 3)
    assert m["recall@3"][0] == 1.0
    # User 1: ranking 4, 3, 2, 1, 0 with targets {0, 3, 4}; recall divides by |targets|.
    assert m["recall@2"][1] == pytest.approx(2 / 3)
    assert m["ndcg@2"][1] == pytest.approx(1.0)  # ideal DCG over min(k, |targets|) = 2
    assert m["recall@5"][1] == pytest.approx(1.0)
    assert m["ndcg@5"][1] == pytest.approx((1 + L3 + 1 / math.log2(6)) / (1 + L3 + 0.5))
    assert m["auc"][1] == pytest.approx(4 / 6)
    assert all(v.shape == (2,) and v.dtype == np.float64 for v in m.values())


def test_exclusion_no_targets_and_excluded_target() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    exclude = [arr(0, 1), arr(0), arr(3)]
    targets = [arr(2), arr(), arr(3, 0)]
    m = ranking_metrics(scores, exclude, targets, ks=[1])
    assert m["recall@1"][0] == 1.0 and m["ndcg@1"][0] == 1.0  # 0, 1 removed: 2 is first
    assert np.isnan(m["recall@1"][1]) and np.isnan(m["ndcg@1"][1]) and np.isnan(m["auc"][1])
    # User 2: target 3 is also excluded: it counts in |targets| but can never be hit.
    assert m["recall@1"][2] == 0.0
    assert m["auc"][2] == pytest.approx(0.0)  # target 0 scores below negatives 1, 2


def test_rejects_out_of_range_items() -> None:
    with pytest.raises(ValueError, match="targets"):
        ranking_metrics(torch.zeros(1, 3), [arr()], [arr(3)], ks=[1])
    with pytest.raises(ValueError, match="exclude"):
        ranking_metrics(torch.zeros(1, 3), [arr(-1)], [arr(0)], ks=[1])


@st.composite
def cases(draw: st.DrawFn, distinct: bool) -> tuple:
    b = draw(st.integers(1, 5))
    i = draw(st.integers(2, 25))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scores = rng.permutation(i * b).reshape(b, i) if distinct else rng.integers(0, 4, (b, i))
    exclude = [rng.choice(i, rng.integers(0, i // 2 + 1), replace=False) for _ in range(b)]
    targets = [rng.choice(i, rng.integers(0, i // 2 + 1), replace=False) for _ in range(b)]
    ks = sorted(set(draw(st.lists(st.integers(1, 30), min_size=1, max_size=4))))
    return torch.tensor(scores, dtype=torch.float32), exclude, targets, ks


@settings(max_examples=30, deadline=None)
@given(cases(distinct=False))
def test_recall_monotone_in_k_and_bounded(case: tuple) -> None:
    scores, exclude, targets, _ = case
    ks = list(range(1, scores.shape[1] + 2))
    m = ranking_metrics(scores, exclude, targets, ks)
    recall = np.stack([m[f"recall@{k}"] for k in ks])  # (K, B)
    has = np.asarray([len(t) > 0 for t in targets])
    assert np.all(np.isnan(recall[:, ~has]))
    r = recall[:, has]
    assert np.all((r >= 0) & (r <= 1))
    assert np.all(np.diff(r, axis=0) >= 0)
    ndcg = np.stack([m[f"ndcg@{k}"] for k in ks])[:, has]
    assert np.all((ndcg >= 0) & (ndcg <= 1 + 1e-12))


@settings(max_examples=30, deadline=None)
@given(cases(distinct=True))
def test_matches_brute_force_oracle(case: tuple) -> None:
    scores, exclude, targets, ks = case
    got = ranking_metrics(scores, exclude, targets, ks)
    want = oracle(scores.numpy(), exclude, targets, ks)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


@settings(max_examples=20, deadline=None)
@given(cases(distinct=False))
def test_auc_with_ties_matches_oracle(case: tuple) -> None:
    scores, exclude, targets, ks = case
    got = ranking_metrics(scores, exclude, targets, ks)["auc"]
    np.testing.assert_allclose(got, oracle(scores.numpy(), exclude, targets, ks)["auc"])


def test_auc_across_several_blocks_and_ragged_targets() -> None:
    rng = np.random.default_rng(7)
    b, i = 1100, 4096  # 2**22 // 4096 = 1024 users per block -> two blocks
    scores = torch.from_numpy(rng.integers(0, 50, (b, i)).astype(np.float32))
    exclude = [rng.choice(i, rng.integers(0, 20), replace=False) for _ in range(b)]
    targets = [rng.choice(i, rng.integers(0, 3) ** 3, replace=False) for _ in range(b)]
    got = ranking_metrics(scores, exclude, targets, ks=[20])["auc"]
    s = scores.numpy()
    for u in rng.choice(b, 60, replace=False):
        pos = np.setdiff1d(targets[u], exclude[u])
        neg = np.setdiff1d(np.arange(i), np.union1d(targets[u], exclude[u]))
        if pos.size == 0:
            assert np.isnan(got[u])
            continue
        p, n = s[u, pos][:, None], s[u, neg][None, :]
        assert got[u] == pytest.approx(((p > n) + 0.5 * (p == n)).mean())


def stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """The reference top-k: the first k of a stable descending sort (ties: lower id)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@st.composite
def score_blocks(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """Blocks wide enough for the chunked path (and some that are not), with ties,
    -inf (masked training items) and a short last chunk."""
    k = draw(st.integers(1, 12))
    num_items = draw(st.sampled_from([7, 4 * k * CHUNK - 1, 4 * k * CHUNK + 13, 3000]))
    b = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["float", "few values", "mostly -inf"]))
    if kind == "float":
        scores = rng.standard_normal((b, num_items)).astype(np.float32)
    elif kind == "few values":  # heavy ties, as a popularity ranking has
        scores = rng.integers(-3, 4, (b, num_items)).astype(np.float32)
    else:
        scores = np.full((b, num_items), -np.inf, dtype=np.float32)
        keep = rng.random((b, num_items)) < 0.01
        scores[keep] = rng.standard_normal(int(keep.sum()))
    masked = rng.random((b, num_items)) < 0.1
    scores[masked] = -np.inf
    scores[rng.random((b, num_items)) < 0.05] = -0.0  # equal to +0.0: must tie with it
    return torch.from_numpy(scores), k


@settings(max_examples=60, deadline=None)
@given(score_blocks())
def test_top_ids_equal_a_stable_sort(case: tuple[torch.Tensor, int]) -> None:
    scores, k = case
    got = top_ids(scores, k)
    np.testing.assert_array_equal(got, stable_top(scores.numpy(), min(k, scores.shape[1])))


def test_top_ids_on_a_large_catalogue_and_extreme_values() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((9, 35_648)).astype(np.float32)
    scores[0, :] = 0.0  # one row all tied: its k best are the k lowest ids
    scores[1, rng.choice(35_648, 30)] = np.inf
    scores[2, :] = -np.inf
    scores[3, ::2] = np.finfo(np.float32).max
    got = top_ids(torch.from_numpy(scores), 50)
    np.testing.assert_array_equal(got, stable_top(scores, 50))
    assert got[0].tolist() == list(range(50))


def test_best_of_ranks_candidates_with_ties_to_the_lower_id() -> None:
    vals = np.array([[1.0, 3.0, 3.0, -np.inf, 2.0]], dtype=np.float32)
    ids = np.array([[10, 7, 4, 0, 99]])
    best, tied = best_of(vals, ids, 3)
    assert best.tolist() == [[4, 7, 99]] and tied.tolist() == [True]
    best, tied = best_of(vals, ids, 9)
    assert best.tolist() == [[4, 7, 99, 10, 0]]  # k > N: all of them, ranked
    assert not best_of(vals[:, [0, 2, 4]], ids[:, [0, 2, 4]], 2)[1].any()  # 3 > 2 > 1
    assert not best_of(np.full((1, 3), -np.inf, np.float32), ids[:, :3], 2)[1].any()


@settings(max_examples=40, deadline=None)
@given(score_blocks())
def test_torch_ties_give_torch_topk_lists(case: tuple[torch.Tensor, int]) -> None:
    """With ``torch_ties`` the lists are ``torch.topk``'s, as rf2 ranked before the
    chunked top-k: the same where scores tie (its heap decides), and the same where they
    do not (where the stable sort agrees)."""
    scores, k = case
    k = min(k, scores.shape[1])
    want_s, want_i = torch.topk(scores, k, dim=1, sorted=True)
    got = top_ids(scores, k, torch_ties=True)
    finite = torch.isfinite(want_s).numpy()  # -inf slots (excluded items) are never hits
    np.testing.assert_array_equal(np.where(finite, got, -1), np.where(finite, want_i.numpy(), -1))


def test_fairness_summary_by_hand() -> None:
    out = fairness_summary({"low": 0.1, "mid": 0.2, "high": 0.3}, np.array([0.0, 1.0, np.nan]))
    assert out["worst_best_ratio"] == pytest.approx(1 / 3)
    assert out["max_gap"] == pytest.approx(0.2)
    assert out["group_var"] == pytest.approx(((0.1**2) + 0 + (0.1**2)) / 3)
    assert out["jain"] == pytest.approx(0.6**2 / (3 * 0.14))
    assert out["user_var"] == pytest.approx(0.25)
    assert "user_var" not in fairness_summary({"a": 1.0})


def test_jain_index_bounds() -> None:
    assert fairness_summary({"a": 2.0, "b": 2.0, "c": 2.0})["jain"] == pytest.approx(1.0)
    assert fairness_summary({"a": 0.0, "b": 0.0, "c": 5.0, "d": 0.0})["jain"] == pytest.approx(
        1 / 4)
    assert math.isnan(fairness_summary({"a": 0.0, "b": 0.0})["jain"])


def test_relative_change_and_mdac_by_hand() -> None:
    assert relative_change(0.09, 0.1) == pytest.approx(-0.1)
    assert relative_change(0.5, 0.4) == pytest.approx(0.25)
    assert math.isnan(relative_change(0.5, 0.0))
    assert mdac({"low": -0.5, "mid": 0.0, "high": 0.3}) == pytest.approx(0.8)
    assert mdac({"low": 0.2}) == 0.0
    assert math.isnan(mdac({"low": 0.2, "mid": math.nan}))


def test_group_means_flat_keys() -> None:
    per_user = {"recall@20": np.array([0.0, 1.0, 0.5, np.nan]),
                "auc": np.array([0.5, 0.7, 0.9, np.nan])}
    out = group_means(per_user, np.array([0, 0, 1, 1]), ["low", "high", "empty"])
    assert out["tier/low/recall@20"] == pytest.approx(0.5)
    assert out["tier/low/auc"] == pytest.approx(0.6)
    assert out["tier/low/eval_users"] == 2
    assert out["tier/high/recall@20"] == pytest.approx(0.5)
    assert out["tier/high/eval_users"] == 1
    assert math.isnan(out["tier/empty/auc"]) and out["tier/empty/eval_users"] == 0
    named = group_means(per_user, np.array(["a", "a", "b", "b"]), ["a", "b"], prefix="q")
    assert named["q/a/auc"] == pytest.approx(0.6)


def test_activity_quartile_balanced_with_ties() -> None:
    counts = np.array([1, 1, 1, 1, 1, 1, 2, 3, 10, 50, 1, 1])
    groups, names = activity_quartile(counts)
    assert names == ["q1", "q2", "q3", "q4"]
    assert np.bincount(groups).tolist() == [3, 3, 3, 3]
    assert set(np.flatnonzero(groups == 3)) == {7, 8, 9}  # the most active users
    assert groups[6] == 2


def test_test_loss_is_each_users_mean_cross_entropy_over_all_items() -> None:
    from rf2.core.config import DatasetConfig
    from rf2.data import load_dataset
    from rf2.eval.evaluation import FAMILIES, Evaluator, ScoredBlock

    dataset = load_dataset(DatasetConfig(num_users=60, num_items=40, num_groups=3), 3)
    evaluator = Evaluator(dataset, [5], batch_size=16)
    block = evaluator.blocks[1]
    scores = torch.randn(block.held.num_users, dataset.num_items,
                         generator=torch.Generator().manual_seed(0))
    log_probs = torch.log_softmax(scores.double(), dim=1)
    expected = [-float(log_probs[b, torch.from_numpy(t)].mean())
                for b, t in enumerate(block.targets)]
    scratch = torch.empty_like(scores)  # the second buffer a family may overwrite
    got = FAMILIES["loss"].compute(ScoredBlock(block, torch.empty(0), scores, scratch), None)  # type: ignore[arg-type]
    np.testing.assert_allclose(got["loss"], expected, rtol=1e-5)
