"""A sweep's jobs as Ray tasks on a cluster (the Ray side of ``hydra/launcher=rf2_ray``).

Each job is one ``rf2`` command (a plain run into its sweep subfolder) started by a Ray
task on whichever node has room; the job joins the same cluster for its clients
(``simulation.ray_address``), so its clients spread over the cluster too. The task
holds no CPU by default: the job's driver mostly waits for its client actors, which hold
the CPUs.

Ctrl-C: the launcher sets :class:`StopFlag`; each task then sends its job one SIGINT,
the job stops at a round boundary with a checkpoint (``rf2.fl.interrupt``) and exits 130,
and the task returns the job's console output. Jobs not started yet never start. A job
runs in its own session, so a terminal's Ctrl-C reaches it only through the flag (a
second SIGINT would abandon the round in flight).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rf2.fl.interrupt import children_ignore_sigint


@dataclass(frozen=True)
class JobCommand:
    """One sweep job: the command that runs it and the folder it writes."""

    index: int
    argv: list[str]
    cwd: str
    env: dict[str, str]
    run_dir: str


@dataclass(frozen=True)
class JobOutcome:
    index: int
    returncode: int
    stdout: str
    stderr: str
    node_id: str


class StopFlag:
    """Set once by the launcher on Ctrl-C; read by every job task (a Ray actor)."""

    def __init__(self) -> None:
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


def run_job_command(job: JobCommand, flag: Any, poll_s: float = 0.5) -> JobOutcome:  # noqa: ANN401
    """The body of a job task: run the job, pass a stop request on as one SIGINT."""
    import ray

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(job.env)
    proc = subprocess.Popen(job.argv, cwd=job.cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)  # noqa: PLW1509 - sets signals only
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    signalled = False
    while proc.poll() is None:
        time.sleep(poll_s)
        if not signalled and ray.get(flag.is_set.remote()):
            proc.send_signal(signal.SIGINT)
            signalled = True
    for reader in readers:
        reader.join()
    return JobOutcome(job.index, proc.returncode, "".join(out), "".join(err),
                      ray.get_runtime_context().get_node_id())


def _default_sigint() -> None:
    """In the job's process, before it starts: Ray's workers block and ignore SIGINT, and
    a child inherits both, so the job would never see the stop request."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_or_join(address: str | None, temp_dir: str | None = None) -> str:
    """Connect this process to the cluster at ``address`` (or start a local Ray); its
    GCS address, for the jobs to join."""
    import ray

    # Ctrl-C reaches the jobs through the flag; a local Ray's processes leave this process
    # group (a group SIGTERM reaches the sweep's launcher only), and rf2's SIGTERM handler
    # is put back after ray.init.
    with children_ignore_sigint():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if temp_dir:
                kwargs["_temp_dir"] = os.path.abspath(temp_dir)
            ray.init(**kwargs)
    return str(ray.get_runtime_context().gcs_address)


def run_jobs(jobs: Sequence[JobCommand], max_parallel: int, job_cpus: float,
             interrupted: Callable[[], bool], on_done: Callable[[JobOutcome], None]
             ) -> list[JobOutcome | None]:
    """Run ``jobs`` as Ray tasks, at most ``max_parallel`` at once (0 = all), in order.

    ``interrupted()`` is polled: once true, running jobs are asked to stop (one SIGINT
    each) and jobs not started stay unstarted (None in the result). ``on_done`` gets each
    outcome as it arrives (to print the job's console).
    """
    import ray

    flag: Any = ray.remote(num_cpus=0)(StopFlag).remote()  # an actor handle (Ray types plain
    # methods of an undecorated class as the functions themselves, without .remote)
    task = ray.remote(num_cpus=job_cpus, max_retries=0)(run_job_command)
    results: list[JobOutcome | None] = [None] * len(jobs)
    waiting = list(range(len(jobs)))
    running: dict[Any, int] = {}
    stopping = False
    limit = max_parallel if max_parallel > 0 else len(jobs)
    while running or (waiting and not stopping):
        if not stopping and interrupted():
            stopping = True
            ray.get(flag.set.remote())
        while waiting and not stopping and len(running) < limit:
            i = waiting.pop(0)
            running[task.remote(jobs[i], flag)] = i
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        for ref in done:
            i = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as ex:  # noqa: BLE001 - a lost task is a failed job
                outcome = JobOutcome(i, -1, "", f"rf2: job {i} failed on the cluster: {ex}\n",
                                     "")
            results[i] = outcome
            on_done(outcome)
    return results


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
