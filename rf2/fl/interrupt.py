"""Ctrl-C during a run: stop at the end of the current round, keep every completed round.

While :func:`stop_on_sigint` is active, the first SIGINT asks the server to stop after
the round in flight: it finishes that round, writes its row and a checkpoint, and
returns; the launcher then raises :class:`RunInterrupted` and the CLI prints
``rf2: interrupted after round N; resume with: rf2 resume=<dir>`` (exit status 130).
If the round is not over within ``grace_s`` seconds (or on a second Ctrl-C), the round
is abandoned: :class:`RunInterrupted` is raised in the thread running the ServerApp
(the main thread in-process; Flower's ServerApp thread on Ray, via
``PyThreadState_SetAsyncExc``); the server catches it and returns normally (so
Flower's engine shuts down at once), nothing of that round is written, and a resume
recomputes it from the newest checkpoint.

Why a grace period and not an immediate stop: a round stopped half-way would leave the
selector and clock advanced without a row, so only a round boundary can be checkpointed.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RunInterrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an Exception
    """The user interrupted the run (Ctrl-C / SIGINT). A BaseException, so that handlers
    of client errors (``except Exception``) do not swallow it."""


class _StopState:
    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signals = 0
        self.server_thread: int | None = None  # ident of the thread running the ServerApp

    def reset(self) -> None:
        self.requested.clear()
        self.signals = 0
        self.server_thread = None


STOP = _StopState()


def stop_requested() -> bool:
    return STOP.requested.is_set()


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
def stop_on_sigint(grace_s: float = 2.0) -> Iterator[None]:
    """Install the Ctrl-C behaviour above (only from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.reset()
    main_id = threading.get_ident()

    def grace_over() -> None:
        if STOP.signals == 1:
            STOP.signals = 2
            signal.pthread_kill(main_id, signal.SIGINT)

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signal signature
        STOP.requested.set()
        STOP.signals += 1
        if STOP.signals == 1:
            timer = threading.Timer(grace_s, grace_over)
            timer.daemon = True
            timer.start()
            return
        server = STOP.server_thread
        if server is None or server == main_id:
            raise RunInterrupted
        _raise_in(server)

    previous = signal.signal(signal.SIGINT, handler)
    threading.excepthook = _quiet_thread_hook
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        threading.excepthook = _default_hook


@contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside (Ray's raylet, GCS and workers) inherit SIGINT ignored.

    A terminal's Ctrl-C goes to the whole foreground process group; Ray's workers would
    die mid-task and turn the round in flight into client errors. rf2 decides how the
    run stops instead (above). Python keeps an inherited SIG_IGN for SIGINT.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
