"""End-to-end federated runs through the real Flower apps (in-process and on Ray)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import read_rows, small_run, without_timing

from rf2.cli.support import run_job


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inproc") / "run"
    run_job(small_run(num_rounds=4), out)
    return out


def test_run_folder_has_the_documented_files_and_keys(inprocess_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "population.json", "model.pt", "DONE"):
        assert (inprocess_run / name).exists(), name
    rows = read_rows(inprocess_run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("recall@20", "ndcg@20", "num_clients_trained", "wall_time_s", "sim_time_s",
                "tier/all/recall@20", "tier/all/completed", "fair/recall@20/jain",
                "loss", "tier/all/loss", "activity/q1/recall@20"):
        assert key in rows[-1], key
    assert "popularity/recall@20" in rows[0]
    assert rows[0]["num_clients_trained"] == 0
    assert all(r["num_clients_trained"] == 20 for r in rows[1:])


def test_evaluation_time_is_logged_and_round_zero_is_not_free(inprocess_run: Path) -> None:
    rows = read_rows(inprocess_run)
    assert all(r["eval_wall_s"] > 0 for r in rows)  # eval.every = 1: every row evaluated
    assert rows[0]["round_wall_s"] >= rows[0]["eval_wall_s"] > 0
    assert all(r["round_wall_s"] >= r["eval_wall_s"] for r in rows)
    assert all(r["eval_users"] == r["eval_users_total"] for r in rows)


def test_sampled_evaluation_in_a_run(tmp_path: Path) -> None:
    run_job(small_run(num_rounds=1, eval={"ks": [10, 20], "max_users": 50,
                                          "metrics": ["recall", "auc"]}), tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    assert all(r["eval_users"] == 50 and r["eval_users_total"] > 50 for r in rows)
    assert all(r["se/recall@20"] > 0 and "ndcg@20" not in r and "loss" not in r for r in rows)
    assert "popularity/recall@20" not in rows[0]


def test_last_evaluation_scores_final_max_users(tmp_path: Path) -> None:
    """A sampled curve, then the run's last evaluation on every test user (the end of
    num_passes here); a row that is not the last keeps the sample."""
    run_job(small_run(num_rounds=50, num_passes=1, clients_per_round=60,
                      eval={"ks": [10, 20], "every": 2, "max_users": 50, "final_max_users": 0,
                            "metrics": ["recall"]}), tmp_path / "run")
    rows = [r for r in read_rows(tmp_path / "run") if "eval_users" in r]
    last = read_rows(tmp_path / "run")[-1]
    assert last["pass"] == 1 and last["round"] < 50 and rows[-1] is not None
    assert rows[-1]["round"] == last["round"]
    assert rows[-1]["eval_users"] == rows[-1]["eval_users_total"] > 50
    assert len(rows) >= 2 and all(r["eval_users"] == 50 for r in rows[:-1])
    # The same run with final_max_users unset keeps the sample to the end.
    run_job(small_run(num_rounds=2, eval={"ks": [10, 20], "max_users": 50,
                                          "metrics": ["recall"]}), tmp_path / "same")
    assert [r["eval_users"] for r in read_rows(tmp_path / "same")] == [50, 50, 50]


def test_training_improves_recall_over_round_zero(inprocess_run: Path) -> None:
    rows = read_rows(inprocess_run)
    assert rows[-1]["recall@20"] > rows[0]["recall@20"] + 0.05


def test_same_seed_same_metrics_inprocess(inprocess_run: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run_job(small_run(num_rounds=4), again)
    assert without_timing(read_rows(again)) == without_timing(read_rows(inprocess_run))


def test_other_seed_other_metrics(inprocess_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_job(small_run(num_rounds=4, seed=8), other)
    assert read_rows(other)[-1]["recall@20"] != read_rows(inprocess_run)[-1]["recall@20"]


def test_resume_continues_to_the_same_result(inprocess_run: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    run_job(small_run(num_rounds=4, checkpoint_every=2), part)
    # Make it look like a crash after round 3: round 3's row written, its checkpoint not.
    rows = (part / "metrics.jsonl").read_text().splitlines(keepends=True)
    (part / "metrics.jsonl").write_text("".join(rows[:4]))
    shutil.rmtree(part / "checkpoints" / "round_000004")
    (part / "DONE").unlink()
    (part / "model.pt").unlink()
    run_job(small_run(resume=str(part)), tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    assert (part / "DONE").exists() and (part / "model.pt").exists()
    assert without_timing(read_rows(part)) == without_timing(read_rows(inprocess_run))


def test_fedavgm_resumes_with_its_momentum_to_the_same_result(tmp_path: Path) -> None:
    """Server momentum (FedAvgM) is in the checkpoint: a run resumed from round 2 ends
    where the uninterrupted one does (without it, round 3 would restart the momentum)."""
    opts = {"strategy.server_optimizer": "momentum", "strategy.server_lr": 0.5}
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_job(small_run(num_rounds=4, **opts), whole)
    run_job(small_run(num_rounds=4, checkpoint_every=2, **opts), part)
    rows = (part / "metrics.jsonl").read_text().splitlines(keepends=True)
    (part / "metrics.jsonl").write_text("".join(rows[:3]))  # a crash after round 2
    shutil.rmtree(part / "checkpoints" / "round_000004")
    (part / "DONE").unlink()
    (part / "model.pt").unlink()
    run_job(small_run(resume=str(part)), tmp_path / "unused")
    assert without_timing(read_rows(part)) == without_timing(read_rows(whole))
    assert read_rows(whole)[-1]["recall@20"] != read_rows(whole)[0]["recall@20"]


def test_refuses_to_overwrite_an_existing_run(inprocess_run: Path) -> None:
    from rf2.runs.run_folder import RunExists

    with pytest.raises(RunExists, match="already holds a run"):
        run_job(small_run(num_rounds=1), inprocess_run)


@pytest.mark.slow
def test_ray_backend_matches_inprocess_and_improves(inprocess_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The Ray path is first-class: real Flower simulation engine on Ray actors."""
    ray_dir = tmp_path / "ray"
    cfg = small_run(num_rounds=4)
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not pytest's.
    ray_tmp = tempfile.mkdtemp(prefix="rf2ray")
    cfg["simulation"] = {"backend": "ray", "ray_temp_dir": ray_tmp}
    try:
        run_job(cfg, ray_dir)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = read_rows(ray_dir)
    assert rows[-1]["recall@20"] > rows[0]["recall@20"] + 0.05
    # Ray's start and stop take seconds: the console says what is happening.
    out = capsys.readouterr().out
    workers = max(1, os.cpu_count() or 1)  # 1 CPU per client worker
    assert f"[rf2] starting Ray: {workers} workers" in out and "[rf2] stopping Ray" in out
    # Aggregation in partition-id order: Ray's reply order does not change a number.
    assert without_timing(rows) == without_timing(read_rows(inprocess_run))


