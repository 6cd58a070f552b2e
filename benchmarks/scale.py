"""Scale: the same 100-client round on MovieLens-100K (1.7k items) and a large catalogue.

For each dataset x model (two_tower, hier_index) x backend (inprocess, ray) a fresh
subprocess runs rf2 for a few rounds with 100 clients per round and reports:

- training seconds per round (median ``round_wall_s`` of the rounds after the first that
  ran no evaluation), and bytes moved per round (``bytes_down`` + ``bytes_up``), with
  bytes up per client as a share of the dense model;
- evaluation seconds of the final model, in the same in-process subprocess: all test
  users over all items with every metric family (``full``), and a seeded, tier-stratified
  sample of 5,000 test users (``sampled``);
- the process tree's peak RSS (Ray workers included).

Then it prints the ratios measured in this run against the targets of issue 11 (training
round at the large catalogue <= 2x the round at 1.7k items; full evaluation <= 30 s;
sampled <= 5 s; Ray peak memory <= 3 GB) and writes a Markdown table to
``benchmarks/results/scale.md``. Targets are reported, never asserted.

The large catalogue is Amazon-CDs (RecBole atomic files, 43k users x 36k items) when
``--large`` points at it (default ``../shared/data/amazon-cds`` next to the checkout),
else a synthetic catalogue of the same size. Nothing is copied from the data folders.

    python benchmarks/scale.py                 # full table (tens of minutes on 2 cores)
    python benchmarks/scale.py --quick         # two_tower, in-process, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_overhead import PeakMemory  # noqa: E402 - benchmarks share the RSS sampler

REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> str:
    """``shared/data/NAME`` next to the checkout (or next to its worktree folder)."""
    for base in (REPO.parent, REPO.parent.parent):
        if (base / "shared" / "data" / name).is_dir():
            return str(base / "shared" / "data" / name)
    return str(REPO.parent / "shared" / "data" / name)
SAMPLED_USERS = 5000
TARGETS = {"train_ratio": 2.0, "eval_full_s": 30.0, "eval_sampled_s": 5.0, "ray_rss_gb": 3.0}


def dataset_spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """rf2 ``dataset`` config of a benchmark dataset name."""
    if name == "ml100k":
        return {"name": "movielens100k", "path": str(args.ml100k)}
    large = Path(args.large) if args.large else None
    if large is not None and large.is_dir():
        return {"name": "recbole", "path": str(large)}
    return {"name": "synthetic", "num_users": 43_000, "num_items": 36_000}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting, in this (fresh) process."""
    import numpy as np
    import torch

    from rf2.cli.support import quiet_frameworks, run_job
    from rf2.core.config import load_run_config
    from rf2.data import load_dataset
    from rf2.eval.evaluation import Evaluator

    quiet_frameworks(False)
    rounds = spec["rounds"]
    cfg_map: dict[str, Any] = {
        "seed": 1, "num_rounds": rounds, "clients_per_round": 100, "progress": False,
        "checkpoint_every": 0, "dataset": spec["dataset"], "model": {"name": spec["model"]},
        # In-run evaluation kept small (round 0 and the last round): evaluation is
        # measured below on its own, so the round times here are training rounds.
        "eval": {"every": 10_000, "max_users": 200, "metrics": ["recall"]},
        "simulation": {"backend": spec["backend"]},
    }
    if spec["backend"] == "ray":
        cfg_map["simulation"]["ray_temp_dir"] = tempfile.mkdtemp(prefix="rf2s")
    mem = PeakMemory()
    mem.start()
    out = Path(tempfile.mkdtemp(prefix="rf2scale")) / "run"
    t0 = time.perf_counter()
    run_job(cfg_map, out)
    total_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    training = [r for r in rows if r["round"] >= 2 and "eval_wall_s" not in r]
    if not training:  # too few rounds: fall back to every trained round
        training = [r for r in rows if r["round"] >= 1]
    model_state = torch.load(out / "model.pt", weights_only=True)
    dense_bytes = float(sum(v.numel() * v.element_size() for v in model_state.values()))
    result: dict[str, Any] = {
        "dataset": spec["name"], "model": spec["model"], "backend": spec["backend"],
        "train_s": statistics.median(r["round_wall_s"] for r in training),
        "round0_eval_s": rows[0].get("eval_wall_s", float("nan")),
        "bytes_per_round": statistics.mean(r["bytes_up"] + r["bytes_down"] for r in training),
        "up_share_of_dense": statistics.mean(
            r["bytes_up"] / max(r["num_clients_trained"], 1) for r in training) / dense_bytes,
        "dense_mb": dense_bytes / 1e6, "total_s": total_s,
    }
    if spec["eval"]:
        cfg = load_run_config(cfg_map)
        dataset = load_dataset(cfg.dataset, cfg.seed)
        from rf2.model import build_model

        model = build_model(cfg.model, dataset, cfg.seed)
        model.load_state_dict(model_state)
        tiers = np.arange(dataset.num_users) % 3  # three strata, as a tiered run has
        for key, max_users in (("eval_full", 0), ("eval_sampled", SAMPLED_USERS)):
            evaluator = Evaluator(dataset, cfg.eval.ks, 1024, tiers, ["t0", "t1", "t2"],
                                  max_users=max_users, seed=cfg.seed)
            start, cpu = time.perf_counter(), time.process_time()
            row = evaluator.evaluate_model(model)
            result[f"{key}_s"] = time.perf_counter() - start
            # CPU seconds of all threads: on a busy machine wall time also counts waiting.
            result[f"{key}_cpu_s"] = time.process_time() - cpu
            result[f"{key}_users"] = row["eval_users"]
        result["num_items"] = dataset.num_items
    mem.stop.set()
    result["peak_rss_gb"] = mem.peak / 1e9
    return result


