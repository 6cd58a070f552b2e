"""Simulation overhead: rf2's federated round vs the same client updates in a plain loop.

For each setting (backend x clients per round x population size) a fresh subprocess
runs rf2 (evaluation only at the last round, so rounds measure training + transport)
and, in the same subprocess, a plain single-process Python loop doing the same client
updates (same selection, same local training, same FedAvg + Adagrad step). Printed:
steady-state seconds per round of each, their ratio, start-up time (until round 1 is
done, minus one steady round) and the process tree's peak RSS.

    python benchmarks/sim_overhead.py                 # full table (takes minutes)
    python benchmarks/sim_overhead.py --quick         # 10 clients, 1k users, both backends
    python benchmarks/sim_overhead.py --repeat 3      # each setting 3x: median and range
    python benchmarks/sim_overhead.py --ml100k ../shared/data/ml-100k   # on MovieLens-100K

rf2 runs with each client path (``--paths``): ``vectorised`` (cohort-vectorised training,
sparse replies, partial sums inside a message: the default), ``vectorised-no-sums``
(the same, one reply per client: ``simulation.partial_aggregation=false``) and
``per-user`` (one user at a time, whole-model replies, no sums).

    python benchmarks/sim_overhead.py --ml100k ../shared/data/ml-100k --loss full \
        --paths vectorised,vectorised-no-sums --clients 100 --backends inprocess,ray

``--peer pfl`` also runs the same workload in pfl-research (``pip install 'rf2[peer]'``;
without it the flag says so and the peer is skipped) and prints rf2 / pfl per setting.
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

# the benchmarks run as scripts or are loaded by file path: their folder holds the shared helper
sys.path.insert(0, str(Path(__file__).resolve().parent))
from process_tree import tree_rss  # noqa: E402

ROUNDS = 12  # steady state: the median of rounds 2..ROUNDS-1



class PeakMemory(threading.Thread):
    """Samples this process tree's RSS every 0.2 s (Ray workers are descendants)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss(self.proc))
            self.stop.wait(0.2)


def plain_loop_round_s(cfg_map: dict, rounds: int) -> float:
    """Median seconds per round of the same client updates in one plain Python loop."""
    import numpy as np
    import torch

    from rf2.core.config import load_run_config
    from rf2.data import load_dataset
    from rf2.fl.params import load_numpy_into, state_to_numpy
    from rf2.fl.selection import ClientSelector
    from rf2.model import build_model
    from rf2.model.examples import num_training_examples, user_examples
    from rf2.model.local_training import train_locally

    torch.set_num_threads(1)
    cfg = load_run_config(cfg_map)
    ds = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, ds, cfg.seed)
    selector = ClientSelector(np.flatnonzero(num_training_examples(ds) > 0), seed=cfg.seed)
    weights = state_to_numpy(model)
    accum = {k: np.zeros_like(v) for k, v in weights.items()}
    times = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        users, _ = selector.select(cfg.clients_per_round, lambda u: np.ones(len(u), bool))
        total = {k: np.zeros_like(v) for k, v in weights.items()}
        n_total = 0
        for u in users:
            load_numpy_into(model, weights)
            hist, tgt = user_examples(ds, int(u))
            res = train_locally(model, hist, tgt, lr=cfg.client.lr, local_epochs=1,
                                batch_size=0, seed=int(u) + rnd)
            for k, v in state_to_numpy(model).items():
                total[k] += v * res.num_examples
            n_total += res.num_examples
        for k in weights:  # FedAvg then server Adagrad, as FedAdagrad does
            delta = total[k] / max(n_total, 1) - weights[k]
            accum[k] += delta**2
            weights[k] = weights[k] + cfg.strategy.server_lr * delta / (np.sqrt(accum[k]) + 1e-9)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def pfl_round_s(cfg_map: dict, rounds: int) -> float:
    """Median seconds per round of the same workload in pfl-research (``pip install pfl``):
    the same users (every user with training examples, 100 sampled per round), the same
    rf2 two-tower module and loss, one full-batch local SGD step at the same lr, FedAvg
    then server Adagrad (lr, eps = tau) on the mean update, in pfl's simulated backend."""
    import numpy as np
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    from rf2.core.config import load_run_config
    from rf2.data import load_dataset
    from rf2.model import build_model
    from rf2.model.examples import num_training_examples, user_examples

    torch.set_num_threads(1)
    cfg = load_run_config(cfg_map)
    ds = load_dataset(cfg.dataset, cfg.seed)

    class Wrapped(torch.nn.Module):
        """rf2's two-tower with the ``loss`` / ``metrics`` pair pfl calls."""

        def __init__(self) -> None:
            super().__init__()
            self.tower = build_model(cfg.model, ds, cfg.seed)

        def loss(self, hist, tgt, eval=False):  # noqa: A002, ANN001, ANN202, ARG002
            return self.tower.loss(hist, tgt)

        @torch.no_grad()
        def metrics(self, hist, tgt, eval=False):  # noqa: A002, ANN001, ANN202, ARG002
            n = len(tgt)
            return {"loss": Weighted(float(self.tower.loss(hist, tgt)) * n, n)}

    users = [int(u) for u in np.flatnonzero(num_training_examples(ds) > 0)]

    def make_dataset(user: int) -> Dataset:
        hist, tgt = user_examples(ds, user)
        return Dataset(raw_data=[torch.from_numpy(hist), torch.from_numpy(tgt)], user_id=user)

    data = FederatedDataset(make_dataset, get_user_sampler("minimize_reuse", users))
    module = Wrapped()
    model = PyTorchModel(
        model=module, local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.Adagrad(module.parameters(), lr=cfg.strategy.server_lr,
                                              eps=cfg.strategy.tau))
    stamps: list[float] = []

    class Clock(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # noqa: ANN001, ANN201, ARG002
            stamps.append(time.perf_counter())
            return False, aggregate_metrics.__class__()

    start = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds,
                                           evaluation_frequency=10**9,
                                           train_cohort_size=cfg.clients_per_round,
                                           val_cohort_size=0),
        backend=SimulatedBackend(training_data=data, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=cfg.client.lr,
                                              local_num_epochs=1, local_batch_size=None),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[Clock()], send_metrics_to_platform=False)
    times = np.diff([start, *stamps])
    return float(statistics.median(times[1:]))


