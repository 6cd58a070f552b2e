"""Where a Ray run's start-up goes, and the process tree's peak memory.

One rf2 run on Ray (2 client workers on this machine), in a fresh subprocess per try,
with timestamps at each phase: data and model ready, ``ray.init`` returned, the actor
pool requested, every worker warm (dataset and model loaded), round 0 (the initial
evaluation) written, round 1 written, the end. Peak RSS is the whole process tree's
(the driver plus Ray's raylet, GCS and workers), sampled every 0.1 s; "per worker" is
each client worker's unique memory (USS, not shared with other processes) at the end,
and its RSS.

    python benchmarks/ray_startup.py --ml100k ../shared/data/ml-100k     # 3 tries each
    python benchmarks/ray_startup.py --users 43000 --items 20000          # synthetic

Each try runs both ways, alternating (so that the machine's drift hits both): rf2's
lean start (``simulation.lean_start=true``: no autoscaler monitor, log monitor or
dashboard API server) and plain ``ray.init`` (``false``, the reference). Prints one line
per try, each way's median-try phases, and the ratios lean / plain. The time to round 1
is measured from the run's start (after Python and rf2 are imported).
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

PHASES = ("prepared", "ray_init", "actors_requested", "warm", "round_0", "round_1", "end")


class _Sampler(threading.Thread):
    """Peak RSS of this process tree and, at the end, each Ray worker's USS."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self.stop = threading.Event()
        self.workers: list[dict[str, float]] = []

    def _tree(self) -> list[Any]:
        import psutil

        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return [self.proc]

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            workers = []
            for p in self._tree():
                try:
                    total += p.memory_info().rss
                    if "ClientAppActor" in " ".join(p.cmdline()) or p.name().startswith(
                            "ray::ClientAppActor"):
                        info = p.memory_full_info()
                        workers.append({"uss_mb": info.uss / 1e6, "rss_mb": info.rss / 1e6})
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            if workers:
                self.workers = workers
            self.stop.wait(0.1)


def measure(cfg_map: dict[str, Any]) -> dict[str, Any]:
    """Run ``cfg_map`` once in this process with phase timestamps."""
    from flwr.simulation.ray_transport import ray_actor

    import rf2.cli.runner as runner
    import rf2.fl.server as server
    import rf2.fl.simulation as simulation
    from rf2.cli.support import quiet_frameworks, run_job

    quiet_frameworks(False)
    t0 = time.perf_counter()
    marks: dict[str, float] = {}

    def after(owner: Any, name: str, phase: str) -> None:  # noqa: ANN401
        real = getattr(owner, name)

        def wrapped(*a: Any, **k: Any) -> Any:  # noqa: ANN401
            out = real(*a, **k)
            marks.setdefault(phase, time.perf_counter() - t0)
            return out

        setattr(owner, name, wrapped)

    after(runner, "prepare", "prepared")
    after(simulation, "_init_ray", "ray_init")
    after(ray_actor.BasicActorPool, "add_actors_to_pool", "actors_requested")
    after(server.FederatedServer, "_warm_up", "warm")
    real_finish = server.FederatedServer._finish_row

    def finish(self: Any, row: dict[str, Any], *a: Any, **k: Any) -> None:  # noqa: ANN401
        real_finish(self, row, *a, **k)
        marks.setdefault(f"round_{row['round']}", time.perf_counter() - t0)

    server.FederatedServer._finish_row = finish  # type: ignore[method-assign]
    sampler = _Sampler()
    sampler.start()
    out = Path(tempfile.mkdtemp(prefix="rf2su")) / "run"
    run_job(cfg_map, out)
    marks["end"] = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    return {"phases_s": {p: marks.get(p) for p in PHASES}, "peak_rss_gb": sampler.peak / 1e9,
            "workers": sampler.workers, "reference_uss_mb": reference_uss_mb(cfg_map)}


