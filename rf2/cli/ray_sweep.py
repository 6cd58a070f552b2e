"""``hydra/launcher=rf2_ray``: a sweep's jobs as Ray tasks on a cluster (Hydra side).

    rf2 -m +experiment=rf2_fairness_gap_quick simulation=ray \\
        hydra/launcher=rf2_ray hydra.launcher.address=HEAD_IP:6379

Each job becomes one ``rf2`` command with the job's overrides, writing the folder the
basic launcher would (``hydra.sweep.dir``/``hydra.sweep.subdir``), started by a Ray task
(``rf2.fl.ray_jobs``); a job on ``simulation=ray`` gets ``simulation.ray_address`` of the
same cluster, so its clients run there too. Jobs run one after the other by default
(``max_parallel_jobs``), each using the whole cluster; with more at once, give each job
``simulation.ray_max_workers`` so that the jobs' client workers fit the cluster's CPUs.

Why not Hydra's ``hydra-ray-launcher`` 1.2.2: it pins ``cloudpickle<3`` (rf2's base has
3.1) and pulls ``ray[default]`` (dashboard, metrics agents) into every install, and its
jobs run *inside* a Ray worker, where Flower's Ray backend would ``ray.shutdown()`` the
worker itself at the end of a run; it also has no Ctrl-C story (a job's checkpoint).

Ctrl-C behaves as with the joblib launcher: every running job stops at a round boundary
with its checkpoint, jobs not started do not start, and the command ends with one
summary of what to resume (exit status 130).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

from rf2.fl import ray_jobs
from rf2.fl.ray_jobs import JobCommand, JobOutcome


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(index: int, overrides: Sequence[str], sweep_config: DictConfig,
                sweep_dir: Path, address: str) -> JobCommand:
    """The ``rf2`` command of one job: its overrides, its folder, and (on Ray) the
    cluster's address for its clients."""
    run_dir = (sweep_dir / str(sweep_config.hydra.sweep.subdir)).resolve()
    argv = [sys.executable, "-m", "rf2", *overrides, f"hydra.run.dir={_quoted(str(run_dir))}"]
    on_ray = OmegaConf.select(sweep_config, "simulation.backend") == "ray"
    named = any(o.split("=", 1)[0].lstrip("+~") == "simulation.ray_address" for o in overrides)
    if on_ray and not named:
        argv.append(f"simulation.ray_address={_quoted(address)}")
    return JobCommand(index=index, argv=argv, cwd=os.getcwd(),
                      env={"RF2_SWEEP_JOB": str(index)}, run_dir=str(run_dir))


def _print_outcome(outcome: JobOutcome) -> None:
    if outcome.stdout:
        sys.stdout.write(outcome.stdout)
        sys.stdout.flush()
    if outcome.stderr:
        sys.stderr.write(outcome.stderr)
        sys.stderr.flush()


def _record_job(job: JobCommand, outcome: JobOutcome | None, overrides: list[str]) -> None:
    """The job's line in the sweep's table (``rf2.cli.main``: the jobs file), as a job
    run by another launcher writes it from its own process."""
    from rf2.cli.main import SWEEP_JOBS

    path = os.environ.get(SWEEP_JOBS)
    if not path:
        return
    folder = Path(job.run_dir)
    held = folder if (folder / "metrics.jsonl").exists() else None
    if outcome is None:
        status = "not started"
    else:
        status = {0: "done", 130: "interrupted"}.get(outcome.returncode, "failed")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{job.index}\t{held or ''}\t{status}\t{chr(0x1f).join(overrides)}\n")


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],  # noqa: ANN401
           initial_job_idx: int) -> Sequence[JobReturn]:
    from rf2.cli.main import _note_interrupted_job, _sweep_interrupted
    from rf2.runs.run_folder import RunFolder

    config, context = launcher.config, launcher.hydra_context
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    opts = launcher.options
    address = ray_jobs.start_or_join(opts.get("address"), opts.get("ray_temp_dir"))
    jobs, sweep_configs = [], []
    for i, overrides in enumerate(job_overrides):
        index = initial_job_idx + i
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{index}"
            sweep_config.hydra.job.num = index
        sweep_configs.append(sweep_config)
        jobs.append(job_command(index, list(overrides), sweep_config, sweep_dir, address))
        print(f"rf2: job #{index}: {' '.join(filter_overrides(overrides))}", file=sys.stderr,
              flush=True)
    try:
        outcomes = ray_jobs.run_jobs(jobs, int(opts.get("max_parallel_jobs", 1)),
                                     float(opts.get("job_cpus", 0.0)), _sweep_interrupted,
                                     _print_outcome)
    finally:
        ray_jobs.shutdown()
    returns = []
    for job, outcome, overrides, sweep_config in zip(jobs, outcomes, job_overrides, sweep_configs,
                                                     strict=True):
        _record_job(job, outcome, list(overrides))
        ret = JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=config,
                        working_dir=os.getcwd(), task_name=str(config.hydra.job.name))
        ret.status = JobStatus.COMPLETED
        ret._return_value = None  # noqa: SLF001 - Hydra's own field
        if outcome is None:
            pass  # interrupted before it started: nothing to resume
        elif outcome.returncode == 0:
            ret._return_value = job.run_dir  # noqa: SLF001
        elif outcome.returncode == 130:
            folder = Path(job.run_dir)
            started = folder.is_dir() and bool(RunFolder(folder).read_metrics())
            _note_interrupted_job(folder if started else None)
        else:
            ret.status = JobStatus.FAILED
            ret._return_value = RuntimeError(  # noqa: SLF001
                f"job #{job.index} ({job.run_dir}) exited with status {outcome.returncode}")
        returns.append(ret)
    return returns
