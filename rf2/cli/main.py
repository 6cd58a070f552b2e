"""The ``rf2`` command (also ``python -m rf2``): a Hydra app over ``rf2.conf``.

    rf2                                   # synthetic data, FedAvg + Adagrad, Ray
    rf2 dataset=movielens100k dataset.path=/data/ml-100k num_rounds=100
    rf2 -m strategy=fedavg,fedprox,qffl seed=1,2,3   # a sweep (Hydra multirun)
    rf2 resume=outputs/2026-11-28/12-00-00-000000   # continue a run folder

Bad input prints one line naming the field, the value and what is allowed, and exits
with status 2 (``debug=true`` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rf2.core.errors import UserInputError
from rf2.fl.interrupt import STOP, RunInterrupted, exit_status, stop_requested
from rf2.runs.run_folder import RunFolder, RunFolderError

log = logging.getLogger("rf2")

# A sweep's interrupted jobs write their folders into this file (its path in the
# environment, so that jobs in a parallel launcher's worker processes see it too): the
# jobs still to start skip, and the command prints what to resume once Hydra returns.
SWEEP_INTERRUPTS = "RF2_SWEEP_INTERRUPTS"
# Every job of a sweep appends "number<TAB>folder<TAB>status<TAB>overrides" here (a parallel launcher's
# workers too): the command prints one table of the jobs once Hydra returns.
SWEEP_JOBS = "RF2_SWEEP_JOBS"


def _sweep_interrupts() -> Path | None:
    value = os.environ.get(SWEEP_INTERRUPTS)
    return Path(value) if value else None


_in_run = threading.Event()  # rf2 catches a KeyboardInterrupt here: inside _run's run_job
_received: int | None = None  # the stop signal this process got outside a run's own handler
_sweep_main = False  # this process is a sweep's launcher (not a parallel launcher's worker)
_sweep_signals = 0  # stop signals this sweep launcher received


def _on_signal(signum: int, frame: object) -> None:  # noqa: ARG001 - signal signature
    """SIGTERM outside a run (composing, loading, saving): what Ctrl-C does there."""
    global _received
    _received = _received or signum
    raise KeyboardInterrupt


def _on_sweep_signal(signum: int, frame: object) -> None:  # noqa: ARG001 - signal signature
    """Ctrl-C or SIGTERM to a sweep's launcher while its jobs run elsewhere (a parallel
    launcher's workers: a signal to the whole process group reaches them too, one sent
    to this process only reaches them through the note below, which their jobs watch)
    or between two jobs here: note it, so the jobs not yet started skip, and keep
    waiting for the running ones to write their last checkpoint. Inside a job's run here
    (basic launcher), and on this process's second signal, it is a KeyboardInterrupt.
    Counted here, not read from the note: with a signal to the whole group a worker's
    job may note the interrupt before this handler runs."""
    global _received, _sweep_signals
    _received = _received or signum
    _sweep_signals += 1
    if _in_run.is_set() or _sweep_signals > 1:
        raise KeyboardInterrupt
    _note_interrupted_job(None)


def _on_worker_signal(signum: int, frame: object) -> None:  # noqa: ARG001 - signal signature
    """Ctrl-C or SIGTERM in a parallel launcher's worker (a signal to the whole process
    group, as a terminal, SLURM's scancel or systemd send it) outside a run's own
    handler (``rf2.fl.interrupt``, which stops at a round boundary): inside the job's
    run (loading, setting up) a KeyboardInterrupt that ``_run`` turns into "interrupted";
    anywhere else (an idle worker, Hydra's set-up of a job) only a note. An exception
    there would fail the job in Hydra's hands or break joblib's worker pool, whose
    launcher then kills the other workers' jobs before their last checkpoint."""
    global _received
    _received = _received or signum
    if _in_run.is_set():
        raise KeyboardInterrupt
    STOP.note(signum)
    _note_interrupted_job(None)


def _stop_signal() -> int:
    """The signal that stopped this command (SIGINT unless a SIGTERM was seen)."""
    return STOP.signum or _received or signal.SIGINT


@contextmanager
def _watch_sweep(in_sweep: bool) -> Iterator[None]:
    """A sweep job in a parallel launcher's worker stops (at a round boundary) once the
    sweep is interrupted: its parent may have got a SIGTERM this worker never saw."""
    if not in_sweep:
        yield
        return
    if not _sweep_main and threading.current_thread() is threading.main_thread():
        # A parallel launcher's worker: left in place after the job, as the worker idles
        # between jobs (a run's own handler replaces it while the run goes).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_worker_signal)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            if _sweep_interrupted() and not stop_requested():
                STOP.note(signal.SIGTERM)

    watcher = threading.Thread(target=watch, name="rf2-sweep-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def _sweep_interrupted() -> bool:
    path = _sweep_interrupts()
    return path is not None and path.exists() and path.stat().st_size > 0


def _note_interrupted_job(folder: Path | None) -> None:
    path = _sweep_interrupts()
    if path is not None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(f"{folder or ''}\n")


def run_from_hydra(cfg: DictConfig) -> Path | None:
    from rf2.cli.support import remove_unused_run_dir

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    interrupts = _sweep_interrupts()
    in_sweep = interrupts is not None and HydraConfig.get().mode == RunMode.MULTIRUN
    job = str(HydraConfig.get().job.num) if HydraConfig.get().mode == RunMode.MULTIRUN else ""
    if in_sweep and _sweep_interrupted():
        remove_unused_run_dir(run_dir)  # the sweep was interrupted: start nothing new
        _note_job(job, None, "not started")
        return None
    written: Path | None = None
    status = "failed"  # unless _run returns: it exits on bad input or a full disk
    try:
        with _watch_sweep(in_sweep):
            written = _run(run_dir, _data_of(cfg), in_sweep)
        status = "done" if written else "interrupted"
        return written
    finally:
        if job:
            _note_job(job, written or _folder_of(run_dir, cfg), status)


def _folder_of(run_dir: Path, cfg: DictConfig) -> Path | None:
    """The folder a job wrote (its resumed run's, with ``resume=``), if it holds a run."""
    resume = cfg.get("resume")
    folder = Path(resume) if resume else run_dir
    return folder if (folder / "metrics.jsonl").exists() else None


def _note_job(job: str, folder: Path | None, status: str) -> None:
    path = os.environ.get(SWEEP_JOBS)
    if path and job:
        overrides = "\x1f".join(HydraConfig.get().overrides.task)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{job}\t{folder or ''}\t{status}\t{overrides}\n")


def _data_of(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return cast(dict[str, Any], data)  # a composed config's keys are strings


def _run(run_dir: Path, data: dict[str, Any], in_sweep: bool) -> Path | None:
    from rf2.cli.support import remove_unused_run_dir, run_job
    from rf2.runs.console import console_copied_to

    debug = bool(data.get("debug", False))
    resume = data.get("resume")
    # The console goes to the run's rf2.log: the resumed folder's when resuming (but not
    # a finished one's: resuming it changes nothing there, its log included).
    folder = run_dir  # the run this command writes
    if resume and (Path(resume) / "config.yaml").is_file():
        folder = Path(resume)
    target = run_dir if (folder / "DONE").exists() else folder
    with console_copied_to(target):
        try:
            overrides = list(HydraConfig.get().overrides.task)
            _in_run.set()
            try:
                written = run_job(data, run_dir, overrides)
            finally:
                _in_run.clear()
            return _finished(written, in_sweep)
        except RunFolderError as ex:
            # Full disk, read-only folder: earlier rounds stay intact (appends are whole
            # lines, checkpoints are renamed into place) and `resume=` can continue later.
            if debug:
                traceback.print_exc()
            print(f"rf2: {ex}", file=sys.stderr, flush=True)
            sys.exit(1)
        except UserInputError as ex:
            remove_unused_run_dir(run_dir)
            if debug:
                traceback.print_exc()
            print(f"rf2: {ex}", file=sys.stderr, flush=True)
            sys.exit(ex.exit_code)
        except (RunInterrupted, KeyboardInterrupt):
            if debug:
                traceback.print_exc()
            if RunFolder(folder).done:
                # The signal came as the run ended (DONE written, the lock being released,
                # a sweep's signal to the whole group as this job finished): it finished,
                # there is nothing to resume.
                return _finished(folder, in_sweep)
            rows = RunFolder(folder).read_metrics() if folder.is_dir() else []
            started = bool(rows) or RunFolder(folder).holds_run
            if rows:
                print(f"rf2: interrupted after round {int(rows[-1]['round'])}; resume with: "
                      f"rf2 resume={folder}", file=sys.stderr, flush=True)
            elif started:  # stopped while Ray started: the folder is set up, no row yet
                print(f"rf2: interrupted before round 0; resume with: rf2 resume={folder}",
                      file=sys.stderr, flush=True)
            else:
                remove_unused_run_dir(run_dir)
                print("rf2: interrupted before round 0; nothing to resume", file=sys.stderr,
                      flush=True)
            if in_sweep:
                # Return normally: a parallel launcher that saw a job fail would kill the
                # jobs still writing their last checkpoint. The jobs not yet started skip.
                _note_interrupted_job(folder if started else None)
                return None
            # Everything is on disk (rows and checkpoints are fsynced, the lock released):
            # leave now rather than wait seconds for library exit hooks (Flower's
            # telemetry, Ray) that could make a Ctrl-C feel ignored.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_status(_stop_signal()))


def _finished(written: Path, in_sweep: bool) -> Path:
    """A finished run: in a sweep one line per job (the sweep's table follows at the
    end), else the run's summary."""
    from rf2.runs.summary import job_line, run_summary

    for line in [job_line(RunFolder(written))] if in_sweep else run_summary(RunFolder(written)):
        print(line, flush=True)
    return written


_hydra_main = hydra.main(version_base="1.3", config_path="pkg://rf2.conf", config_name="config")(
    run_from_hydra
)


def _fail(ex: UserInputError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"rf2: {ex}", file=sys.stderr, flush=True)
    sys.exit(ex.exit_code)


def main() -> None:
    global _sweep_main
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    _sweep_main = multirun
    interrupts = jobs = None
    if multirun:
        fd, name = tempfile.mkstemp(prefix="rf2-sweep-", suffix=".txt")
        os.close(fd)
        interrupts = Path(name)
        os.environ[SWEEP_INTERRUPTS] = name
        fd, name = tempfile.mkstemp(prefix="rf2-sweep-jobs-", suffix=".tsv")
        os.close(fd)
        jobs = Path(name)
        os.environ[SWEEP_JOBS] = name
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_sweep_signal)
    else:
        signal.signal(signal.SIGTERM, _on_signal)  # a scheduler's stop, as a Ctrl-C
    try:
        _main()
        if jobs is not None:
            _sweep_table(jobs)
        if interrupts is not None:
            _sweep_summary(interrupts)
    except KeyboardInterrupt:  # before the run started (composing, checking, importing)
        if jobs is not None:
            _sweep_table(jobs)
        if interrupts is not None:  # a sweep: between jobs, or in the launcher's wait
            _sweep_summary(interrupts, interrupted=True)
        print("rf2: interrupted before round 0; nothing to resume", file=sys.stderr, flush=True)
        sys.exit(exit_status(_stop_signal()))
    except BrokenPipeError:
        # `rf2 --help | head -1`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and say it once on stderr.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("rf2: output closed early (broken pipe)", file=sys.stderr, flush=True)
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports it
    finally:
        for path in (interrupts, jobs):
            if path is not None:
                path.unlink(missing_ok=True)


def _sweep_table(jobs: Path) -> None:
    """After a sweep: one table of its jobs (final metric, status) and what to run next."""
    from rf2.runs.summary import JobOutcome, sweep_summary

    try:
        lines = jobs.read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    jobs.unlink(missing_ok=True)  # read: an interrupted sweep leaves by os._exit below
    outcomes: dict[str, JobOutcome] = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) == 4:
            num, folder, status, overrides = parts
            outcomes[num] = JobOutcome(num, Path(folder) if folder else None, status,
                                       tuple(x for x in overrides.split("\x1f") if x))
    for line in sweep_summary(list(outcomes.values())):
        print(line, flush=True)


def _sweep_summary(interrupts: Path, interrupted: bool = False) -> None:
    """After an interrupted sweep: one line per job to resume, exit status 130 (143
    after a SIGTERM)."""
    lines = interrupts.read_text(encoding="utf-8").splitlines() if interrupts.exists() else []
    if not lines and not interrupted:
        return
    folders = [line for line in lines if line]
    print(f"rf2: sweep interrupted; {len(folders)} job(s) to resume"
          + ("" if folders else " (later jobs did not start)"), file=sys.stderr, flush=True)
    for folder in folders:
        print(f"  rf2 resume={folder}", file=sys.stderr, flush=True)
    interrupts.unlink(missing_ok=True)
    _stop_idle_workers()
    # Everything is on disk: leave without library exit hooks, as a single run does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_status(_stop_signal()))


def _stop_idle_workers() -> None:
    """Shut down joblib's (loky) worker pool, as the exit hook skipped by ``os._exit``
    would: idle workers would otherwise outlive this command for minutes, holding its
    stdout and stderr open (``rf2 -m ... | tee log`` would not end)."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)  # None unless the joblib launcher ran
    if executor is not None:
        # joblib's MemmappingExecutor.terminate also removes its shared-memory folder.
        getattr(executor, "terminate", executor.shutdown)()


def _narrowed_help(argv: list[str]) -> None:
    """``rf2 --help PREFIX``: the keys under PREFIX (Hydra's help lists them all), exit 0;
    an unknown prefix is one line naming the sections, exit 2."""
    from rf2.cli.config_docs import narrowed_help, sections

    prefixes = [a for a in argv if not a.startswith("-") and "=" not in a]
    if not prefixes:
        return
    for prefix in prefixes:
        lines = narrowed_help(prefix)
        if lines is None:
            known = ", ".join(s.name for s in sections() if s.name)
            print(f"rf2: --help {prefix}: no config key starts with {prefix!r}; sections: "
                  f"{known} (and the top-level keys: rf2 --help)", file=sys.stderr, flush=True)
            sys.exit(2)
        print("\n".join(lines), flush=True)
    sys.exit(0)


def _main() -> None:
    from rf2.cli.precheck import fixed_sweep_dir
    from rf2.cli.support import precheck_overrides, preflight_output_dir
    from rf2.runs.lock import RunLock

    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        _narrowed_help(sys.argv[1:])
    sys.argv[1:] = precheck_overrides(sys.argv[1:])
    argv = sys.argv[1:]
    if not any(a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") for a in argv):
        preflight_output_dir(argv)
        debug = any(a.lstrip("+") in ("debug=true", "debug=True") for a in argv)
        try:
            from rf2.cli.precheck import check_command

            check_command(argv)
            # A sweep into a fixed folder holds it before Hydra writes anything there: a
            # second sweep into it is refused without touching the running one's files.
            sweep_dir = fixed_sweep_dir(argv)
            lock = RunLock(sweep_dir, "sweep folder") if sweep_dir is not None else None
            if lock is not None:
                lock.acquire()
        except UserInputError as ex:
            _fail(ex, debug)
    else:
        lock = None
    try:
        register_ray_launcher()
        _hydra_main()
    finally:
        if lock is not None:
            lock.release()
    sys.stdout.flush()


def register_ray_launcher() -> None:
    """Make ``hydra/launcher=rf2_ray`` known to Hydra (``rf2.cli.ray_sweep``).

    A regular install puts it where Hydra's plugin scan looks (the ``hydra_plugins``
    namespace); an editable install (``pip install -e .``) maps it through setuptools'
    import hook, which that scan cannot list, so register it through Hydra's public
    ``Plugins.register`` (importing it also adds its config to Hydra's ConfigStore).
    """
    from hydra.core.plugins import Plugins
    from hydra_plugins.rf2_ray_launcher import Rf2RayLauncher

    Plugins.instance().register(Rf2RayLauncher)


if __name__ == "__main__":
    main()
