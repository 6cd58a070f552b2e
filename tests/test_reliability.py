"""Reliability: client faults, crash-safe resume after SIGKILL, full or read-only disks."""

from __future__ import annotations

import json
import os
import random
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
from rf2.runs.run_folder import RunFolder

# -- client faults ------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "reason"), [("raise", "client_error"), ("nan", "non_finite"),
                                              ("shape", "wrong_shape")])
def test_faulty_clients_are_excluded_and_counted(tmp_path: Path, kind: str, reason: str) -> None:
    faulty = list(range(0, 200, 2))  # every other user, in round 2 only
    cfg = small_run(num_rounds=3, fault_injection=[{"kind": kind, "users": faulty, "rounds": [2]}])
    run_job(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    r2 = rows[2]
    assert r2[f"fault/{reason}"] > 0
    assert r2[f"fault/{reason}"] + r2["num_clients_trained"] == r2["tier/all/completed"]
    assert rows[1][f"fault/{reason}"] == 0 and rows[3][f"fault/{reason}"] == 0
    assert r2["skipped"] == 0 and rows[-1]["recall@20"] > rows[0]["recall@20"]
    for r in rows:  # the faulty replies never reached the model
        assert r["recall@20"] == r["recall@20"]  # not NaN


def test_round_with_too_few_usable_replies_is_skipped(tmp_path: Path) -> None:
    cfg = small_run(num_rounds=3, fault_injection=[{"kind": "nan", "users": list(range(200)),
                                                    "rounds": [2]}])
    run_job(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    assert rows[2]["skipped"] == 1 and "min_completed" in rows[2]["skipped_reason"]
    assert rows[2]["fault/non_finite"] == 20
    # Skipping kept the model: round 2's evaluation equals round 1's.
    assert rows[2]["recall@20"] == rows[1]["recall@20"]
    assert rows[3]["skipped"] == 0


@pytest.mark.slow
def test_ray_client_raising_or_hanging_is_surfaced_within_bounded_time(tmp_path: Path) -> None:
    """Flower's run_simulation has been reported to hang when a client raises: ours must
    finish, count the failures and go on; a hung client times out as `fault/timeout`."""
    ray_tmp = tempfile.mkdtemp(prefix="rf2ray")
    cfg = small_run(num_rounds=3, fault_injection=[
        {"kind": "raise", "users": list(range(0, 200, 3)), "rounds": [1]},
        {"kind": "hang", "users": list(range(1, 200, 3)), "rounds": [2], "hang_s": 30.0},
    ])
    cfg["simulation"] = {"backend": "ray", "ray_temp_dir": ray_tmp, "round_timeout_s": 8.0}
    try:
        run_job(cfg, tmp_path / "run")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = read_rows(tmp_path / "run")
    assert rows[1]["fault/client_error"] > 0 and rows[1]["fault/timeout"] == 0
    # The hung round ends at its 8 s timeout, not at the 30 s hang (the run returned at all:
    # no hang on a raising client).
    assert rows[2]["fault/timeout"] > 0
    assert rows[2]["round_wall_s"] < 30
    assert len(rows) == 4 and rows[-1]["recall@20"] > rows[0]["recall@20"]


# -- crash-safe resume ----------------------------------------------------------------------

CLI_ARGS = ["simulation=inprocess", "num_rounds=6", "checkpoint_every=1", "seed=5",
            "dataset.num_users=1000", "clients_per_round=100", "progress=false"]


def _cli(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rf2", *CLI_ARGS, f"hydra.run.dir={run_dir}",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    reference = _cli(tmp_path / "reference")
    victim = _cli(tmp_path / "victim")
    kill_after = random.Random(os.getpid()).randint(1, 4)
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") > kill_after:
            break
        time.sleep(0.05)
    time.sleep(random.Random(kill_after).uniform(0.0, 0.5))  # somewhere inside a round
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "victim" / "DONE").exists()
    # Simulate the torn tail a crash mid-write can leave.
    with open(metrics, "a", encoding="utf-8") as fh:
        fh.write('{"round": 99, "recall@2')
    resumed = subprocess.run([sys.executable, "-m", "rf2", f"resume={tmp_path / 'victim'}",
                              f"hydra.run.dir={tmp_path / 'resume-log'}"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read() if reference.stderr else ""
    got, want = read_rows(tmp_path / "victim"), read_rows(tmp_path / "reference")
    assert [r["round"] for r in got] == list(range(7))
    assert without_timing(got) == without_timing(want)


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.create({"seed": 1})
    folder.append_metrics({"round": 0, "x": 1.0})
    folder.append_metrics({"round": 1, "x": 2.0})
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"round": 2, "x"')
    assert [r["round"] for r in folder.read_metrics()] == [0, 1]
    folder.truncate_to_round(1)
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert [r["round"] for r in folder.read_metrics()] == [0, 1]


# -- disks ----------------------------------------------------------------------------------


def _tmpfs(path: Path, size: str, *opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    options = ",".join((f"size={size}", *opts))
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    return ok


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    mount = Path(tempfile.mkdtemp(prefix="rf2disk"))
    if not _tmpfs(mount, "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


@pytest.mark.slow  # trains until a 1 MB disk fills (tens of rounds)
def test_full_disk_stops_with_one_line_and_keeps_earlier_rounds(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    proc = subprocess.run([sys.executable, "-m", "rf2", "simulation=inprocess", "num_rounds=200",
                           "dataset.num_users=200", "clients_per_round=10", "checkpoint_every=0",
                           "progress=false", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("rf2: ") and "No space left" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    text = (run_dir / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]  # every line is whole
    assert len(rows) >= 2 and [r["round"] for r in rows] == list(range(len(rows)))
    assert not (run_dir / "DONE").exists()


@pytest.mark.parametrize("form", ["hydra.run.dir={}", "hydra.run.dir='{}'", "++hydra.run.dir={}"])
def test_read_only_output_dir_is_one_clear_line(form: str) -> None:
    """However the folder is written on the command line (quoted, ``++``), Hydra's own
    mkdir never gets to print its traceback: one line, exit 2, nothing created."""
    mount = Path(tempfile.mkdtemp(prefix="rf2ro"))
    if not _tmpfs(mount, "1m", "ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = subprocess.run([sys.executable, "-m", "rf2", "simulation=inprocess",
                               form.format(mount / "run")],
                              capture_output=True, text=True, timeout=120)
        left = list(mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"rf2: cannot write the output directory {mount / 'run'}: Read-only file system"]
    assert left == []
