"""rf2 on Ray beyond one process: the dataset in the object store, a real 2-node cluster,
node records, and a node lost mid-run.

Each test here starts Ray (its own temp dir and ports) and stops what it started.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import read_rows, small_run, without_timing

from rf2.cli.support import run_job
from rf2.core.config import load_run_config
from rf2.data.base import FederatedDataset
from rf2.runs.console import run_summary
from rf2.runs.run_folder import RunFolder


@pytest.fixture
def ray_tmp() -> Any:  # noqa: ANN401
    """A short temp dir for Ray (its socket paths must stay under 107 bytes)."""
    path = tempfile.mkdtemp(prefix="rf2c")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _write_lightgcn(root: Path, users: int = 120, items: int = 90, seed: int = 3) -> None:
    """A small LightGCN-format dataset (train.txt / test.txt: ``user item item ...``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    with open(root / "train.txt", "w") as train, open(root / "test.txt", "w") as test:
        for u in range(users):
            picked = rng.choice(items, size=12, replace=False)
            train.write(" ".join(map(str, [u, *picked[:10]])) + "\n")
            test.write(" ".join(map(str, [u, *picked[10:]])) + "\n")


@pytest.mark.slow  # starts Ray
def test_ray_clients_read_the_drivers_dataset_and_need_no_data_files(tmp_path: Path,
                                                                     ray_tmp: str) -> None:
    from rf2.cli.runner import execute, prepare

    data = tmp_path / "data"
    _write_lightgcn(data)
    cfg_map = small_run(num_rounds=2, **{"dataset": {"name": "lightgcn", "path": str(data)}})
    cfg_map["simulation"] = {"backend": "ray", "ray_temp_dir": ray_tmp}
    prep = prepare(load_run_config(cfg_map))
    # The driver has the dataset; the files are gone before any client worker starts, so
    # the workers can only train from the copy in Ray's object store.
    shutil.rmtree(data)
    folder = RunFolder(tmp_path / "ray_run")
    execute(prep, folder)
    rows = read_rows(folder.path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    trained = sum(r["num_clients_trained"] for r in rows)
    assert trained == 2 * 20
    # The same seed in-process (reading the files again) gives the same metrics.
    _write_lightgcn(data)
    run_job(small_run(num_rounds=2, **{"dataset": {"name": "lightgcn", "path": str(data)}}),
            tmp_path / "inprocess_run")
    assert without_timing(rows) == without_timing(read_rows(tmp_path / "inprocess_run"))
    nodes = json.loads((folder.path / "nodes.json").read_text())["nodes"]
    assert len(nodes) == 1 and nodes[0]["clients_trained"] == trained
    assert nodes[0]["cpus"] >= 1 and nodes[0]["address"]


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


def _cluster(temp: str, monkeypatch: pytest.MonkeyPatch) -> Any:  # noqa: ANN401
    """A real 2-node Ray cluster on this host (1 CPU each), in its own temp dir."""
    import ray._common.utils as common_utils
    import ray._private.utils as private_utils
    from ray.cluster_utils import Cluster

    # Cluster records its address in /tmp/ray/ray_current_cluster, where any other
    # process's ray.init() would find and join it: keep it to this test.
    monkeypatch.setattr(private_utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(common_utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "temp_dir": temp,
                                      "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, temp_dir=temp)
    cluster.wait_for_nodes()
    return cluster, worker


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
        tmp_path: Path, ray_tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, worker = _cluster(ray_tmp, monkeypatch)
    try:
        on_cluster = {"backend": "ray", "ray_address": cluster.address,
                      "users_per_message": 10}
        cfg = small_run(num_rounds=3)
        cfg["simulation"] = on_cluster
        run_job(cfg, tmp_path / "cluster_run")
        reference = small_run(num_rounds=3)
        reference["simulation"] = {"backend": "inprocess", "users_per_message": 10}
        run_job(reference, tmp_path / "inprocess_run")
        rows = read_rows(tmp_path / "cluster_run")
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
    finally:
        cluster.shutdown()
