"""Central baseline: full softmax vs sampled softmax (K negatives), one epoch each.

``mode=central`` is the reference a federated result is judged against, so its loss
should be the strongest one that fits in time. This trains the same model for one
epoch (Adam 0.01, batch 256, the central defaults) with each loss, back to back in one
process, and prints Recall@20 / NDCG@20 after the epoch, the training seconds (the
epoch without its evaluations) and each variant's time as a ratio of the sampled
K=200 run measured in the same process (the ratios are what to compare on a shared,
loaded machine; absolute seconds are not).

The data are RecBole atomic files (default: Amazon-CDs, ``../shared/data/amazon-cds``
next to the checkout); ``--users N`` keeps the first N users (all items), written as a
temporary RecBole folder (nothing is copied into the repository).

    python benchmarks/central_loss.py --users 5000            # ~10 min on 2 busy cores
    python benchmarks/central_loss.py --variants full,200,2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> Path:
    for base in (REPO.parent, REPO.parent.parent):
        if (base / "shared" / "data" / name).is_dir():
            return base / "shared" / "data" / name
    return REPO.parent / "shared" / "data" / name


def subset(path: Path, users: int, out: Path) -> Path:
    """The first ``users`` users of ``path``'s ``.inter`` file (every item kept)."""
    name = path.name
    target = out / name
    target.mkdir(parents=True)
    kept: set[str] = set()
    with open(path / f"{name}.inter", encoding="utf-8") as src, \
            open(target / f"{name}.inter", "w", encoding="utf-8") as dst:
        dst.write(src.readline())
        for line in src:
            user = line.split("\t", 1)[0]
            if user not in kept and len(kept) >= users:
                continue
            kept.add(user)
            dst.write(line)
    for extra in (f"{name}.item",):
        if (path / extra).is_file():
            (target / extra).symlink_to(path / extra)
    return target


def variant_config(name: str, data: Path, model: str, seed: int) -> dict[str, Any]:
    loss: dict[str, Any] = ({"loss": "full"} if name == "full"
                            else {"loss": "sampled", "num_negatives": int(name)})
    return {"mode": "central", "seed": seed, "progress": False, "tensorboard": False,
            "dataset": {"name": "recbole", "path": str(data)},
            "model": {"name": model, **loss,
                      "index": {"index_loss_weight": 0.1, "balance_sample": 512}},
            "central": {"epochs": 1},
            "eval": {"ks": [20], "max_users": 0}}


def step_seconds(data: Path, variants: list[str], model: str, seed: int, steps: int,
                 repeats: int) -> dict[str, float]:
    """Median seconds per training step of each variant, measured interleaved
    (``steps`` steps of each variant in turn, ``repeats`` times), so that a change of
    load on a shared machine hits every variant alike."""
    import statistics

    from rf2.core.config import load_run_config
    from rf2.data import load_dataset
    from rf2.model import build_model
    from rf2.model.central import CentralTrainer, pooled_examples

    cfgs = {v: load_run_config(variant_config(v, data, model, seed)) for v in variants}
    dataset = load_dataset(cfgs[variants[0]].dataset, seed)
    hist, tgt = pooled_examples(dataset)
    trainers = {v: CentralTrainer(build_model(c.model, dataset, seed), hist, tgt, c.central,
                                  seed) for v, c in cfgs.items()}
    for trainer in trainers.values():
        trainer.train_until(2)  # warm-up: allocations, optimizer state
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v, trainer in trainers.items():
            started = time.perf_counter()
            trainer.train_until(trainer.step + steps)
            times[v].append((time.perf_counter() - started) / steps)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data("amazon-cds"))
    parser.add_argument("--users", type=int, default=5000, help="0 = all users")
    parser.add_argument("--model", default="two_tower")
    parser.add_argument("--variants", default="200,1000,2000,full",
                        help="comma-separated: full, or a number of negatives")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probe-steps", type=int, default=10,
                        help="steps per variant per turn of the interleaved timing")
    parser.add_argument("--probe-repeats", type=int, default=5)
    parser.add_argument("--no-epoch", action="store_true",
                        help="only the interleaved step timing (no one-epoch runs)")
    args = parser.parse_args()
    if not (args.data / f"{args.data.name}.inter").is_file():
        sys.exit(f"no RecBole data at {args.data}")
    sys.path.insert(0, str(REPO))
    import torch

    from rf2.cli.support import run_job
    from rf2.runs.run_folder import RunFolder

    torch.set_num_threads(1)
    results = []
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="rf2-central-loss-") as tmp:
        data = subset(args.data, args.users, Path(tmp) / "data") if args.users else args.data
        probe = step_seconds(data, variants, args.model, args.seed, args.probe_steps,
                             args.probe_repeats)
        ref_step = probe.get("200", next(iter(probe.values())))
        print("seconds per step (interleaved, median): " + ", ".join(
            f"{v} {t:.3f} ({t / ref_step:.2f}x)" for v, t in probe.items()), flush=True)
        for name in [] if args.no_epoch else variants:
            started = time.perf_counter()
            run = run_job(variant_config(name, data, args.model, args.seed),
                          Path(tmp) / f"run-{name}")
            wall = time.perf_counter() - started
            rows = RunFolder(run).read_metrics()
            last = rows[-1]
            train_s = sum(r["round_wall_s"] - r["eval_wall_s"] for r in rows[1:])
            results.append({"variant": name, "recall": last["recall@20"],
                            "ndcg": last["ndcg@20"], "train_s": train_s, "wall_s": wall,
                            "popularity": rows[0].get("popularity/recall@20")})
            print(f"{name}: recall@20 {last['recall@20']:.4f} train {train_s:.0f} s",
                  flush=True)
    if not results:
        return
    ref = next((r for r in results if r["variant"] == "200"), results[0])
    users = f"first {args.users} users" if args.users else "all users"
    print(f"\n{args.data.name} ({users}), {args.model}, mode=central, 1 epoch, Adam 0.01, "
          f"batch 256; time ratios vs sampled K=200 in this run")
    print("| loss | Recall@20 | NDCG@20 | epoch train s | epoch time vs K=200 | "
          "step time vs K=200 (interleaved) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        label = "full softmax" if r["variant"] == "full" else f"sampled, K={r['variant']}"
        print(f"| {label} | {r['recall']:.4f} | {r['ndcg']:.4f} | {r['train_s']:.0f} | "
              f"{r['train_s'] / ref['train_s']:.2f}x | "
              f"{probe[r['variant']] / ref_step:.2f}x |")
    if ref.get("popularity") is not None:
        print(f"popularity Recall@20: {ref['popularity']:.4f}")


if __name__ == "__main__":
    main()
