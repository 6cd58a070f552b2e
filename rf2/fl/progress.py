"""One progress line per round: round, recall@20, elapsed wall time."""

from __future__ import annotations

import sys


class ProgressPrinter:
    def __init__(self, enabled: bool, total_rounds: int) -> None:
        self.enabled = enabled
        self.width = len(str(total_rounds))
        self.total = total_rounds

    def round_done(self, rnd: int, recall20: float | None, elapsed_s: float, trained: int) -> None:
        if not self.enabled:
            return
        rec = "n/a" if recall20 is None else f"{recall20:.4f}"
        print(
            f"[rf2] round {rnd:>{self.width}}/{self.total}  recall@20 {rec}  "
            f"clients {trained:>4}  elapsed {elapsed_s:7.1f}s",
            file=sys.stdout,
            flush=True,
        )