# rf2's client paths: cohort-vectorised training with sparse replies and partial sums
# (the default), the same with one reply per client, and the per-user reference path
# with whole-model replies.
PATHS = {"vectorised": {"vectorise": True, "sparse_updates": True},
         "vectorised-no-sums": {"vectorise": True, "sparse_updates": True,
                                "partial_aggregation": False},
         "per-user": {"vectorise": False, "sparse_updates": False,
                      "partial_aggregation": False}}


def measure_one(backend: str, clients: int, users: int, path: str = "vectorised",
                ml100k: str | None = None, loss: str = "auto", with_pfl: bool = False) -> dict:
    from rf2.cli.support import quiet_frameworks, run_job

    quiet_frameworks(False)
    dataset = ({"name": "movielens100k", "path": ml100k} if ml100k else
               {"name": "synthetic", "num_users": users, "num_items": 1000})
    cfg_map: dict = {
        "seed": 1, "num_rounds": ROUNDS, "clients_per_round": clients, "progress": False,
        "checkpoint_every": 0,
        "dataset": dataset,
        # The light two-tower client is the strict case for transport overhead.
        "model": {"name": "two_tower", "loss": loss},
        "eval": {"every": 10_000},
        "simulation": {"backend": backend, **PATHS[path]},
    }
    if backend == "ray":
        cfg_map["simulation"]["ray_temp_dir"] = tempfile.mkdtemp(prefix="rf2b")
    mem = PeakMemory()
    mem.start()
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="rf2bench")) / "run"
    run_job(cfg_map, out)
    total = time.perf_counter() - t0
    mem.stop.set()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    by_round = {r["round"]: r for r in rows}
    steady = statistics.median(by_round[r]["round_wall_s"] for r in range(2, ROUNDS))
    first_done = by_round[1]["wall_time_s"]
    # Everything but steady training rounds and evaluation: data loading, Ray start,
    # worker spin-up (the excess of round 1 over a steady round), final save.
    startup = total - sum(r["round_wall_s"] for r in rows) + (by_round[1]["round_wall_s"] - steady)
    plain = plain_loop_round_s(cfg_map, ROUNDS)
    peer = pfl_round_s(cfg_map, ROUNDS) if with_pfl else None
    return {"backend": backend, "clients": clients, "users": "ml100k" if ml100k else users,
            "path": path if loss == "auto" else f"{path}, loss={loss}",
            "rf2_round_s": steady, "plain_round_s": plain, "ratio": steady / plain,
            "startup_s": startup, "first_round_done_s": first_done,
            "peak_rss_gb": mem.peak / 1e9,
            **({} if peer is None else {"pfl_round_s": peer, "rf2_over_pfl": steady / peer})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "CLIENTS", "USERS"))
    parser.add_argument("--path", default="vectorised", choices=sorted(PATHS),
                        help="with --one: rf2's client path")
    parser.add_argument("--paths", default="vectorised,per-user",
                        help="client paths to measure (comma-separated)")
    parser.add_argument("--ml100k", default=None,
                        help="MovieLens-100K folder: measure on it instead of synthetic users")
    parser.add_argument("--loss", default="auto", choices=["auto", "full", "sampled"],
                        help="model.loss (auto: full softmax below 5,000 items)")
    parser.add_argument("--clients", default="10,100", help="clients per round (comma-separated)")
    parser.add_argument("--backends", default="inprocess,ray", help="comma-separated")
    parser.add_argument("--peer", default=None, choices=["pfl"],
                        help="also run the same workload in pfl-research (pip install pfl)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per setting; the table shows the median-ratio run and the range")
    parser.add_argument("--out", default="benchmarks/results/sim_overhead.md")
    args = parser.parse_args()
    if args.peer == "pfl":
        import importlib.util

        if importlib.util.find_spec("pfl") is None:
            print("--peer pfl: pfl-research is not installed here (pip install pfl); "
                  "measuring rf2 against the plain loop only", file=sys.stderr)
            args.peer = None
    if args.one:
        backend, clients, users = args.one
        print(json.dumps(measure_one(backend, int(clients), int(users), args.path, args.ml100k,
                                     args.loss, with_pfl=args.peer == "pfl")))
        return
    user_counts = (943,) if args.ml100k else (1000, 100_000)
    settings = [(b, int(c), u, p) for b in args.backends.split(",")
                for c in args.clients.split(",") for u in user_counts
                for p in args.paths.split(",")]
    if args.quick:
        settings = [(b, 10, 1000, p) for b in ("inprocess", "ray") for p in args.paths.split(",")]
    results = []
    for backend, clients, users, path in settings:
        tries = []
        extra = ["--path", path, "--loss", args.loss] + (
            ["--ml100k", args.ml100k] if args.ml100k else []) + (
            ["--peer", args.peer] if args.peer else [])
        for _ in range(args.repeat):
            proc = subprocess.run([sys.executable, __file__, "--one", backend, str(clients),
                                   str(users), *extra],
                                  capture_output=True, text=True, check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not line:
                print(f"{backend} {clients} {users}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            tries.append(json.loads(line[-1]))
            print(json.dumps(tries[-1]), flush=True)
        if tries:
            # The try with the median ratio, plus the range over tries: this machine's
            # speed drifts between seconds, and a drift during one side skews a ratio.
            tries.sort(key=lambda r: r["ratio"])
            row = dict(tries[len(tries) // 2])
            row["ratio_range"] = (tries[0]["ratio"], tries[-1]["ratio"])
            results.append(row)
    header = ("| backend | clients/round | users | rf2 client path | rf2 s/round | plain loop s/round "
              "| ratio | ratio range | start-up s | peak RSS GB |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['backend']} | {r['clients']} | {r['users']} | {r['path']} | {r['rf2_round_s']:.3f} | "
        f"{r['plain_round_s']:.3f} | {r['ratio']:.2f}x | {r['ratio_range'][0]:.2f}-"
        f"{r['ratio_range'][1]:.2f}x | {r['startup_s']:.1f} | {r['peak_rss_gb']:.2f} |"
        for r in results
    ]
    peers = [r for r in results if "pfl_round_s" in r]
    if peers:
        lines += ["", "| backend | rf2 client path | rf2 s/round | pfl s/round | rf2 / pfl |",
                  "|---|---|---|---|---|"] + [
            f"| {r['backend']} | {r['path']} | {r['rf2_round_s']:.3f} | {r['pfl_round_s']:.3f} "
            f"| {r['rf2_over_pfl']:.2f}x |" for r in peers]
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
