"""Retrieval benchmark: beam search over the learned index vs brute force vs FAISS IVF.

Item sets: clustered synthetic vectors (10^4, 10^5, 10^6 items, dim 64; min(1024, n/100)
Gaussian clusters, queries drawn around the same centres) and the hier_index model trained
centrally on MovieLens-100K (queries = its users). Per method and setting: recall@100
against brute force, share of items scored (list entries scanned for FAISS), queries
per second on 1 and 2 threads (one process, same query batches), build time.

On the synthetic sets there is no user signal to learn from, so the tree is the index's
initialisation (residual k-means); on MovieLens it is the jointly learned index.
2-thread QPS is only meaningful on an otherwise idle machine: with another process on
one of two cores, 2 threads ran slower than 1 for every method.

    python benchmarks/retrieval.py                   # everything (~10 minutes)
    python benchmarks/retrieval.py --sizes 10000     # one synthetic size, no MovieLens
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from rf2.model.hier_index import hard_codes, residual_kmeans
from rf2.model.retrieval import (
    BeamSearchRetriever,
    BruteForceRetriever,
    FaissIVFRetriever,
    Retriever,
)

K = 100
BATCH = 64  # queries per call, the same for every method
# Per item-set size: index tree (nodes per level), beams (paths kept per level), IVF lists
# (FAISS's usual ~4 sqrt(n)) and nprobe values. Level 1 is IVF-sized, level 2 splits each
# coarse cell into small leaves so the beam can skip most of a cell.
SETTINGS: dict[int, dict] = {
    10_000: {"tree": [128, 8], "beams": [[2, 8], [4, 8], [4, 16], [8, 16], [8, 32]],
             "nlist": 400, "nprobes": [1, 2, 4, 8, 16]},
    100_000: {"tree": [1024, 16], "beams": [[2, 8], [4, 16], [4, 32], [8, 32], [8, 64]],
              "nlist": 1264, "nprobes": [1, 2, 4, 8]},
    1_000_000: {"tree": [2048, 8], "beams": [[4, 8], [8, 16], [8, 24], [16, 32]],
                "nlist": 4000, "nprobes": [1, 2, 4, 8, 16]},
}
RESULTS = Path(__file__).resolve().parent / "results" / "retrieval.md"


@dataclass
class Row:
    dataset: str
    method: str
    param: str
    recall: float
    scored_frac: float
    qps1: float
    qps2: float
    build_s: float


def clustered(n: int, n_queries: int, dim: int = 64, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) items and (n_queries, dim) queries around the same Gaussian centres.

    min(1024, n / 100) clusters: at least ~100 items per cluster, so a query's top 100
    is mostly one cluster (with 1024 clusters at 10^4 items it would span dozens).
    """
    clusters = max(1, min(1024, n // 100))
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen)
    items = centres[torch.randint(clusters, (n,), generator=gen)]
    items = items + 0.5 * torch.randn(n, dim, generator=gen)
    queries = centres[torch.randint(clusters, (n_queries,), generator=gen)]
    return items, queries + 0.5 * torch.randn(n_queries, dim, generator=gen)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def qps(retriever: Retriever, queries: torch.Tensor, threads: int, min_s: float = 0.3) -> float:
    """Queries per second over batches of BATCH, repeated for at least ``min_s``."""
    set_threads(threads)
    retriever.topk(queries[:BATCH], K)  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        for lo in range(0, len(queries), BATCH):
            retriever.topk(queries[lo : lo + BATCH], K)
        done += len(queries)
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            set_threads(1)
            return done / elapsed


def evaluate(retriever: Retriever, queries: torch.Tensor, truth: np.ndarray) -> tuple[float, float]:
    """Recall@K against brute force's top K, and the mean share of items scored."""
    set_threads(1)
    hits, scored = 0, 0
    for lo in range(0, len(queries), BATCH):
        res = retriever.topk(queries[lo : lo + BATCH], K)
        ids = res.item_ids.numpy()
        for got, want in zip(ids, truth[lo : lo + BATCH], strict=True):
            hits += np.intersect1d(got[got >= 0], want).size
        scored += int(res.items_scored.sum())
    return hits / truth.size, scored / (len(queries) * retriever.num_items)


def timed(build: Callable[[], Retriever]) -> tuple[Retriever, float]:
    set_threads(1)
    start = time.perf_counter()
    ret = build()
    return ret, time.perf_counter() - start


def bench_set(name: str, keys: torch.Tensor, queries: torch.Tensor, qps_queries: int,
              sizes: list[int], beams: list, nlist: int, nprobes: list[int],
              tree: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> list[Row]:
    """All methods on one item set; ``tree`` = a learned (codebooks, codes) if any."""
    rows: list[Row] = []
    n = keys.shape[0]
    q_qps = queries[:qps_queries]
    brute, build_s = timed(lambda: BruteForceRetriever(keys))
    truth = np.concatenate([brute.topk(queries[lo : lo + BATCH], K).item_ids.numpy()
                            for lo in range(0, len(queries), BATCH)])
    # Brute force at 10^6 is slow: its QPS is measured on at most 128 queries.
    bq = q_qps[: min(len(q_qps), 128 if n >= 500_000 else len(q_qps))]
    rows.append(Row(name, "brute force", "-", 1.0, 1.0, qps(brute, bq, 1), qps(brute, bq, 2),
                    build_s))
    print(_fmt(rows[-1]), flush=True)

    start = time.perf_counter()
    if tree is None:
        books = residual_kmeans(keys, sizes, seed=0, iters=10, points_per_centroid=32)
        codes = hard_codes(keys, books)
        label = f"beam, RQ k-means {'x'.join(map(str, sizes))}"
    else:
        books, codes = tree
        label = f"beam, learned {'x'.join(str(len(b)) for b in books)}"
    tree_s = time.perf_counter() - start
    # The torch kernel is the reference; at 10^6 items only FAISS's is timed (budget).
    for scan in ("faiss",) if n >= 500_000 else ("faiss", "torch"):
        start = time.perf_counter()
        ret = BeamSearchRetriever(keys, books, codes, beams[0], scan=scan)
        build_s = tree_s + time.perf_counter() - start
        for beam in beams:
            ret.beams = [beam] * len(books) if isinstance(beam, int) else list(beam)
            rec, frac = evaluate(ret, queries, truth)
            rows.append(Row(name, f"{label}, {scan} scan", f"beam={beam}", rec, frac,
                            qps(ret, q_qps, 1), qps(ret, q_qps, 2), build_s))
            print(_fmt(rows[-1]), flush=True)
    # RQ encoding beam 2 (FAISS default 5): at 10^6 items the default takes minutes.
    # Its 32-bit codes rank coarsely, so the best 16 k are re-scored exactly.
    rq = {"rq_m": 4, "rq_nbits": 8, "rq_beam": 2, "refine": 16}
    for kind, extra in (("flat", {}), ("rq", rq)):
        ret, build_s = timed(lambda kind=kind, extra=extra: FaissIVFRetriever(
            keys, nlist=nlist, nprobe=1, kind=kind, **extra))
        label = f"FAISS IVF{'Flat' if kind == 'flat' else '-RQ4x8+refine16'} nlist={nlist}"
        for nprobe in nprobes:
            ret._ivf.nprobe = ret.nprobe = nprobe  # type: ignore[attr-defined]
            rec, frac = evaluate(ret, queries, truth)
            rows.append(Row(name, label, f"nprobe={nprobe}", rec, frac, qps(ret, q_qps, 1),
                            qps(ret, q_qps, 2), build_s))
            print(_fmt(rows[-1]), flush=True)
    return rows


def movielens_set(path: str, epochs: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Train hier_index centrally on MovieLens-100K; its item keys, user queries, tree."""
    from rf2.core.config import DatasetConfig, IndexConfig, ModelConfig
    from rf2.data import load_dataset
    from rf2.model import HierIndexModel, build_model
    from rf2.model.examples import eval_histories
    from rf2.model.ttt import fit_central

    ds = load_dataset(DatasetConfig(name="movielens100k", path=path), 123)
    model = build_model(ModelConfig(name="hier_index", index=IndexConfig(warmup_steps=50)),
                        ds, 123)
    assert isinstance(model, HierIndexModel)
    fit_central(model, ds, epochs, lr=0.01, seed=0)
    with torch.no_grad():
        users = np.arange(ds.num_users)
        hist = torch.from_numpy(eval_histories(ds, users))
        queries = model.query_vectors(model.user_embedding(hist))
        keys = model.item_keys()
        codes = model.refresh_index()
        books = [b.detach() for b in model.codebooks()]
    return keys.detach(), queries, (books, codes)


HEADER = ("| item set | method | setting | recall@100 | items scored | QPS 1 thr | QPS 2 thr "
          "| build s |\n|---|---|---|---|---|---|---|---|")


def _fmt(r: Row) -> str:
    return (f"| {r.dataset} | {r.method} | {r.param} | {r.recall:.4f} | {r.scored_frac:.4f} "
            f"| {r.qps1:,.0f} | {r.qps2:,.0f} | {r.build_s:.1f} |")


def summary(rows: list[Row], target: float = 0.95) -> list[str]:
    """Per item set: the fastest setting of each method family reaching ``target``."""
    out = []
    for name in dict.fromkeys(r.dataset for r in rows):
        group = [r for r in rows if r.dataset == name]
        brute = next(r for r in group if r.method == "brute force")
        for family in dict.fromkeys(r.method for r in group if r.method != "brute force"):
            ok = [r for r in group if r.method == family and r.recall >= target]
            if not ok:
                best = max((r for r in group if r.method == family), key=lambda r: r.recall)
                out.append(f"- {name} / {family}: never reaches recall {target} "
                           f"(best {best.recall:.3f} at {best.param})")
                continue
            r = max(ok, key=lambda r: r.qps1)
            out.append(f"- {name} / {family}: {r.param} recall {r.recall:.3f}, "
                       f"{r.scored_frac:.2%} scored, {r.qps1:,.0f} QPS = "
                       f"{r.qps1 / brute.qps1:.1f}x brute force (1 thread)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SETTINGS))
    parser.add_argument("--queries", type=int, default=1000, help="for recall")
    parser.add_argument("--qps-queries", type=int, default=512)
    parser.add_argument("--movielens", default=None,
                        help="MovieLens-100K directory (default ../shared/data/ml-100k)")
    parser.add_argument("--ml-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    set_threads(1)
    rows: list[Row] = []
    print(HEADER, flush=True)
    for n in args.sizes:
        keys, queries = clustered(n, args.queries)
        st = SETTINGS.get(n, SETTINGS[100_000])
        rows += bench_set(f"synthetic {n:.0e}", keys, queries, args.qps_queries, st["tree"],
                          st["beams"], st["nlist"], st["nprobes"])
    ml = args.movielens or str(Path(__file__).resolve().parents[2] / "shared/data/ml-100k")
    if Path(ml, "u.data").is_file() and args.ml_epochs > 0:
        keys, queries, tree = movielens_set(ml, args.ml_epochs)
        rows += bench_set("MovieLens-100K", keys, queries, args.qps_queries, [], [4, 8, 16, 32],
                          int(4 * np.sqrt(keys.shape[0])), [1, 2, 4, 8, 16], tree)
    lines = [HEADER, *(_fmt(r) for r in rows), "", "Fastest setting reaching recall@100 >= "
             "0.95:", *summary(rows)]
    print("\n".join(lines[len(rows) + 1 :]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Retrieval benchmark\n\n" + __doc__ + "\n" + "\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
