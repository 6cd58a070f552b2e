"""What a run tells the researcher: the end-of-run summary, and ``rf2.log`` as a copy of
the console (everything printed on stdout and stderr while the run's command runs)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rf2.runs.run_folder import RunFolder

LOG = "rf2.log"
SUMMARY_METRICS = ("recall@20", "ndcg@20")


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return "n/a"


def run_summary(folder: RunFolder) -> list[str]:
    """Lines naming the folder, rounds, final and best recall@20 / NDCG@20 (overall and
    per tier), wall time and simulated time."""
    rows = folder.read_metrics()
    if not rows:
        return [f"rf2: run folder {folder.path}: no rounds yet"]
    last = rows[-1]
    lines = [f"rf2: run finished: {folder.path}",
             f"  rounds {int(last['round'])}, wall {last.get('wall_time_s', float('nan')):.1f} s, "
             f"simulated {last.get('sim_time_s', float('nan')):.1f} s"]
    tiers = sorted({k.split("/")[1] for k in last if k.startswith("tier/") and
                    k.endswith("/" + SUMMARY_METRICS[0])})
    for metric in SUMMARY_METRICS:
        for label, key in [("overall", metric), *[(f"tier {t}", f"tier/{t}/{metric}")
                                                   for t in tiers]]:
            evaluated = [(r[key], int(r["round"])) for r in rows
                         if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if not evaluated:
                continue
            best, best_round = max(evaluated)
            final = next((r[key] for r in reversed(rows) if key in r), float("nan"))
            lines.append(f"  {metric:<10} {label:<14} final {_fmt(final)}  "
                         f"best {_fmt(best)} (round {best_round})")
    return lines + node_lines(folder.path)


NODES = "nodes.json"


def node_lines(path: Path) -> list[str]:
    """The Ray nodes the clients trained on (``nodes.json``), one line each."""
    try:
        nodes = json.loads((path / NODES).read_text(encoding="utf-8"))["nodes"]
    except (OSError, ValueError, KeyError):
        return []
    lines = [f"  ray nodes {len(nodes)}:"]
    for node in nodes:
        lines.append(f"    {node['node_id'][:12]} at {node['address']}, {node['cpus']:g} CPU: "
                     f"{node['clients_trained']} clients trained")
    return lines


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
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        try:
            log.close()
        except OSError:
            pass
