"""Retrievers against the brute-force oracle: exactness, exclusions, padding, accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.eval.evaluation import topk_metrics
from rf2.eval.ranking import ranking_metrics
from rf2.model.hier_index import hard_codes, residual_kmeans
from rf2.model.retrieval import BeamSearchRetriever, BruteForceRetriever, FaissIVFRetriever

torch.set_num_threads(1)


def _problem(
    n_items: int, dim: int, sizes: list[int], seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random keys with a residual k-means tree over them, and 6 random queries."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_items, dim, generator=gen)  # (I, D)
    books = residual_kmeans(keys, sizes, seed=seed)
    codes = hard_codes(keys, books)  # (I, L)
    queries = torch.randn(6, dim, generator=gen)  # (B, D)
    return keys, books, codes, queries


@settings(max_examples=25, deadline=None)
@given(
    n_items=st.integers(1, 60),
    dim=st.integers(1, 6),
    sizes=st.lists(st.integers(2, 4), min_size=1, max_size=3),
    k=st.integers(1, 70),
    seed=st.integers(0, 10_000),
    with_exclude=st.booleans(),
    scan=st.sampled_from(["torch", "faiss"]),
)
def test_full_beam_equals_brute_force(
    n_items: int, dim: int, sizes: list[int], k: int, seed: int, with_exclude: bool, scan: str
) -> None:
    keys, books, codes, queries = _problem(n_items, dim, sizes, seed)
    rng = np.random.default_rng(seed)
    exclude = ([rng.choice(n_items, rng.integers(0, n_items + 1), replace=False)
                for _ in range(len(queries))] if with_exclude else None)
    beam = int(np.prod(sizes))  # as wide as every path: nothing is pruned
    got = BeamSearchRetriever(keys, books, codes, beam, scan=scan).topk(queries, k, exclude)
    want = BruteForceRetriever(keys).topk(queries, k, exclude)
    assert torch.equal(got.item_ids, want.item_ids)
    assert torch.equal(torch.isinf(got.scores), torch.isinf(want.scores))
    finite = torch.isfinite(want.scores)
    assert torch.allclose(got.scores[finite], want.scores[finite], atol=1e-5)
    assert (got.items_scored == n_items).all()


@pytest.mark.parametrize("scan", ["torch", "faiss"])
def test_narrow_beam_scores_exactly_the_items_under_kept_leaves(scan: str) -> None:
    keys, books, codes, queries = _problem(200, 8, [5, 4], seed=3)
    ret = BeamSearchRetriever(keys, books, codes, beam=[2, 3], scan=scan)
    res = ret.topk(queries, 10)
    leaves, _ = ret.leaves(queries)  # (B, 3)
    leaf_of_item = codes[:, 0] * 4 + codes[:, 1]
    for b in range(len(queries)):
        under = torch.isin(leaf_of_item, leaves[b][leaves[b] >= 0])
        assert int(res.items_scored[b]) == int(under.sum())
        got = res.item_ids[b][res.item_ids[b] >= 0]
        assert under[got].all()
        # Scores are exact inner products, and the best of the scored items come first.
        assert torch.allclose(res.scores[b, : len(got)], queries[b] @ keys[got].T, atol=1e-5)
        best = torch.topk(queries[b] @ keys[under].T, min(10, int(under.sum()))).values
        assert torch.allclose(res.scores[b, : len(best)], best, atol=1e-5)


def test_empty_paths_never_take_a_beam_slot() -> None:
    # Every item on one leaf: a beam of 1 must still find it, whatever the node scores.
    keys = torch.randn(9, 3)
    books = [torch.randn(4, 3), torch.randn(3, 3)]
    codes = torch.tensor([[2, 1]] * 9)
    res = BeamSearchRetriever(keys, books, codes, beam=1).topk(torch.randn(5, 3), 4)
    assert (res.items_scored == 9).all() and (res.item_ids >= 0).all()


def test_short_lists_are_padded_and_exclusions_respected() -> None:
    keys = torch.eye(4)
    books = [keys.clone()]
    codes = torch.arange(4).unsqueeze(1)
    q = torch.tensor([[1.0, 0.9, 0.8, 0.7]])
    for ret in (BruteForceRetriever(keys), BeamSearchRetriever(keys, books, codes, beam=4),
                BeamSearchRetriever(keys, books, codes, beam=4, scan="faiss")):
        res = ret.topk(q, 6, exclude=[np.array([0, 2])])
        assert res.item_ids.tolist() == [[1, 3, -1, -1, -1, -1]]
        assert torch.isinf(res.scores[0, 2:]).all()
    res = BeamSearchRetriever(keys, books, codes, beam=1).topk(q, 3, exclude=[np.array([0])])
    assert res.item_ids.tolist() == [[-1, -1, -1]] and int(res.items_scored[0]) == 1


def test_beam_search_chunks_large_batches_identically() -> None:
    keys, books, codes, _ = _problem(300, 16, [8, 8], seed=1)
    queries = torch.randn(40, 16)
    ret = BeamSearchRetriever(keys, books, codes, beam=64)
    whole = ret.topk(queries, 20)
    one_by_one = [ret.topk(queries[i : i + 1], 20) for i in range(40)]
    assert torch.equal(whole.item_ids, torch.cat([r.item_ids for r in one_by_one]))


@pytest.mark.parametrize("kind", ["flat", "rq"])
def test_faiss_ivf_probing_every_list_is_exact(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(400, 8, generator=gen)
    queries = torch.randn(5, 8, generator=gen)
    exclude = [np.array([int(i)]) for i in range(5)]
    want = BruteForceRetriever(keys).topk(queries, 10, exclude)
    refine = 0 if kind == "flat" else 40  # RQ codes are lossy: re-rank exactly
    ret = FaissIVFRetriever(keys, nlist=8, nprobe=8, kind=kind, rq_m=2, rq_nbits=3,
                            refine=refine)
    got = ret.topk(queries, 10, exclude)
    assert torch.equal(got.item_ids, want.item_ids)
    assert (got.items_scored >= 400).all()


def test_topk_metrics_match_ranking_metrics_on_brute_force_lists() -> None:
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(7, 30, generator=gen)
    rng = np.random.default_rng(5)
    exclude = [rng.choice(30, 5, replace=False) for _ in range(7)]
    targets = [rng.choice(30, rng.integers(1, 6), replace=False) for _ in range(7)]
    ids = torch.arange(30).expand(7, -1)
    from rf2.model.retrieval import excluded_mask

    masked = scores.masked_fill(excluded_mask(ids, exclude, 30), float("-inf"))
    top = torch.topk(masked, 10).indices.numpy()
    got = topk_metrics(top, exclude, targets, [5, 10], 30)
    want = ranking_metrics(scores, exclude, targets, [5, 10])
    for key, values in got.items():
        np.testing.assert_allclose(values, want[key], atol=1e-12)