def run_setting(spec: dict[str, Any]) -> dict[str, Any] | None:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not line:
        print(f"{spec['name']} {spec['model']} {spec['backend']}: failed\n"
              f"{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(line[-1])
    print(json.dumps(result), flush=True)
    return result


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report(results: list[dict[str, Any]]) -> str:
    header = ("| dataset | model | backend | train s/round | MB/round | up/client vs dense "
              "| eval full s (CPU s) | eval 5k s (CPU s) | peak RSS GB |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['dataset']} | {r['model']} | {r['backend']} | {r['train_s']:.2f} | "
        f"{r['bytes_per_round'] / 1e6:.1f} | {100 * r['up_share_of_dense']:.1f}% | "
        f"{_fmt(r.get('eval_full_s'), '.1f')} ({_fmt(r.get('eval_full_cpu_s'), '.1f')}) | "
        f"{_fmt(r.get('eval_sampled_s'), '.2f')} ({_fmt(r.get('eval_sampled_cpu_s'), '.2f')}) | "
        f"{r['peak_rss_gb']:.2f} |" for r in results
    ]
    by = {(r["dataset"], r["model"], r["backend"]): r for r in results}
    notes = ["", "Ratios and targets (measured in this run):"]
    for (name, model, backend), r in sorted(by.items()):
        if name != "large":
            continue
        small = by.get(("ml100k", model, backend))
        if small is not None:
            ratio = r["train_s"] / small["train_s"]
            ok = "met" if ratio <= TARGETS["train_ratio"] else "NOT met"
            notes.append(f"- {model}/{backend}: training round large / ML-100K = {ratio:.1f}x "
                         f"(target <= {TARGETS['train_ratio']:.0f}x: {ok})")
        if "eval_full_s" in r:
            for key in ("eval_full", "eval_sampled"):
                target = TARGETS[f"{key}_s"]
                ok = "met" if r[f"{key}_s"] <= target else "NOT met"
                notes.append(f"- {model}: {key} = {r[f'{key}_s']:.1f} s over "
                             f"{r[f'{key}_users']} users (target <= {target:.0f} s: {ok})")
            notes.append(f"- {model}: sampled / full evaluation = "
                         f"{r['eval_sampled_s'] / r['eval_full_s']:.2f}")
        if backend == "ray":
            ok = "met" if r["peak_rss_gb"] <= TARGETS["ray_rss_gb"] else "NOT met"
            notes.append(f"- {model}/ray: peak RSS {r['peak_rss_gb']:.2f} GB "
                         f"(target <= {TARGETS['ray_rss_gb']:.0f} GB: {ok})")
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="two_tower, in-process only, 3 rounds")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per run (default 5; quick 3)")
    parser.add_argument("--ml100k", default=shared_data("ml-100k"))
    parser.add_argument("--large", default=shared_data("amazon-cds"),
                        help="RecBole folder of the large catalogue; missing = synthetic 43k x 36k")
    parser.add_argument("--models", default="two_tower,hier_index")
    parser.add_argument("--backends", default="inprocess,ray")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.md"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    models, backends = args.models.split(","), args.backends.split(",")
    rounds = args.rounds or (3 if args.quick else 5)
    if args.quick:
        models, backends = ["two_tower"], ["inprocess"]
    if not (Path(args.ml100k) / "u.data").is_file():
        sys.exit(f"MovieLens-100K not found at {args.ml100k} (--ml100k PATH)")
    results = []
    for model in models:
        for backend in backends:
            for name in ("ml100k", "large"):
                spec = {"name": name, "dataset": dataset_spec(name, args), "model": model,
                        "backend": backend, "rounds": rounds,
                        "eval": backend == "inprocess"}
                result = run_setting(spec)
                if result is not None:
                    results.append(result)
    large = dataset_spec("large", args)
    table = report(results)
    source = (f"large = {large['name']} ({large.get('path', '43k x 36k synthetic')}); "
              f"{rounds} rounds of 100 clients; evaluation ks = [10, 20, 50]")
    print(table + "\n\n" + source)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n\n" + source + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
