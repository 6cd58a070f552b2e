"""``rf2.log`` as a copy of the console: everything printed on stdout and stderr while
the run's command runs (the summary it prints is ``rf2.runs.summary``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

LOG = "rf2.log"


class _Tee:
    """A text stream that writes to the console stream and the log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        try:
            self._log.write(text)
        except (OSError, ValueError):
            pass  # a full disk must not stop the console
        return n

    def flush(self) -> None:
        self._stream.flush()
        try:
            self._log.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def console_copied_to(folder: Path) -> Iterator[None]:
    """While active, stdout and stderr are also appended to ``folder/rf2.log``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        yield  # no log file is no reason to refuse the run; the run's own writes report
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        try:
            log.close()
        except OSError:
            pass
