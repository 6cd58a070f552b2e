"""Ctrl-C or SIGTERM during a run: stop at the end of the current round, keep every
completed round.

While :func:`stop_on_signals` is active, the first SIGINT (a terminal's Ctrl-C) or
SIGTERM (what ``timeout``, SLURM, Kubernetes and ``docker stop`` send) asks the server
to stop after the round in flight: it finishes that round, writes its row and a
checkpoint, and returns; the launcher then raises :class:`RunInterrupted` and the CLI
prints ``rf2: interrupted after round N; resume with: rf2 resume=<dir>`` (exit status
128 + the signal: 130 for SIGINT, 143 for SIGTERM, :func:`exit_status`).
If the round is not over within ``grace_s`` seconds (or on a second signal), the round
is abandoned: :class:`RunInterrupted` is raised in the thread running the ServerApp
(the main thread in-process; Flower's ServerApp thread on Ray, via
``PyThreadState_SetAsyncExc``); the server catches it and returns normally (so
Flower's engine shuts down at once), nothing of that round is written, and a resume
recomputes it from the newest checkpoint.

Why a grace period and not an immediate stop: a round stopped half-way would leave the
selector and clock advanced without a row, so only a round boundary can be checkpointed.

While Ray starts (:func:`start_noting_stops`) a signal is only noted: the launcher stops
as soon as ``ray.init`` returns, before any round (a start aborted half-way could leave
Ray's processes behind).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an Exception
    """The user (Ctrl-C) or a scheduler (SIGTERM) interrupted the run. A BaseException,
    so that handlers of client errors (``except Exception``) do not swallow it."""


class _StopState:
    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signals = 0
        self.server_thread: int | None = None  # ident of the thread running the ServerApp
        self.signum: int | None = None  # the first stop signal received
        self.deferred = False  # Ray is starting: note signals, act once it is up

    def reset(self) -> None:
        self.requested.clear()
        self.signals = 0
        self.server_thread = None
        self.signum = None
        self.deferred = False

    def note(self, signum: int) -> None:
        self.requested.set()
        if self.signum is None:
            self.signum = signum


STOP = _StopState()


def stop_requested() -> bool:
    return STOP.requested.is_set()


def exit_status(signum: int | None = None) -> int:
    """The shell's status for a run stopped by ``signum`` (default: the one received):
    130 after Ctrl-C, 143 after SIGTERM."""
    return 128 + int(signum or STOP.signum or signal.SIGINT)


def register_server_thread() -> None:
    """Called by the ServerApp main: the thread an abandoned round is interrupted in."""
    STOP.server_thread = threading.get_ident()


def _raise_in(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(RunInterrupted))


def _quiet_thread_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is RunInterrupted:
        return  # the ServerApp thread was told to stop: not an error to print
    _default_hook(args)


_default_hook = threading.excepthook


@contextmanager
def stop_on_signals(grace_s: float = 2.0) -> Iterator[None]:
    """Install the SIGINT/SIGTERM behaviour above (only from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.reset()
    main_id = threading.get_ident()
    timers: list[threading.Timer] = []
    active = threading.Event()
    active.set()

    def grace_over() -> None:
        # Only while the run is still going: once it has stopped (and this context is
        # left), a late SIGINT would hit whatever runs next (a sweep's next job).
        if STOP.signals == 1 and active.is_set():
            STOP.signals = 2
            signal.pthread_kill(main_id, signal.SIGINT)

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signal signature
        STOP.note(signum)
        if STOP.deferred:
            return  # Ray is starting: the launcher stops once it is up
        STOP.signals += 1
        if STOP.signals == 1:
            timer = threading.Timer(grace_s, grace_over)
            timer.daemon = True
            timers.append(timer)
            timer.start()
            return
        server = STOP.server_thread
        if server is None or server == main_id:
            raise RunInterrupted
        _raise_in(server)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    threading.excepthook = _quiet_thread_hook
    try:
        yield
    finally:
        active.clear()
        for timer in timers:
            timer.cancel()
        for sig, old in previous.items():
            signal.signal(sig, old)
        threading.excepthook = _default_hook


# Processes forked while this is set start with SIGINT ignored (see ray_start_guard).
_children_ignore_sigint = False


def _after_fork_in_child() -> None:
    if _children_ignore_sigint:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
        try:
            # Out of rf2's process group (the raylet's workers follow it): a SIGTERM to
            # the whole group (SLURM's scancel, systemd, kill -TERM -- -PGID) then reaches
            # rf2, which stops at a round boundary and shuts Ray down, and not Ray's
            # workers, which would die mid-round (the round's clients failed).
            os.setpgid(0, 0)
        except OSError:
            pass


# Runs in the child of os.fork() and of subprocess.Popen(preexec_fn=...), which is how
# Ray starts its GCS and raylet (ray._private.services.start_ray_process).
os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def start_noting_stops(start: Callable[[], None], poll_s: float = 0.05) -> Iterator[None]:
    """``with start_noting_stops(ray_init):`` starts Ray so that a Ctrl-C or SIGTERM
    meanwhile is never lost; Ray is used (and shut down) inside the block.

    * Processes started by ``start`` (Ray's raylet and GCS, and the workers the raylet
      starts) inherit SIGINT ignored: a terminal's Ctrl-C goes to the whole foreground
      process group, and Ray's workers would die mid-task and turn the round in flight
      into client errors. Only the children ignore it (set between fork and exec): this
      process keeps its handler, so a Ctrl-C while Ray starts is noted.
    * A signal meanwhile only sets :func:`stop_requested` (there is no round to finish
      yet, and an exception raised inside ``ray.init`` could leave a lock held or Ray
      half started); the caller checks it once Ray is up and stops before round 1.
    * ``start`` runs in a helper thread while this (main) thread waits: ``ray.init``
      called from the main thread replaces the SIGTERM handler with its own
      (``sys.exit``), and Ray's C++ core installs one that prints a stack dump and
      aborts. rf2's handler is put back every ``poll_s`` while Ray starts, and after.
      The helper thread lives until the block ends: Ray's processes die with the thread
      that started them (``PR_SET_PDEATHSIG``).
    """
    global _children_ignore_sigint
    if threading.current_thread() is not threading.main_thread():
        start()
        yield
        return
    term = signal.getsignal(signal.SIGTERM)
    failed: list[BaseException] = []
    started, release = threading.Event(), threading.Event()

    def body() -> None:
        try:
            start()
        except BaseException as ex:  # noqa: BLE001 - re-raised in the main thread below
            failed.append(ex)
        finally:
            started.set()
        release.wait()

    deferred = STOP.deferred
    STOP.deferred = True
    _children_ignore_sigint = True
    thread = threading.Thread(target=body, name="rf2-ray-start", daemon=True)
    try:
        thread.start()
        while not started.wait(poll_s):
            if term is not None:
                signal.signal(signal.SIGTERM, term)
    finally:
        _children_ignore_sigint = False
        STOP.deferred = deferred
        if term is not None:
            signal.signal(signal.SIGTERM, term)
    try:
        if failed:
            raise failed[0]
        yield
    finally:
        release.set()
        thread.join()


@contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside inherit SIGINT ignored and leave this process group, and
    this process ignores SIGINT meanwhile (a Ctrl-C then is lost: prefer
    :func:`start_noting_stops`, which keeps this process's handler); its SIGTERM handler
    is put back after. Used where a Ctrl-C reaches the work another way
    (``rf2.fl.ray_jobs``: through its stop flag)."""
    global _children_ignore_sigint
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    _children_ignore_sigint = True  # and out of this process group, as above
    try:
        yield
    finally:
        _children_ignore_sigint = False
        signal.signal(signal.SIGINT, previous)
        if term is not None:  # ray.init from the main thread installs its own (sys.exit)
            signal.signal(signal.SIGTERM, term)