REFERENCE = """
import json, sys, psutil, torch
import flwr.simulation.ray_transport.ray_actor  # what a client actor imports
import rf2.fl.client
from rf2.core.config import load_run_config
from rf2.data import load_dataset
from rf2.model import build_model
from rf2.fl.params import state_to_numpy
torch.set_num_threads(1)
cfg = load_run_config(json.loads(sys.argv[1]))
ds = load_dataset(cfg.dataset, cfg.seed)
model = build_model(cfg.model, ds, cfg.seed)
arrays = state_to_numpy(model)  # a received global model, as a worker holds one
del ds  # the data is the part a worker should not hold privately
import gc; gc.collect()
print(psutil.Process().memory_full_info().uss / 1e6)
"""


def reference_uss_mb(cfg_map: dict[str, Any]) -> float:
    """USS of a plain process with torch, Flower, rf2's client and the model: what a
    client worker costs before any data (its data should add little: it is shared)."""
    proc = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps(cfg_map)],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def config(args: argparse.Namespace, lean: bool = True) -> dict[str, Any]:
    dataset = ({"name": "movielens100k", "path": args.ml100k} if args.ml100k else
               {"name": "synthetic", "num_users": args.users, "num_items": args.items})
    return {
        "seed": 1, "num_rounds": 3, "clients_per_round": 100, "progress": False,
        "checkpoint_every": 0, "dataset": dataset,
        "model": {"name": "two_tower", "loss": "full"},
        "eval": {"every": 10_000},
        "simulation": {"backend": "ray", "ray_temp_dir": tempfile.mkdtemp(prefix="rf2r"),
                       "lean_start": lean},
    }


def _one(args: argparse.Namespace, lean: bool) -> dict[str, Any] | None:
    argv = [sys.executable, __file__, "--one", "--users", str(args.users), "--items",
            str(args.items), "--lean" if lean else "--plain"] + (
        ["--ml100k", args.ml100k] if args.ml100k else [])
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not line:
        print(f"failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    out = json.loads(line[-1])
    out["lean"] = lean
    print(json.dumps(out), flush=True)
    return out


def _table(name: str, tries: list[dict[str, Any]]) -> dict[str, float]:
    tries = sorted(tries, key=lambda t: t["phases_s"]["round_1"])
    median = tries[len(tries) // 2]
    print(f"\n{name} (median try of {len(tries)})\n| phase | at s | took s |\n|---|---|---|")
    previous = 0.0
    for phase in PHASES:
        at = median["phases_s"][phase]
        if at is None:
            continue
        print(f"| {phase} | {at:.1f} | {at - previous:.1f} |")
        previous = at
    workers = median["workers"]
    print("client workers: " + ", ".join(f"USS {w['uss_mb']:.0f} MB / RSS {w['rss_mb']:.0f} MB"
                                         for w in workers)
          + f"; a process with torch, Flower, rf2's client and the model: USS "
            f"{median['reference_uss_mb']:.0f} MB")
    return {"round_1": statistics.median(t["phases_s"]["round_1"] for t in tries),
            "ray_part": statistics.median(t["phases_s"]["warm"] - t["phases_s"]["prepared"]
                                          for t in tries),
            "peak": statistics.median(t["peak_rss_gb"] for t in tries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml100k", default=None, help="MovieLens-100K folder")
    parser.add_argument("--users", type=int, default=943)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lean", dest="lean", action="store_true", default=True,
                        help=argparse.SUPPRESS)
    parser.add_argument("--plain", dest="lean", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(config(args, args.lean))), flush=True)
        return
    tries: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for _ in range(args.repeat):
        for lean in (False, True):
            got = _one(args, lean)
            if got is not None:
                tries[lean].append(got)
    if not tries[True] or not tries[False]:
        sys.exit(1)
    plain = _table("plain ray.init (reference)", tries[False])
    lean = _table("lean start", tries[True])
    print("\n| | plain ray.init | lean start | lean / plain |\n|---|---|---|---|")
    for key, label, unit in (("round_1", "time to round 1", "s"),
                             ("ray_part", "Ray start to warm workers", "s"),
                             ("peak", "peak RSS (process tree)", "GB")):
        print(f"| {label} | {plain[key]:.2f} {unit} | {lean[key]:.2f} {unit} | "
              f"{lean[key] / plain[key]:.2f}x |")


if __name__ == "__main__":
    main()
