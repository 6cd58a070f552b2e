"""``strategy=fedbuff``: one server step of FedBuff on the simulated clock.

A step (one row of ``metrics.jsonl``, ``round`` = step number) reads as:

1. fill the free concurrency slots: select clients as a synchronous round would (seeded,
   availability of this step), time them with the clock (completion time, dropout);
   each pulls the current model (version = steps done);
2. the schedule (``rf2.hetero.buffer_schedule``) takes their ends in time order until
   ``clients_per_round`` arrivals (or nobody is left in flight);
3. the arrivals train, grouped by the version they pulled, each group through the same
   Flower message path as a synchronous round (``TrainDispatcher``), and are screened
   against that version;
4. each usable reply is rebased onto the current model with its staleness weight
   (``rf2.optim.staleness``), then aggregated exactly as a synchronous round's replies
   (FedAvg's mean, HeteroFL, per-row averaging, the server optimizer).

Clients that arrive in a later step keep training meanwhile (they are the stale ones).
Training is run only for clients that arrive, when their step comes (their result is the
same whenever it is computed: the model version and seed fix it). The versions still in
flight are kept, and saved with checkpoints.

How it maps onto Flower: the ServerApp and ClientApp are the synchronous ones. Flower's
message API has no notion of simulated time, so the asynchrony lives in rf2's schedule;
each step sends, per pulled version, one ``configure_train`` batch of messages through
the Grid and feeds the rebased replies to the strategy's ``aggregate_train``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from rf2.core.config import RunConfig
from rf2.fl.dispatch import TrainDispatcher
from rf2.fl.screening import ReplyScreen, Screened, UsableReply
from rf2.fl.selection import ClientSelector
from rf2.fl.tier_settings import TierSettings
from rf2.hetero.buffer_schedule import BufferSchedule, Work
from rf2.hetero.clock import SimClock
from rf2.optim.staleness import rebase, staleness_weight

Arrays = dict[str, np.ndarray]


@dataclass
class BufferedStep:
    """What one step collected, before aggregation."""

    started: np.ndarray  # (S,) users started at this step
    offline: np.ndarray  # (.,) users met offline while selecting
    arrivals: list[Work]
    failures: list[Work]
    usable: list[UsableReply]  # rebased onto the current model
    screened: list[Screened]
    staleness: dict[int, int]  # user -> staleness of its arrival
    bytes_down: dict[int, float]  # user -> what it downloaded when it started (arrivals)


class BufferedRounds:
    def __init__(self, cfg: RunConfig, tiers: TierSettings, num_examples: np.ndarray,
                 dispatcher: TrainDispatcher, screen: ReplyScreen) -> None:
        self.cfg = cfg
        self.tiers = tiers
        self.num_examples = num_examples
        self.dispatcher = dispatcher
        self.screen = screen
        self.schedule = BufferSchedule(cfg.buffer_concurrency(), cfg.clients_per_round)
        self.versions: dict[int, Arrays] = {}  # model versions clients still work on

    def step(self, grid: Grid, slots: list[int], rnd: int, selector: ClientSelector,
             clock: SimClock, current: Arrays,
             downloads: Callable[[np.ndarray, int], np.ndarray]) -> BufferedStep:
        """``downloads(users, rnd)``: bytes each user downloads when it starts at step
        ``rnd`` (the clock's download time, as in a synchronous round)."""
        cfg, sched = self.cfg, self.schedule
        online = clock.online_fn(rnd, cfg.round)
        busy = np.asarray([w.user for w in sched.in_flight], dtype=np.int64)

        def available(users: np.ndarray) -> np.ndarray:
            # A device still training cannot start again: met on the walk, it counts as
            # offline (loses its turn in this pass, as an offline device does).
            return np.asarray(online(users), dtype=bool) & ~np.isin(users, busy)

        started, offline = selector.select(sched.free_slots(), available)
        if started.size:
            self.versions[sched.version] = current
            _, b_up = self.tiers.expected_bytes(started)
            b_down = downloads(started, rnd)
            t = clock.completion_times(started, self.num_examples[started], rnd, b_down, b_up)
            fails, t_fail = clock.failures(started, t, rnd, cfg.round.dropout)
            for u, ti, f, tf in zip(started.tolist(), t, fails, t_fail, strict=True):
                sched.start(u, float(ti), bool(f), float(tf))
        arrivals, failures = sched.collect()
        clock.now_s = sched.now_s
        clock.rounds_done += 1
        staleness = {w.user: sched.staleness(w) for w in arrivals}
        by_version: dict[int, list[int]] = defaultdict(list)
        for w in arrivals:
            by_version[w.version].append(w.user)
        usable: list[UsableReply] = []
        screened: list[Screened] = []
        # Ascending versions: the current one (if any) trains last, so a FedOpt strategy's
        # configure_train snapshot is w_t when it aggregates (also set below).
        for version in sorted(by_version):
            pulled = self.versions[version]
            exchange = self.dispatcher.train(grid, slots, sorted(by_version[version]),
                                             version + 1, pulled)
            result = self.screen.screen(exchange.replies, exchange.missing, pulled)
            screened.append(result)
            for reply in result.usable:
                usable.append(self._rebased(reply, pulled, current, staleness[reply.user]))
        usable.sort(key=lambda r: r.user)
        bytes_down: dict[int, float] = {}
        for version, users in by_version.items():  # started at step version + 1
            sizes = downloads(np.asarray(users, dtype=np.int64), version + 1)
            bytes_down.update(zip(users, sizes.tolist(), strict=True))
        return BufferedStep(started, offline, arrivals, failures, usable, screened, staleness,
                            bytes_down)

    def _rebased(self, reply: UsableReply, pulled: Arrays, current: Arrays, s: int
                 ) -> UsableReply:
        if s == 0:
            return reply
        if getattr(reply, "partial", None) is not None:
            raise RuntimeError("strategy=fedbuff rebases each stale client's own update; a "
                               "message replied a partial sum")
        weight = staleness_weight(s, self.cfg.strategy.staleness_exponent)
        arrays = rebase(reply.arrays, self.tiers.reference_arrays(reply.user, pulled),
                        self.tiers.reference_arrays(reply.user, current), weight)
        return UsableReply(reply.user, reply.message, arrays)

    def stepped(self, new_arrays: Arrays | None, current: Arrays) -> None:
        """After aggregation: the version advances (a skipped step too: its arrivals were
        used up); versions no client works on any more are dropped."""
        version = self.schedule.step()
        self.versions[version] = current if new_arrays is None else new_arrays
        keep = self.schedule.versions_in_use()
        self.versions = {v: a for v, a in self.versions.items() if v in keep}

    def row(self, step: BufferedStep, tier_names: list[str], tier_of: Callable[[int], int]
            ) -> dict[str, Any]:
        """Per-step keys: arrivals, staleness (mean, max) and failures, overall and per
        tier; ``tier/<t>/selected``/``completed``/``dropped_dropout`` as a synchronous
        round names them (started, arrived, failed), so participation figures read both."""
        row: dict[str, Any] = {"in_flight": len(self.schedule.in_flight),
                               "arrivals": len(step.arrivals)}
        stale = np.asarray([step.staleness[w.user] for w in step.arrivals], dtype=np.float64)
        row["staleness_mean"] = float(stale.mean()) if stale.size else 0.0
        row["staleness_max"] = float(stale.max()) if stale.size else 0.0
        arrival_tiers = np.asarray([tier_of(w.user) for w in step.arrivals], dtype=np.int64)
        for t, name in enumerate(tier_names):
            mine = stale[arrival_tiers == t] if stale.size else stale
            row[f"tier/{name}/selected"] = int(sum(tier_of(int(u)) == t for u in step.started))
            row[f"tier/{name}/offline"] = int(sum(tier_of(int(u)) == t for u in step.offline))
            row[f"tier/{name}/completed"] = int(mine.size)
            row[f"tier/{name}/arrivals"] = int(mine.size)
            row[f"tier/{name}/dropped_dropout"] = int(
                sum(tier_of(w.user) == t for w in step.failures))
            row[f"tier/{name}/staleness_mean"] = float(mine.mean()) if mine.size else 0.0
            row[f"tier/{name}/staleness_max"] = float(mine.max()) if mine.size else 0.0
        return row

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"versions/{v}/{k}": a for v, arrs in self.versions.items()
                  for k, a in arrs.items()}
        return self.schedule.state_dict(), arrays

    def load(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.schedule.load_state_dict(state)
        versions: dict[int, Arrays] = defaultdict(dict)
        for key, value in arrays.items():
            _, v, name = key.split("/", 2)
            versions[int(v)][name] = value
        self.versions = dict(versions)
