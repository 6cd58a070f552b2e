"""rf2 on a real 2-node Ray cluster (``ray.cluster_utils.Cluster``, one host): the dataset
in the object store, node records, a node lost mid-run, sweeps as Ray tasks and Ctrl-C.

The module starts one cluster (its own temp dir and ports), shared by its tests, and stops
it at the end.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    assert_sweep_stopped_at_checkpoints,
    read_rows,
    signal_sweep,
    small_run,
    without_timing,
)

from rf2.cli.support import run_job
from rf2.core.config import load_run_config
from rf2.data.base import FederatedDataset
from rf2.runs.run_folder import RunFolder
from rf2.runs.summary import run_summary


def _write_lightgcn(root: Path, users: int = 120, items: int = 90, seed: int = 3) -> None:
    """A small LightGCN-format dataset (train.txt / test.txt: ``user item item ...``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    with open(root / "train.txt", "w") as train, open(root / "test.txt", "w") as test:
        for u in range(users):
            picked = rng.choice(items, size=12, replace=False)
            train.write(" ".join(map(str, [u, *picked[:10]])) + "\n")
            test.write(" ".join(map(str, [u, *picked[10:]])) + "\n")


def _read_only_on_every_node(address: str) -> list[tuple[str, list[int], bool]]:
    """Share a dataset from this driver; read it in a task on each node of the cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rf2.fl.shared_data import share

    dataset = FederatedDataset(
        name="t", num_users=2, num_items=4,
        train_indptr=np.array([0, 2, 3]), train_items=np.array([1, 2, 3]),
        test_indptr=np.array([0, 1, 1]), test_items=np.array([0]), history_len=2)
    ray.init(address=address, log_to_driver=False)
    try:
        handle = share(dataset)

        @ray.remote(num_cpus=1)
        def read(h: Any) -> tuple[str, list[int], bool]:  # noqa: ANN401
            got = h.fetch()
            return (ray.get_runtime_context().get_node_id(), got.train_items.tolist(),
                    bool(got.train_items.flags.writeable))

        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        return ray.get([read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(handle) for node in nodes])
    finally:
        ray.shutdown()


class TwoNodes:
    """A real 2-node Ray cluster on this host (1 CPU each), in its own temp dir, shared by
    this module's tests (a cluster start costs tens of seconds); ``worker`` is the live
    second node."""

    def __init__(self, temp: str) -> None:
        from ray.cluster_utils import Cluster

        self.temp = temp
        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 1, "temp_dir": temp,
                                               "include_dashboard": False})
        self.worker = self.cluster.add_node(num_cpus=1, temp_dir=temp)
        self.cluster.wait_for_nodes()

    def with_two_live_nodes(self) -> TwoNodes:
        """A test that removed the worker node leaves one: the next gets a fresh one."""
        if self.worker not in self.cluster.worker_nodes:
            self.worker = self.cluster.add_node(num_cpus=1, temp_dir=self.temp)
            self.cluster.wait_for_nodes()
        return self


@pytest.fixture(scope="module")
def two_node_cluster() -> Any:  # noqa: ANN401
    import ray._common.utils as common_utils
    import ray._private.utils as private_utils

    # A short temp dir: Ray's socket paths must stay under 107 bytes.
    temp = tempfile.mkdtemp(prefix="rf2c")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # Cluster records its address in /tmp/ray/ray_current_cluster, where any other
        # process's ray.init() would find and join it: keep it to this module.
        monkeypatch.setattr(private_utils, "write_ray_address", lambda *a, **k: None)
        monkeypatch.setattr(common_utils, "reset_ray_address", lambda *a, **k: None)
        nodes = TwoNodes(temp)
        try:
            yield nodes
        finally:
            nodes.cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def cluster(two_node_cluster: TwoNodes) -> TwoNodes:
    return two_node_cluster.with_two_live_nodes()


def _remove_after_round(cluster: Any, node: Any, run_dir: Path, after: int) -> threading.Thread:  # noqa: ANN401
    """Remove ``node`` once the run has written round ``after`` (its next round is slow)."""
    def remove() -> None:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") > after:
                break
            time.sleep(0.05)
        cluster.remove_node(node)

    thread = threading.Thread(target=remove, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # starts a 2-node Ray cluster
def test_two_node_cluster_equals_in_process_and_survives_a_lost_node(
        tmp_path: Path, cluster: TwoNodes) -> None:
    from rf2.cli.runner import execute, prepare

    worker, cluster = cluster.worker, cluster.cluster
    on_cluster = {"backend": "ray", "ray_address": cluster.address,
                  "users_per_message": 10}
    data = tmp_path / "data"
    _write_lightgcn(data)
    on_files = {"dataset": {"name": "lightgcn", "path": str(data)}}
    cfg = small_run(num_rounds=3, **on_files)
    cfg["simulation"] = on_cluster
    prep = prepare(load_run_config(cfg))
    # The driver has the dataset; the files are gone before any client worker starts,
    # so the workers (on both nodes) can only train from Ray's object store.
    shutil.rmtree(data)
    execute(prep, RunFolder(tmp_path / "cluster_run"))
    _write_lightgcn(data)
    reference = small_run(num_rounds=3, **on_files)
    reference["simulation"] = {"backend": "inprocess", "users_per_message": 10}
    run_job(reference, tmp_path / "inprocess_run")
    rows = read_rows(tmp_path / "cluster_run")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["num_clients_trained"] == 20 for r in rows[1:])
    assert without_timing(rows) == without_timing(read_rows(tmp_path / "inprocess_run"))
    nodes = json.loads((tmp_path / "cluster_run" / "nodes.json").read_text())["nodes"]
    assert len(nodes) == 2
    assert all(n["clients_trained"] > 0 and n["cpus"] == 1 for n in nodes)  # both nodes
    assert sum(n["clients_trained"] for n in nodes) == sum(
        r["num_clients_trained"] for r in rows)
    # Each node's workers see the driver's arrays as read-only views of the node's
    # object store (the other node fetched its copy once), not private copies.
    reads = _read_only_on_every_node(cluster.address)
    assert sorted(node for node, _, _ in reads) == sorted(n["node_id"] for n in nodes)
    assert all(items == [1, 2, 3] and not writeable for _, items, writeable in reads)
    summary = "\n".join(run_summary(RunFolder(tmp_path / "cluster_run")))
    assert "ray nodes 2:" in summary
    assert all(n["node_id"][:12] in summary for n in nodes)

    # The worker node goes while round 2 is in flight (each user sleeps 1 s there; one
    # message of 10 users per node).
    lost = small_run(num_rounds=4, fault_injection=[
        {"kind": "hang", "users": list(range(200)), "rounds": [2], "hang_s": 1.0}])
    lost["simulation"] = on_cluster
    remover = _remove_after_round(cluster, worker, tmp_path / "lost_run", after=1)
    run_job(lost, tmp_path / "lost_run")
    remover.join(timeout=60)
    rows = read_rows(tmp_path / "lost_run")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # the run went on
    r2 = rows[2]
    # The lost node's message failed; the head's users trained.
    assert r2["fault/client_error"] > 0 and r2["num_clients_trained"] > 0
    assert r2["fault/client_error"] + r2["num_clients_trained"] == 20
    # Later rounds run on the surviving node alone, without failures.
    assert all(r["fault/client_error"] == 0 and r["num_clients_trained"] == 20
               for r in rows[3:])


def _rf2_sweep(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rf2", "-m", "+experiment=rf2_fairness_gap_quick",
                             "simulation=ray", "population=independent",
                             "hydra/launcher=rf2_ray", f"hydra.sweep.dir={tmp_path / name}",
                             *overrides],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.slow  # starts a 2-node Ray cluster and rf2 sweeps on it
def test_sweep_jobs_run_as_ray_tasks_on_the_cluster_and_ctrl_c_checkpoints_them(
        tmp_path: Path, cluster: TwoNodes) -> None:
    address = cluster.cluster.address
    on_cluster = [f"hydra.launcher.address={address}", "hydra.launcher.max_parallel_jobs=2",
                  "simulation.ray_max_workers=1"]
    # The quick study's first two jobs, two at a time, each with one client worker.
    proc = _rf2_sweep(tmp_path, "quick", "optimization=none,exclude-low", "seed=1", *on_cluster)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    cluster_nodes = {n["NodeID"] for n in cluster.cluster.global_state.node_table()}
    for job in ("0", "1"):
        folder = tmp_path / "quick" / job
        assert (folder / "DONE").exists()
        assert [r["round"] for r in read_rows(folder)] == [0, 1, 2, 3]
        nodes = json.loads((folder / "nodes.json").read_text())["nodes"]
        assert {n["node_id"] for n in nodes} <= cluster_nodes  # its clients: the cluster
        assert f"rf2: run finished: {folder}" in out

    # SIGTERM to the sweep's process group (scancel, systemd; a Ctrl-C takes the same
    # path, tests/test_interrupt.py) with two of three jobs running: both stop at a round
    # boundary with their checkpoint, the third never starts, one summary lists what to
    # resume (before: Ray's own handler in the launcher, a stack dump, exit 134).
    proc = _rf2_sweep(tmp_path, "stopped", "optimization=none", "seed=1,2,3",
                      "num_rounds=2000", *on_cluster)
    sweep = tmp_path / "stopped"
    code, err = signal_sweep(proc, sweep, running=2, sig=signal.SIGTERM, timeout_s=120,
                             group=True)
    assert code == 143, err
    assert_sweep_stopped_at_checkpoints(sweep, err, running=2)


def test_nodes_json_adds_a_resumed_runs_clients_and_the_summary_names_the_nodes(
        tmp_path: Path) -> None:
    from rf2.cli.runner import write_nodes
    from rf2.fl.ray_nodes import NodeRecord, NodeTally, node_records
    from rf2.runs.summary import node_lines

    tally = NodeTally()
    tally.add("a" * 20, 7)
    tally.add("a" * 20, 3)
    seen = [{"NodeID": "a" * 20, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 4.0}},
            {"NodeID": "b" * 20, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 2.0}}]
    first = node_records(tally, seen)
    assert [(r.node_id[0], r.clients_trained, r.cpus) for r in first] == [("a", 10, 4.0),
                                                                          ("b", 0, 2.0)]
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    write_nodes(folder, first)
    # A resume on another cluster: its nodes are added, a node seen before adds up.
    write_nodes(folder, [NodeRecord("b" * 20, "10.0.0.2", 2.0, 5),
                         NodeRecord("c" * 20, "10.0.0.3", 1.0, 4)])
    nodes = json.loads((folder.path / "nodes.json").read_text())["nodes"]
    assert [(n["node_id"][0], n["clients_trained"]) for n in nodes] == [("a", 10), ("b", 5),
                                                                        ("c", 4)]
    lines = node_lines(folder.path)
    assert lines[0] == "  ray nodes 3:"
    assert lines[1] == f"    {'a' * 12} at 10.0.0.1, 4 CPU: 10 clients trained"
    assert node_lines(tmp_path) == []  # in-process runs have no nodes.json
