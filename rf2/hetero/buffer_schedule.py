"""FedBuff's schedule on the simulated clock: concurrency slots, a buffer of K arrivals.

At most ``concurrency`` clients work at a time, each on the model version it pulled when
it started (version = server steps done by then). Work ends at the client's completion
time, or earlier when it fails (dropout). The server takes arrivals in time order and
steps after ``buffer_size`` of them, or earlier when no client is left in flight
(nothing else can arrive). A client's staleness is the number of server steps between
its pull and the step that uses its update.

Slots freed between two steps are refilled at the next step: a new client pulls the
model of that step either way (the model only changes at steps), so refilling at the
arrival instead would change only its start time. This makes synchronous FedAvg exactly
the case concurrency = K: every step then waits for the whole cohort it started, with
staleness 0.

Pure bookkeeping (no training, no randomness): the server supplies who starts and their
times (``rf2.hetero.clock``) and gets back who arrived.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Work:
    """One client's work: started at ``start_s`` on ``version``; ends at ``end_s``."""

    user: int
    version: int
    start_s: float
    end_s: float
    fails: bool = False
    seq: int = 0  # start order: breaks ties between equal end times


@dataclass
class BufferSchedule:
    concurrency: int
    buffer_size: int
    now_s: float = 0.0
    version: int = 0  # server steps done
    in_flight: list[Work] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or not 1 <= self.buffer_size <= self.concurrency:
            raise ValueError(f"need 1 <= buffer_size ({self.buffer_size}) <= concurrency "
                             f"({self.concurrency})")

    def free_slots(self) -> int:
        return self.concurrency - len(self.in_flight)

    def start(self, user: int, duration_s: float, fails: bool = False,
              fail_after_s: float | None = None) -> Work:
        """A client starts now on the current version; it ends ``duration_s`` later, or
        ``fail_after_s`` later when it ``fails``."""
        if self.free_slots() < 1:
            raise ValueError("no free slot: concurrency reached")
        end = self.now_s + (fail_after_s if fails and fail_after_s is not None else duration_s)
        work = Work(int(user), self.version, self.now_s, float(end), bool(fails), self._seq)
        self._seq += 1
        self.in_flight.append(work)
        return work

    def collect(self) -> tuple[list[Work], list[Work]]:
        """Advance the clock through ends in time order until ``buffer_size`` arrivals,
        or until nothing is in flight. Returns (arrivals, failures), each in end order."""
        arrivals: list[Work] = []
        failures: list[Work] = []
        self.in_flight.sort(key=lambda w: (w.end_s, w.seq))
        while self.in_flight and len(arrivals) < self.buffer_size:
            work = self.in_flight.pop(0)
            self.now_s = max(self.now_s, work.end_s)
            (failures if work.fails else arrivals).append(work)
        return arrivals, failures

    def staleness(self, work: Work) -> int:
        """Server steps since ``work`` pulled its model (before :meth:`step`)."""
        return self.version - work.version

    def step(self) -> int:
        self.version += 1
        return self.version

    def versions_in_use(self) -> set[int]:
        return {w.version for w in self.in_flight}

    def state_dict(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "buffer_size": self.buffer_size,
                "now_s": self.now_s, "version": self.version, "seq": self._seq,
                "in_flight": [asdict(w) for w in self.in_flight]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.now_s = float(state["now_s"])
        self.version = int(state["version"])
        self._seq = int(state["seq"])
        self.in_flight = [Work(**w) for w in state["in_flight"]]
