"""One writer per run folder: an exclusive lock file created atomically.

``.lock`` holds the writer's pid, host and process start time. A second writer (a run
into the same ``hydra.run.dir``, a resume of a running run, a sweep launched twice
into one ``hydra.sweep.dir``) gets :class:`RunFolderBusy`: one line, exit status 2.
A sweep into a fixed ``hydra.sweep.dir`` holds that folder's ``.lock`` too, taken before
Hydra writes anything there (``multirun.yaml``, the jobs' ``.hydra/``), so a second
sweep is refused before it can rewrite any file of the running one.

A lock whose writer is gone (killed, crashed, the machine rebooted) is stale and is
taken over: same host and the pid no longer runs (or runs a different process, i.e.
the pid was reused: its start time differs). A lock from another host cannot be
checked from here: the message names it so the user can remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from rf2.core.errors import UserInputError

LOCK = ".lock"


class RunFolderBusy(UserInputError):
    """Another live process writes this run folder."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # The command name (field 2) may hold spaces: split after its ')'.
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if ticks is not None:
        now = _start_ticks(pid)
        if now is not None and now != ticks:
            return False  # pid reused by another process
    return True


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock; released on exit."""

    def __init__(self, folder: str | Path, what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.what = what  # "run folder", or "sweep folder" for a sweep's hydra.sweep.dir
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        """The lock's content, or None when there is no lock; {} when it is unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    def is_stale(self, owner: dict[str, Any]) -> bool:
        if not owner:
            # Written by a writer killed between create and write: stale after a minute.
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return True
        if owner.get("host") != socket.gethostname():
            return False
        return not _alive(int(owner.get("pid", -1)), owner.get("start_ticks"))

    def busy_message(self, owner: dict[str, Any]) -> str:
        who = (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
               if owner else "another process")
        hint = "wait for it to finish, or choose another output directory"
        if owner and owner.get("host") != socket.gethostname():
            hint += f" (if that run is gone, delete {self.path})"
        return f"{self.what} {self.folder} is in use by {who}: {hint}"

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "start_ticks": _start_ticks(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile: try again
                if not self.is_stale(owner):
                    raise RunFolderBusy(self.busy_message(owner)) from None
                # Take over a stale lock: rename it away first, so two processes that both
                # saw it stale cannot both win (only one rename of the same file succeeds).
                aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                    aside.unlink()
                except OSError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise RunFolderBusy(self.busy_message(self.owner() or {}))

    def release(self) -> None:
        if not self.held:
            return
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_not_busy(folder: str | Path, what: str = "run folder") -> None:
    """Raise RunFolderBusy if a live writer holds ``folder`` (without taking the lock)."""
    lock = RunLock(folder, what)
    owner = lock.owner()
    if owner is not None and not lock.is_stale(owner):
        raise RunFolderBusy(lock.busy_message(owner))
