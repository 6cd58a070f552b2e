"""Issue 14: run-folder lock, verified checkpoints, resume rules, input checks that give
one line and exit 2, and environment faults that give one line (no traceback)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import read_rows, small_run, without_timing

from rf2.cli.precheck import OverrideError, check_command
from rf2.cli.resume import ResumeMismatch
from rf2.cli.support import run_job
from rf2.core.config import load_run_config
from rf2.core.errors import ConfigError, DataError, ProfileError
from rf2.hetero.devices import load_profile
from rf2.runs.lock import LOCK, RunFolderBusy, RunLock
from rf2.runs.run_folder import RunExists, RunFolder, RunFolderError

SMALL = ["simulation=inprocess", "dataset.num_users=200", "dataset.num_items=150",
         "clients_per_round=10", "num_rounds=2", "model.dim=16", "progress=false"]


def _rf2(args: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rf2", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, **kw)  # type: ignore[call-overload]


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- the lock -----------------------------------------------------------------------------


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"):
        owner = json.loads((tmp_path / "run" / LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
        with pytest.raises(RunFolderBusy):
            run_job(small_run(num_rounds=1), tmp_path / "run")
    assert not (tmp_path / "run" / LOCK).exists()  # released
    assert RunFolderBusy.exit_code == 2


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(json.dumps({"pid": int(dead),
                                                     "host": socket.gethostname()}))
    run_job(small_run(num_rounds=1), tmp_path / "run")
    assert RunFolder(tmp_path / "run").done and not (tmp_path / "run" / LOCK).exists()


def test_lock_of_a_reused_pid_is_stale_and_other_hosts_lock_is_not(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": 1}
    assert lock.is_stale(me)  # this pid, but another process's start time
    assert not lock.is_stale({**me, "host": "elsewhere"})
    assert "delete" in lock.busy_message({**me, "host": "elsewhere"})


@pytest.mark.slow  # an rf2 subprocess or a client hang: seconds each
def test_two_cli_runs_into_one_folder_one_wins_one_line_exit_2(tmp_path: Path) -> None:
    args = [*SMALL, "num_rounds=4", "dataset.num_users=600", "clients_per_round=60",
            f"hydra.run.dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen([sys.executable, "-m", "rf2", *args, f"seed={s}"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser
    rounds = [r["round"] for r in read_rows(tmp_path / "run")]
    assert rounds == [0, 1, 2, 3, 4]  # each round once: no interleaved second writer


def test_finished_folder_refused_before_anything_runs(tmp_path: Path) -> None:
    run_job(small_run(num_rounds=1), tmp_path / "run")
    with pytest.raises(RunExists) as err:
        run_job(small_run(num_rounds=1), tmp_path / "run")
    assert err.value.exit_code == 2


# -- checkpoints --------------------------------------------------------------------------


def _crashed_run(tmp_path: Path, rounds: int = 4) -> Path:
    run = tmp_path / "run"
    run_job(small_run(num_rounds=rounds, checkpoint_every=1), run)
    (run / "DONE").unlink()
    (run / "model.pt").unlink()
    return run


def test_truncated_newest_checkpoint_falls_back_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = tmp_path / "reference"
    run_job(small_run(num_rounds=4), reference)
    run = _crashed_run(tmp_path)
    newest = sorted((run / "checkpoints").glob("round_*"))[-1]
    data = (newest / "arrays.npz").read_bytes()
    (newest / "arrays.npz").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="rf2"):
        run_job(small_run(resume=str(run)), tmp_path / "unused")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "round_000004" in warnings[0] and "round_000003" in warnings[0]
    assert "bytes, expected" in warnings[0]
    assert without_timing(read_rows(run)) == without_timing(read_rows(reference))


def test_same_size_corruption_is_caught_by_the_hash(tmp_path: Path) -> None:
    from rf2.runs.run_folder import verify_checkpoint

    run = _crashed_run(tmp_path, rounds=2)
    newest = sorted((run / "checkpoints").glob("round_*"))[-1]
    assert verify_checkpoint(newest) is None
    data = bytearray((newest / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "arrays.npz").write_bytes(bytes(data))
    assert "SHA-256" in (verify_checkpoint(newest) or "")


def test_no_valid_checkpoint_says_so_and_restarts_from_round_0(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = _crashed_run(tmp_path, rounds=2)
    for ckpt in (run / "checkpoints").glob("round_*"):
        (ckpt / "state.json").write_text("{")
    with caplog.at_level("WARNING", logger="rf2"):
        run_job(small_run(resume=str(run)), tmp_path / "unused")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "no valid checkpoint" in text and "round 0" in text
    assert [r["round"] for r in read_rows(run)] == [0, 1, 2]


# -- resume rules -------------------------------------------------------------------------


def test_resume_refuses_to_change_the_strategy_or_model(tmp_path: Path) -> None:
    run = _crashed_run(tmp_path, rounds=2)
    data = small_run(resume=str(run))
    data["strategy"] = {"name": "qffl"}
    data["model"] = {"name": "two_tower", "dim": 16}
    with pytest.raises(ResumeMismatch) as err:
        run_job(data, tmp_path / "unused", ["strategy=qffl", "model=two_tower"])
    assert "strategy.name: 'fedavg' -> 'qffl'" in str(err.value)
    assert "model.name: 'hier_index' -> 'two_tower'" in str(err.value)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_resume_may_extend_num_rounds_and_matches_a_longer_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_job(small_run(num_rounds=2), run)
    run_job(small_run(resume=str(run), num_rounds=4), tmp_path / "unused", ["num_rounds=4"])
    longer = tmp_path / "longer"
    run_job(small_run(num_rounds=4), longer)
    assert RunFolder(run).done and RunFolder(run).read_config()["num_rounds"] == 4
    assert without_timing(read_rows(run)) == without_timing(read_rows(longer))


def test_resuming_a_finished_run_says_so_and_rewrites_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run_job(small_run(num_rounds=2), run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    run_job(small_run(resume=str(run)), tmp_path / "unused")
    assert "is finished (2 rounds" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_resume_after_the_dataset_changed_is_one_data_error(tmp_path: Path) -> None:
    data = tmp_path / "lg"
    data.mkdir()

    def write(n_items: int) -> None:
        train = [" ".join(map(str, [u, *[(u * 7 + 3 * k) % n_items for k in range(5)]]))
                 for u in range(60)]
        test = [f"{u} {(u * 7 + 15) % n_items}" for u in range(60)]
        (data / "train.txt").write_text("\n".join(train) + "\n")
        (data / "test.txt").write_text("\n".join(test) + "\n")

    write(80)
    cfg = small_run(num_rounds=2, clients_per_round=10, checkpoint_every=1)
    cfg["dataset"] = {"name": "lightgcn", "path": str(data)}
    cfg["model"] = {"dim": 8, "index": {"nodes_per_level": [4, 4]}}
    cfg["eval"] = {"ks": [5]}
    run_job(cfg, tmp_path / "run")
    (tmp_path / "run" / "DONE").unlink()
    write(120)
    with pytest.raises(DataError, match="dataset changed"):
        run_job({**cfg, "resume": str(tmp_path / "run")}, tmp_path / "unused")
    (tmp_path / "run" / "data_fingerprint.json").unlink()  # an older run folder: shapes catch it
    with pytest.raises(DataError, match="shape"):
        run_job({**cfg, "resume": str(tmp_path / "run")}, tmp_path / "unused")


# -- input checks -------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "field", "allowed"), [
    ({"seed": -1}, "seed", "[0, 4294967295]"),
    ({"seed": 2**64}, "seed", "[0, 4294967295]"),
    ({"client": {"lr": float("inf")}}, "client.lr", "finite"),
    ({"strategy": {"server_lr": float("nan")}}, "strategy.server_lr", "finite"),
    ({"round": {"min_completed": 50}}, "round.min_completed", "clients_per_round=20"),
    ({"num_rounds": 0}, "num_rounds", ">= 1"),
])
def test_bad_values_name_field_value_and_range(override: dict, field: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config({**small_run(), **override})
    assert err.value.field == field and allowed in str(err.value)


def test_yaml_nan_is_the_fault_kind_nan() -> None:
    cfg = load_run_config(small_run(fault_injection=[{"kind": float("nan"), "users": [1]}]))
    assert cfg.fault_injection[0].kind == "nan"


@pytest.mark.parametrize(("override", "field"), [
    ({"fault_injection": [{"kind": "raise", "users": [5000]}]}, "fault_injection[0].users"),
    ({"fault_injection": [{"kind": "raise", "users": [1], "rounds": [9]}]},
     "fault_injection[0].rounds"),
    ({"model": {"dim": 16, "index": {"nodes_per_level": [2000, 16]}}},
     "model.index.nodes_per_level"),
])
def test_values_checked_against_the_data(tmp_path: Path, override: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        run_job({**small_run(), **override}, tmp_path / "run")
    assert err.value.field == field
    assert not (tmp_path / "run").exists()


def test_profile_yaml_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ntiers:\n  - name: a\n    share: [1\n")
    with pytest.raises(ProfileError, match=r"p\.yaml:5"):
        load_profile(str(bad))


def test_profile_latin1_byte_is_one_error_with_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_bytes(b"name: x\ntiers:\n  - name: caf\xe9\n")
    with pytest.raises(ProfileError, match=r"p\.yaml:3.*0xe9.*UTF-8"):
        load_profile(str(bad))


def test_profile_errors_come_before_the_dataset_loads(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ntiers: 3\n")
    cfg = small_run(devices={"profile": str(bad)})
    cfg["dataset"] = {"name": "movielens100k", "path": str(tmp_path / "missing")}
    with pytest.raises(ProfileError):
        run_job(cfg, tmp_path / "run")


def test_sweep_is_checked_job_by_job_before_any_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"client.lr=0.*sweep job 1"):
        check_command(["-m", *SMALL, "client.lr=0.1,0", f"hydra.sweep.dir={tmp_path / 'sw'}"])
    check_command(["-m", *SMALL, "client.lr=0.1,0.2"])  # a good sweep passes


def test_non_ascii_override_gets_a_quoting_hint() -> None:
    with pytest.raises(OverrideError, match="must be quoted"):
        check_command(["dataset.path=/data/mövie"])


@pytest.mark.slow  # an rf2 subprocess or a client hang: seconds each
def test_cli_rejected_sweep_leaves_no_folder(tmp_path: Path) -> None:
    proc = _rf2(["-m", *SMALL, "client.lr=0.1,0"], tmp_path)
    assert proc.returncode == 2
    assert "client.lr=0" in _one_line(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # an rf2 subprocess or a client hang: seconds each
def test_cli_data_error_leaves_no_outputs_date_folder(tmp_path: Path) -> None:
    proc = _rf2([*SMALL, "clients_per_round=500"], tmp_path)
    assert proc.returncode == 2 and "clients_per_round" in _one_line(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # an rf2 subprocess or a client hang: seconds each
def test_cli_second_sweep_into_a_fixed_sweep_dir_is_refused_up_front(
        tmp_path: Path, rf2_in_process: Any) -> None:
    sweep = tmp_path / "sw"
    # the first sweep in this process; the second, refused, in a real one (exit status 2)
    first = rf2_in_process("-m", *SMALL, "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = _rf2(["-m", *SMALL, "seed=1,2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert again.returncode == 2 and "already holds a run" in _one_line(again)


# -- environment faults -------------------------------------------------------------------


@pytest.mark.slow  # a whole run through rf2's command
def test_disk_full_writing_model_pt_is_one_line(tmp_path: Path, rf2_in_process: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    proc = rf2_in_process(*SMALL, "hydra.run.dir=run", cwd=tmp_path)  # rf2's command, here
    assert proc.returncode == 1
    line = _one_line(proc)
    assert "model.pt" in line and "No space left" in line
    assert not (tmp_path / "run" / "model.pt").exists()
    assert not (tmp_path / "run" / "model.pt.tmp").exists()


def test_save_model_turns_oserror_into_run_folder_error(tmp_path: Path) -> None:
    def full(fh: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunFolderError, match="model.pt: No space left"):
        RunFolder(tmp_path).save_model(full)


def test_help_into_a_closed_pipe_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(f"{sys.executable} -m rf2 --help | true",
                          shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 1


def test_resume_of_a_running_run_or_with_fewer_rounds_or_no_folder_is_refused(
        tmp_path: Path) -> None:
    run = _crashed_run(tmp_path, rounds=3)
    with RunLock(run), pytest.raises(RunFolderBusy):
        run_job(small_run(resume=str(run)), tmp_path / "unused")
    with pytest.raises(ConfigError, match="num_rounds=2 .*>= 3"):
        run_job(small_run(resume=str(run), num_rounds=2), tmp_path / "unused", ["num_rounds=2"])
    with pytest.raises(ConfigError, match="resume="):
        run_job(small_run(resume=str(tmp_path / "nothing")), tmp_path / "unused")


@pytest.mark.slow  # two rf2 sweeps as subprocesses
def test_parallel_sweep_with_joblib_launcher_equals_the_sequential_one(
        tmp_path: Path, rf2_in_process: Any) -> None:
    runs = {}
    for name, extra in (("seq", []), ("par", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])):
        args = ["-m", *SMALL, "seed=1,2", *extra, f"hydra.sweep.dir={tmp_path / name}"]
        # the sequential sweep in this process, the parallel one as a real rf2 command
        proc = rf2_in_process(*args, cwd=tmp_path) if name == "seq" else _rf2(args, tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[name] = [RunFolder(tmp_path / name / str(job)) for job in (0, 1)]
    for seq, par in zip(runs["seq"], runs["par"], strict=True):
        assert (par.path / "DONE").exists()
        got, want = par.read_metrics(), seq.read_metrics()
        assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2]
        for g, w in zip(got, want, strict=True):
            # Same seeds, same numbers: jobs in parallel do not share or disturb state
            # (evaluation's thread count may differ, so compare to float rounding).
            assert g["recall@20"] == pytest.approx(w["recall@20"], abs=1e-6)
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    assert runs["par"][0].read_metrics()[-1]["recall@20"] != runs["par"][1].read_metrics()[-1]["recall@20"]


# -- issue 22: sweep folder lock, output dirs and paths, resume without rows -------------


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # an rf2 subprocess
def test_second_sweep_into_a_running_sweeps_folder_changes_none_of_its_files(
        tmp_path: Path) -> None:
    """The window that used to let it through: a running sweep whose job 0 has its
    ``.hydra/`` but not yet its own lock (still importing). The sweep folder's lock,
    taken before Hydra writes anything, refuses the second sweep up front."""
    sweep = tmp_path / "sw"
    job = sweep / "0" / ".hydra"
    job.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    (job / "config.yaml").write_text("seed: 1\n")
    (sweep / "0" / "rf2.log").write_text("job 0 starting\n")
    with RunLock(sweep, "sweep folder"):  # held by this (live) process: a running sweep
        before = _snapshot(sweep)
        proc = _rf2(["-m", *SMALL, "seed=7,8", "num_rounds=5", f"hydra.sweep.dir={sweep}"],
                    tmp_path)
        assert _snapshot(sweep) == before  # no file rewritten, appended to or added
    assert proc.returncode == 2
    line = _one_line(proc)
    assert f"sweep folder {sweep} is in use by pid {os.getpid()}" in line


def test_a_sweep_holds_its_folder_lock_while_hydra_runs(tmp_path: Path) -> None:
    from rf2.cli.precheck import fixed_sweep_dir

    argv = ["-m", "seed=1,2", f"hydra.sweep.dir='{tmp_path / 'sw'}'"]
    assert fixed_sweep_dir(argv) == tmp_path / "sw"  # quoted as Hydra reads it
    assert fixed_sweep_dir(["-m", "hydra.sweep.dir=m/${now:%H}"]) is None  # unique anyway
    assert fixed_sweep_dir([f"hydra.sweep.dir={tmp_path}"]) is None  # not a multirun
    with RunLock(tmp_path / "sw", "sweep folder"), pytest.raises(RunFolderBusy,
                                                                 match="sweep folder"):
        check_command(["-m", *SMALL, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sw'}"])


@pytest.mark.parametrize("form", ["hydra.run.dir={}", "hydra.run.dir='{}'",
                                  "++hydra.run.dir={}", "hydra.run.dir={}/${{now:%H}}"])
def test_output_dir_under_a_file_is_one_line_exit_2(
        tmp_path: Path, form: str, capsys: pytest.CaptureFixture[str]) -> None:
    from rf2.cli.support import preflight_output_dir

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        preflight_output_dir([form.format(tmp_path / "file" / "run")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"rf2: cannot write the output directory {tmp_path / 'file'}")


def _symlink_loop(tmp_path: Path) -> Path:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "a"


def test_symlink_loop_as_dataset_path_is_one_data_error(tmp_path: Path) -> None:
    loop = _symlink_loop(tmp_path)
    with pytest.raises(DataError, match="symlink loop"):
        check_command(["dataset=movielens100k", f"dataset.path={loop}"])


def test_cli_symlink_loop_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path,
                                                                 rf2_in_process: Any) -> None:
    # rf2's command in this process: a data error's exit 2 in a real process is
    # test_cli_data_error_leaves_no_outputs_date_folder
    loop = _symlink_loop(tmp_path)
    proc = rf2_in_process(*SMALL, "dataset=movielens100k", f"dataset.path={loop}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "symlink loop" in _one_line(proc) and str(loop) in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no outputs/ left


def test_resume_of_a_folder_without_rows_says_it_starts_at_round_0(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    run_job(small_run(num_rounds=2), run)
    for path in run.iterdir():  # keep only config.yaml, as a run killed at its start
        if path.name != "config.yaml":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    with caplog.at_level("WARNING", logger="rf2"):
        run_job(small_run(resume=str(run)), tmp_path / "unused")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert f"{run} has no checkpoint; resuming from round 0 (it holds no rounds yet)" in text
    assert [r["round"] for r in read_rows(run)] == [0, 1, 2]
    assert json.loads((run / "data_fingerprint.json").read_text())["sha256"]


def test_more_negatives_than_items_is_accepted_as_documented(tmp_path: Path) -> None:
    """``model.num_negatives`` above the catalogue is allowed (docs/reliability.md, case
    61): negatives are drawn uniformly with replacement and the logQ correction uses the
    expected count K / I, so the sampled loss stays a valid estimate of the full one."""
    cfg = small_run(**{"model.loss": "sampled", "model.num_negatives": 400,  # 150 items
                       "num_rounds": 2})
    run_job(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["recall@20"]) for r in rows)
    assert rows[-1]["num_clients_trained"] > 0