def test_worker_loads_the_dataset_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import rf2.fl.client as client
    from rf2.core.config import load_run_config

    cfg = load_run_config(small_run())
    spec = client.client_spec_from(cfg.dataset, cfg.model, cfg.seed)
    calls = []
    real = client.load_dataset
    monkeypatch.setattr(client, "load_dataset", lambda *a: calls.append(1) or real(*a))
    client._WORKER_CACHE.clear()
    first = client.worker_state(spec)
    assert client.worker_state(spec) is first
    assert len(calls) == 1


@pytest.mark.slow
def test_joins_an_existing_ray_cluster(tmp_path: Path) -> None:
    """`simulation.ray_address` joins a cluster started with `ray start --head`.

    The test starts its own head (own temp dir, free ports, ``--block`` in its own
    session) and stops only that, never every Ray process on the host (that would
    include a researcher's running experiment).
    """
    # `ray` run by this interpreter: a virtualenv on a shared base has no `ray` script
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    temp = tempfile.mkdtemp(prefix="rf2clu")
    env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    head = subprocess.Popen([*ray_cli, "start", "--head", "--block", "--num-cpus=2",
                             "--port=0", "--include-dashboard=false", f"--temp-dir={temp}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        address = _head_address(head, timeout_s=180)
        cfg = small_run(num_rounds=2)
        cfg["simulation"] = {"backend": "ray", "ray_address": address}
        run_job(cfg, tmp_path / "run")
    finally:
        _stop_own_head(head)
        shutil.rmtree(temp, ignore_errors=True)
    rows = read_rows(tmp_path / "run")
    assert rows[-1]["num_clients_trained"] == 20
    assert rows[-1]["recall@20"] > rows[0]["recall@20"]


def _head_address(head: subprocess.Popen[str], timeout_s: float) -> str:
    """The GCS address a `ray start --head --block` prints, read from its output."""
    assert head.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = head.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"ray start --address='([^']+)'", line)
        if match:
            return match.group(1)
    raise AssertionError("ray start --head printed no address:\n" + "".join(seen))


def _stop_own_head(head: subprocess.Popen[str]) -> None:
    """SIGTERM to the head's own session: `ray start --block` then stops the processes it
    started (and they die with it); nothing else on the host is touched."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
