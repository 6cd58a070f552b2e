"""Evaluation speed: full and sampled server-side evaluation, this tree against a baseline.

Settings (each measured in a fresh subprocess, this tree and the baseline alternating,
``--repeat`` times each; the best of the repeats is reported):

- ``amazon-cds`` (RecBole folder ``--data``, 43,169 test users x 35,648 items), models
  ``two_tower`` and ``hier_index``: every metric family on every test user;
- ``sampled``: ``eval.max_users=5000`` on synthetic populations of 43k and 500k users
  (same 20k items, same clicks per user): the cost of a sampled round should not grow
  with the population;
- ``synthetic 500k``: every test user of a 500k-user x 20k-item synthetic population
  (~50 clicks per user, Zipf item popularity), built directly with NumPy here (the
  population build is another benchmark's business).

Per setting: Evaluator construction seconds, evaluation wall and CPU seconds, the ratio
this tree / baseline measured in this run, and whether every metric value is identical
(max |difference| over all keys of the metrics row). The baseline is the evaluator
before the evaluation-speed work (``--baseline``, a git revision, extracted with
``git archive`` into a temporary folder and imported from there); ``--baseline none``
measures this tree only. The models are untrained (seeded initialisation): evaluation
cost does not depend on training, and the metric values are compared, not judged.

Wall times on a shared machine are inflated by other processes; the ratio is measured in
one run (baseline and this tree alternating), and CPU seconds are the steadier figure.

    python benchmarks/evaluation.py                        # everything (~10 min on 2 cores)
    python benchmarks/evaluation.py --settings cds         # amazon-cds only
    python benchmarks/evaluation.py --settings large --baseline none
    python benchmarks/evaluation.py --stages 3000       # per-stage cost, before vs now
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = "54c0e89"  # main before the evaluation-speed work (issue 19 item 4)
TARGETS = {"cds/two_tower": 10.0, "cds/hier_index": 15.0, "large/two_tower": 60.0}
SAMPLED_USERS = 5000


def shared_data(name: str) -> str:
    for base in (REPO.parent, REPO.parent.parent):
        if (base / "shared" / "data" / name).is_dir():
            return str(base / "shared" / "data" / name)
    return str(REPO.parent / "shared" / "data" / name)


# -- inside the measuring subprocess ------------------------------------------------------
def synthetic_population(num_users: int, num_items: int, mean_clicks: float, seed: int):  # noqa: ANN201
    """A FederatedDataset of random clicks, vectorised: lognormal clicks per user (sigma
    1, clipped to [2, I/2]), items by Zipf popularity (exponent 1, random ranks), the
    last 20% of each user's clicks held out."""
    import numpy as np

    from rf2.data.base import FederatedDataset

    rng = np.random.default_rng(seed)
    mu = np.log(mean_clicks) - 0.5
    n = np.clip(np.rint(rng.lognormal(mu, 1.0, num_users)), 2, num_items // 2).astype(np.int64)
    pop = 1.0 / np.arange(1, num_items + 1)
    cdf = np.cumsum(pop[rng.permutation(num_items)])
    cdf /= cdf[-1]
    items = np.minimum(np.searchsorted(cdf, rng.random(int(n.sum()))), num_items - 1)
    n_test = np.maximum(1, n // 5)
    n_train = n - n_test
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    pos = np.arange(items.size) - np.repeat(start, n)
    is_test = pos >= np.repeat(n_train, n)
    return FederatedDataset(
        name="synthetic-bench", num_users=num_users, num_items=num_items,
        train_indptr=np.concatenate([[0], np.cumsum(n_train)]).astype(np.int64),
        train_items=items[~is_test].astype(np.int64),
        test_indptr=np.concatenate([[0], np.cumsum(n_test)]).astype(np.int64),
        test_items=items[is_test].astype(np.int64), history_len=10)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One evaluation, in this (fresh) process: build, evaluate, report."""
    import numpy as np
    import torch

    from rf2.core.config import load_run_config
    from rf2.eval.evaluation import Evaluator
    from rf2.model import build_model

    cfg = load_run_config({"seed": 1, "model": {"name": spec["model"]}})
    if spec["data"] == "cds":
        from rf2.data import load_dataset

        cfg = load_run_config({"seed": 1, "model": {"name": spec["model"]},
                               "dataset": {"name": "recbole", "path": spec["path"]}})
        dataset = load_dataset(cfg.dataset, cfg.seed)
    else:
        dataset = synthetic_population(spec["users"], spec["items"], 50.0, seed=0)
    model = build_model(cfg.model, dataset, cfg.seed)
    tiers = np.arange(dataset.num_users) % 3  # three strata, as a tiered run has
    torch.set_num_threads(1)  # as in-process clients leave it; evaluation sets its own
    start = time.perf_counter()
    evaluator = Evaluator(dataset, cfg.eval.ks, cfg.eval.batch_size, tiers, ["t0", "t1", "t2"],
                          metrics=spec.get("metrics", cfg.eval.metrics),
                          max_users=spec.get("max_users", 0), seed=cfg.seed)
    init_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    row = evaluator.evaluate_model(model)
    eval_s = time.perf_counter() - start
    return {"init_s": init_s, "eval_s": eval_s, "cpu_s": time.process_time() - cpu,
            "users": row["eval_users"], "items": dataset.num_items,
            "row": {k: v for k, v in row.items() if isinstance(v, float | int)}}


def _auc_before(scores, packed, held, buf):  # noqa: ANN001, ANN202 - the reference stage
    """The AUC stage before this work: NaN at seen items, a < and a <= pass per positive."""
    import numpy as np
    import torch

    num_users, num_items = scores.shape
    scores.view(-1)[held.seen_keys] = float("nan")
    acc = torch.zeros(num_users, dtype=torch.float64)
    for j, start in enumerate(held.col_start.tolist()):
        block, out = scores[start:], buf[: num_users - start]
        p = packed[start:, j : j + 1]
        acc[start:] += torch.lt(block, p, out=out).sum(1)
        acc[start:] += torch.le(block, p, out=out).sum(1)
    pairs = (held.n_pos * held.n_neg).astype(np.float64)
    return np.where(pairs > 0, 0.5 * acc.numpy() / np.maximum(pairs, 1), np.nan)


def stages(spec: dict[str, Any]) -> dict[str, float]:
    """Per-block cost of each stage, before and now, on the same blocks in one process
    (single thread; the best of ``repeat`` runs of each, which filters out the time a
    loaded machine takes away): an estimate of what idle cores would spend."""
    import torch

    from rf2.core.config import load_run_config
    from rf2.data import load_dataset
    from rf2.eval.evaluation import Evaluator
    from rf2.model import build_model

    cfg = load_run_config({"seed": 1, "model": {"name": "two_tower"},
                           "dataset": {"name": "recbole", "path": spec["path"]}})
    dataset = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, dataset, cfg.seed)
    evaluator = Evaluator(dataset, cfg.eval.ks, cfg.eval.batch_size, max_users=spec["users"],
                          seed=cfg.seed)
    torch.set_num_threads(1)
    k = max(cfg.eval.ks)
    total: dict[str, float] = {}

    def best(name: str, fn, prepare) -> None:  # noqa: ANN001
        times = []
        for _ in range(spec["repeat"]):
            prepare()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        total[name] = total.get(name, 0.0) + min(times)

    with torch.no_grad():
        for block in evaluator.blocks:
            _stage_block(model, block, k, best)
    return total | {"blocks": len(evaluator.blocks)}


def _stage_block(model, block, k: int, best) -> None:  # noqa: ANN001
    """Each stage of one block, before and now (see :func:`stages`)."""
    import torch

    from rf2.eval.evaluation import logsumexp_rows
    from rf2.eval.ranking import _auc, top_ids

    held, n = block.held, block.held.num_users
    raw = model.score_users(block.histories)
    work, scratch = torch.empty_like(raw), torch.empty_like(raw)
    packed = raw.new_full((n, max(len(held.col_start), 1)), float("nan"))
    packed[held.pos_rows, held.pos_slots] = raw.view(-1)[torch.from_numpy(held.pos_keys)]

    def fresh() -> None:
        work.copy_(raw)

    def masked() -> None:
        work.copy_(raw)
        work.view(-1)[held.ex_keys] = float("-inf")

    best("scores (matmul)", lambda: model.score_users(block.histories), fresh)
    best("loss before (torch.logsumexp)", lambda: torch.logsumexp(work, 1), fresh)
    best("loss now", lambda: logsumexp_rows(work, scratch), fresh)
    best("top-k before (torch.topk)", lambda: torch.topk(work, k, 1), masked)
    best("top-k now", lambda: top_ids(work, k, torch_ties=True), masked)
    best("auc before", lambda: _auc_before(work, packed, held, scratch), masked)
    best("auc now", lambda: _auc(work, packed, held, scratch), masked)


# -- the driver ---------------------------------------------------------------------------
def baseline_tree(rev: str) -> Path | None:
    """The baseline's rf2 package extracted into a temporary folder (None = no git)."""
    out = Path(tempfile.mkdtemp(prefix="rf2-eval-baseline-"))
    archive = out / "rf2.tar"
    proc = subprocess.run(["git", "archive", "-o", str(archive), rev, "rf2"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"baseline {rev}: not available ({proc.stderr.strip()}); measuring this tree only")
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out


def run_one(spec: dict[str, Any], tree: Path | None) -> dict[str, Any] | None:
    env = dict(os.environ)
    if tree is not None:  # the baseline's rf2 shadows the installed (this tree's) one
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False, cwd=tree or REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not line:
        print(f"{spec} ({'baseline' if tree else 'this tree'}): failed\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    return json.loads(line[-1])


def best(results: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    done = [r for r in results if r is not None]
    return min(done, key=lambda r: r["eval_s"]) if done else None


def max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """Max |a - b| over the keys of both rows (inf when the keys differ; NaN = NaN)."""
    if a.keys() != b.keys():
        print(f"keys only in this tree: {sorted(a.keys() - b.keys())[:10]}; "
              f"only in the baseline: {sorted(b.keys() - a.keys())[:10]}")
        return float("inf")
    worst, where = 0.0, ""
    for key, x in a.items():
        y = b[key]
        if x != x and y != y:  # both NaN
            continue
        if abs(x - y) > worst:
            worst, where = abs(x - y), f"{key}: {x!r} vs {y!r}"
    if worst:
        print(f"largest difference: {where}")
    return worst


def settings(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    chosen = set(args.settings.split(","))
    cds = Path(args.data).is_dir()
    if "cds" in chosen:
        if not cds:
            print(f"amazon-cds not found at {args.data}: skipping the cds settings")
        for model in args.models.split(","):
            if cds:
                out.append((f"cds/{model}", {"data": "cds", "path": args.data, "model": model}))
    if "sampled" in chosen:  # same catalogue and clicks per user, 43k vs 500k users
        for users in (43_169, args.large_users):
            out.append((f"sampled/synthetic {users // 1000}k",
                        {"data": "synthetic", "users": users, "items": args.large_items,
                         "model": "two_tower", "max_users": SAMPLED_USERS}))
    if "large" in chosen:
        out.append(("large/two_tower", {"data": "synthetic", "users": args.large_users,
                                        "items": args.large_items, "model": "two_tower"}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=shared_data("amazon-cds"))
    parser.add_argument("--models", default="two_tower,hier_index")
    parser.add_argument("--settings", default="cds,sampled,large",
                        help="comma-separated: cds, sampled, large")
    parser.add_argument("--baseline", default=BASELINE, help="git revision, or 'none'")
    parser.add_argument("--baseline-large", action="store_true",
                        help="also run the baseline on the 500k settings (minutes)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--large-users", type=int, default=500_000)
    parser.add_argument("--large-items", type=int, default=20_000)
    parser.add_argument("--stages", type=int, default=0, metavar="USERS",
                        help="instead: per-stage cost before/now on USERS amazon-cds users")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "evaluation.md"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    if args.stages:
        if not Path(args.data).is_dir():
            print(f"amazon-cds not found at {args.data}")
            return
        cost = stages({"path": args.data, "users": args.stages, "repeat": 5})
        blocks = cost.pop("blocks")
        print(f"amazon-cds two_tower, {args.stages} users ({blocks:.0f} blocks), one thread, "
              "best of 5 per block, summed (CPU s):")
        for name, s in cost.items():
            print(f"- {name}: {s:.2f} s")
        before = sum(v for n, v in cost.items() if "before" in n or n.startswith("scores"))
        now = sum(v for n, v in cost.items() if "now" in n or n.startswith("scores"))
        print(f"- these stages before {before:.2f} s, now {now:.2f} s: {now / before:.2f}x")
        return
    tree = None if args.baseline == "none" else baseline_tree(args.baseline)
    lines = ["| setting | users x items | init s (baseline) | eval s (baseline) | eval CPU s "
             "(baseline) | new / baseline | identical metrics |", "|---|---|---|---|---|---|---|"]
    measured: dict[str, dict[str, Any]] = {}
    for name, spec in settings(args):
        with_base = tree is not None and (name.startswith("cds") or args.baseline_large)
        new_runs, base_runs = [], []
        for _ in range(args.repeat):  # alternate, so both see the same load
            new_runs.append(run_one(spec, None))
            if with_base:
                base_runs.append(run_one(spec, tree))
        new, base = best(new_runs), best(base_runs)
        if new is None:
            continue
        measured[name] = new
        ratio = f"{new['eval_s'] / base['eval_s']:.2f}" if base else "–"
        same = "–"
        if base:
            diff = max_difference(new["row"], base["row"])
            same = "yes" if diff == 0 else f"max diff {diff:.2e}"
        b = base or {}
        lines.append(
            f"| {name} | {new['users']:,} x {new['items']:,} | {new['init_s']:.1f} "
            f"({b.get('init_s', float('nan')):.1f}) | {new['eval_s']:.2f} "
            f"({b.get('eval_s', float('nan')):.2f}) | {new['cpu_s']:.1f} "
            f"({b.get('cpu_s', float('nan')):.1f}) | {ratio} | {same} |")
        print(lines[-1], flush=True)
    notes = ["", "Targets (wall s of this tree, measured in this run):"]
    for key, target in TARGETS.items():
        if key in measured:
            s = measured[key]["eval_s"]
            notes.append(f"- {key}: {s:.1f} s (target <= {target:.0f} s on idle cores: "
                         f"{'met' if s <= target else 'not met as measured'})")
    sampled = [v for k, v in measured.items() if k.startswith("sampled/")]
    if len(sampled) == 2:
        small, large = sampled
        notes.append(f"- sampled evaluation ({SAMPLED_USERS} users, {small['items']:,} items), "
                     f"{args.large_users // 1000}k / 43k population: "
                     f"{large['eval_s'] / small['eval_s']:.2f}x wall, "
                     f"{large['cpu_s'] / small['cpu_s']:.2f}x CPU")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes.append(f"- load average at the end: {load:.1f} on {os.cpu_count()} cores")
    text = "\n".join(lines + notes)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# Evaluation benchmark\n\n" + text + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
