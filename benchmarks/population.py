"""Population scale: the same federated run at 43k, 200k and 500k users, in-process and on Ray.

Synthetic users over one catalogue (20,000 items, 50 clicks per user on average, so
clicks grow with users), the large-catalogue recipe with the two-tower model
(``+experiment=large_catalogue model=two_tower``), a sampled curve
(``eval.max_users=5000``) and one full evaluation of every test user at the end
(``eval.final_max_users=0``). Each setting runs in a fresh subprocess; printed and written
to ``benchmarks/results/population.md``:

- build s: ``prepare`` (generate + split the data, tier the population, build the model)
- to round 1 s: from the start of the run to the first round's row
- s/round: median wall of the rounds between the first and the last (no evaluation)
- peak RSS GB: the process tree's (the driver plus, on Ray, every worker)
- full eval s: the last round's evaluation of all test users

plus each figure's ratio against the 43k row of the same backend.

    python benchmarks/population.py                  # 43k / 200k / 500k x in-process / Ray
    python benchmarks/population.py --quick          # 2k / 4k / 8k users, 4 rounds (a smoke test)
    python benchmarks/population.py --backends inprocess --sizes 43000,500000
    python benchmarks/population.py --sizes 300,600 --items 200 --rounds 3   # the test suite's size
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# the benchmarks run as scripts or are loaded by file path: their folder holds the shared helper
sys.path.insert(0, str(Path(__file__).resolve().parent))
from process_tree import tree_rss  # noqa: E402

SIZES = (43_000, 200_000, 500_000)
QUICK_SIZES = (2_000, 4_000, 8_000)
BACKENDS = ("inprocess", "ray")
ITEMS, CLICKS_PER_USER = 20_000, 50
QUICK_ITEMS = 2_000
FIGURES = ("build_s", "to_round1_s", "round_s", "peak_rss_gb", "full_eval_s")



class Watch(threading.Thread):
    """Every 0.2 s: the process tree's RSS (Ray workers are descendants) and whether the
    run folder holds round 1's row yet."""

    def __init__(self, metrics: Path) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.metrics = metrics
        self.peak = 0
        self.round1_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss(self.proc))
            if self.round1_at is None and self.metrics.is_file():
                text = self.metrics.read_text(encoding="utf-8")
                if any(json.loads(line).get("round") == 1 for line in text.splitlines() if line):
                    self.round1_at = time.perf_counter()
            self.stop.wait(0.2)


def compose(backend: str, users: int, items: int, rounds: int) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    overrides = [
        "+experiment=large_catalogue", "model=two_tower", f"simulation={backend}",
        f"dataset.num_users={users}", f"dataset.num_items={items}",
        f"dataset.mean_clicks_per_user={CLICKS_PER_USER}", f"num_rounds={rounds}",
        "eval.max_users=5000", "eval.final_max_users=0", f"eval.every={rounds + 1}",
        "progress=false", "checkpoint_every=0", "seed=1",
    ]
    with initialize_config_module(config_module="rf2.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    if backend == "ray":
        data["simulation"]["ray_temp_dir"] = tempfile.mkdtemp(prefix="rf2pop")
    return data


def measure_one(backend: str, users: int, items: int, rounds: int,
                root: Path | None = None) -> dict[str, Any]:
    """One run in this process (its folder under ``root``, default a new temp dir)."""
    import rf2.cli.runner as runner
    from rf2.cli.support import quiet_frameworks, run_job

    quiet_frameworks(False)
    data = compose(backend, users, items, rounds)
    build: list[float] = []
    prepare = runner.prepare

    def timed_prepare(cfg: Any) -> Any:
        t = time.perf_counter()
        out = prepare(cfg)
        build.append(time.perf_counter() - t)
        return out

    runner.prepare = timed_prepare  # run_job imports it from the module at call time
    out = Path(root or tempfile.mkdtemp(prefix="rf2popbench")) / "run"
    watch = Watch(out / "metrics.jsonl")
    watch.start()
    t0 = time.perf_counter()
    try:
        run_job(data, out)
    finally:
        runner.prepare = prepare
        watch.stop.set()
        watch.join()
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    by_round = {int(r["round"]): r for r in rows if "round" in r}
    middle = [by_round[r]["round_wall_s"] for r in range(2, rounds) if r in by_round]
    middle = middle or [by_round[1]["round_wall_s"]]
    last = by_round[rounds]
    return {
        "backend": backend, "users": users, "items": items,
        "clicks": int(json.loads((out / "data.json").read_text())["train_interactions"]),
        "build_s": build[0] if build else float("nan"),
        "to_round1_s": (watch.round1_at or t0) - t0,
        "round_s": statistics.median(middle),
        "peak_rss_gb": watch.peak / 1e9,
        "full_eval_s": float(last.get("eval_wall_s", float("nan"))),
        "eval_users": last.get("eval_users"),
        "total_s": total,
    }


def _cell(row: dict[str, Any], base: dict[str, Any], key: str, fmt: str) -> str:
    value = row[key]
    ratio = value / base[key] if base[key] else float("nan")
    return f"{value:{fmt}}" + ("" if row is base else f" ({ratio:.2f}x)")


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table; each figure with its ratio to the smallest population's row."""
    header = ("| backend | users | train clicks | build s | to round 1 s | s/round | peak RSS GB "
              "| full eval s | eval users |\n|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in results:
        base = min((b for b in results if b["backend"] == r["backend"]), key=lambda b: b["users"])
        lines.append(f"| {r['backend']} | {r['users']:,} | {r['clicks']:,} | "
                     f"{_cell(r, base, 'build_s', '.1f')} | {_cell(r, base, 'to_round1_s', '.1f')} | "
                     f"{_cell(r, base, 'round_s', '.2f')} | {_cell(r, base, 'peak_rss_gb', '.2f')} | "
                     f"{_cell(r, base, 'full_eval_s', '.1f')} | {r['eval_users']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", nargs=4, metavar=("BACKEND", "USERS", "ITEMS", "ROUNDS"),
                        help="run one setting here and print its figures as JSON")
    parser.add_argument("--quick", action="store_true", help="2k/4k/8k users, 2k items, 4 rounds")
    parser.add_argument("--sizes", default=None, help="comma-separated user counts")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--items", type=int, default=None,
                        help=f"catalogue size, default {ITEMS:,} (quick: {QUICK_ITEMS:,})")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (quick: 4)")
    parser.add_argument("--out", default="benchmarks/results/population.md")
    args = parser.parse_args(argv)
    if args.one:
        backend, users, items, rounds = args.one
        print(json.dumps(measure_one(backend, int(users), int(items), int(rounds))), flush=True)
        return 0
    sizes = (tuple(int(s) for s in args.sizes.split(",")) if args.sizes
             else QUICK_SIZES if args.quick else SIZES)
    items = args.items or (QUICK_ITEMS if args.quick else ITEMS)
    rounds = args.rounds or (4 if args.quick else 5)
    results = []
    for backend in args.backends.split(","):
        for users in sizes:
            proc = subprocess.run([sys.executable, __file__, "--one", backend, str(users),
                                   str(items), str(rounds)],
                                  capture_output=True, text=True, check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not line:
                print(f"{backend} {users}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}",
                      file=sys.stderr, flush=True)
                continue
            results.append(json.loads(line[-1]))
            print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if len(results) == len(sizes) * len(args.backends.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
