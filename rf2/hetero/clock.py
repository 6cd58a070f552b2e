"""Simulated time (FedScale-style virtual clock): who is online, who finishes, when.

Per selected client and round, completion time = download + compute + upload:

    download_s = bytes_down * 8 / (download_mbps * 1e6)
    compute_s  = num_examples * local_epochs * ms_per_example / 1000
    upload_s   = bytes_up * 8 / (upload_mbps * 1e6)

``ms_per_example`` is the device's base speed times a per-round lognormal jitter with
median 1 (``exp(sigma * N(0, 1))``); bandwidths get their own jitter the same way.
FedScale charges ``3 x batch x steps x ms`` because its ms/sample is an *inference*
latency (backward ~ 2x forward); our profiles' numbers are FLASH's measured *training*
times per example, so no factor 3 is applied.

Every random draw of round r comes from ``default_rng([seed, stream, r])`` drawn for the
whole population and indexed by user id: a client's fate in round r does not depend on
call order or on who else was selected, and resuming mid-run reproduces it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rf2.core.config import RoundConfig
from rf2.hetero.population import Population

_STREAM_ONLINE, _STREAM_SPEED, _STREAM_DROPOUT = 21, 22, 23


@dataclass(frozen=True, eq=False)
class RoundPlan:
    """What the clock decided for one round. Id arrays are user ids.

    ``completed`` are the only clients to train: the work of every dropped client would
    be discarded, so it is skipped. ``duration_s`` is the simulated round length: the
    time the K-th kept client finished when over-commitment was satisfied; otherwise the
    deadline if any client was still running at it; otherwise the time the last client
    resolved (finished, or failed mid-round: a dropout's partial time counts).
    """

    round: int
    selected: np.ndarray  # (S,) int64 in selection order
    completion_s: np.ndarray  # (S,) float64 time each selected client needs to finish
    completed: np.ndarray  # (C,) int64 trained this round
    dropped_deadline: np.ndarray  # (.,) int64 completion over the deadline
    dropped_dropout: np.ndarray  # (.,) int64 failed mid-round
    dropped_overcommit: np.ndarray  # (.,) int64 finished too late: K others were faster
    duration_s: float
    deadline_s: float | None  # the effective deadline (absolute or from the quantile)


def num_to_select(k: int, overcommit: float) -> int:
    """How many to select so that K can be kept: ceil((1 + overcommit) * K) (FedScale 1.3x)."""
    return int(math.ceil(round((1.0 + overcommit) * k, 9)))


class SimClock:
    """Population-wide simulated clock; ``now_s`` advances by each round's duration."""

    def __init__(self, population: Population, seed: int, model_bytes_down: float,
                 update_bytes_up: float, local_epochs: int = 1) -> None:
        self.population = population
        self.seed = int(seed)
        self.model_bytes_down = float(model_bytes_down)
        self.update_bytes_up = float(update_bytes_up)
        self.local_epochs = int(local_epochs)
        self.now_s = 0.0
        self.rounds_done = 0
        self._online_draw: tuple[int, np.ndarray] | None = None  # (round, (U,) uniforms)

    def _rng(self, stream: int, rnd: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, int(rnd)])

    def is_online(self, users: np.ndarray, rnd: int) -> np.ndarray:
        """(n,) bool: iid Bernoulli(availability) per round, or the on/off pattern.

        With period P, a device is online for round(availability * P) consecutive rounds
        of every P, shifted by its own phase.
        """
        users = np.asarray(users, dtype=np.int64)
        pop = self.population
        if self._online_draw is None or self._online_draw[0] != rnd:  # selector calls often
            self._online_draw = (rnd, self._rng(_STREAM_ONLINE, rnd).random(pop.num_users))
        u = self._online_draw[1][users]  # (n,)
        iid = u < pop.availability[users]
        period = pop.availability_period[users]
        on_len = np.rint(pop.availability[users] * period)
        pattern = (rnd + pop.availability_phase[users]) % np.maximum(period, 1) < on_len
        return np.where(period > 0, pattern, iid)

    def online_fn(self, rnd: int, cfg: RoundConfig) -> Callable[[np.ndarray], np.ndarray]:
        """The ``is_online`` callable for :meth:`ClientSelector.select` in round ``rnd``."""
        if not cfg.availability:
            return lambda users: np.ones(len(users), dtype=bool)
        return lambda users: self.is_online(users, rnd)

    def completion_times(self, users: np.ndarray, num_examples: np.ndarray, rnd: int,
                         bytes_down: float | np.ndarray | None = None,
                         bytes_up: float | np.ndarray | None = None) -> np.ndarray:
        """(n,) seconds for each user to download, train and upload in round ``rnd``.

        ``bytes_down``/``bytes_up`` may be per-user arrays (pruned, quantized or narrower
        models per tier); they default to the clock's model and update sizes.
        """
        users = np.asarray(users, dtype=np.int64)
        pop = self.population
        z = self._rng(_STREAM_SPEED, rnd).standard_normal((3, pop.num_users))[:, users]
        ms = pop.compute_ms_per_example[users] * np.exp(pop.compute_jitter_sigma[users] * z[0])
        nj = pop.network_jitter_sigma[users]
        down = pop.download_mbps[users] * np.exp(nj * z[1])
        up = pop.upload_mbps[users] * np.exp(nj * z[2])
        b_down = self.model_bytes_down if bytes_down is None else bytes_down
        b_up = self.update_bytes_up if bytes_up is None else bytes_up
        n_ex = np.asarray(num_examples, dtype=np.float64)
        compute_s = n_ex * self.local_epochs * ms / 1000.0
        return (np.asarray(b_down) * 8.0 / (down * 1e6) + compute_s
                + np.asarray(b_up) * 8.0 / (up * 1e6))

    def failures(self, users: np.ndarray, completion_s: np.ndarray, rnd: int, dropout: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(n,) whether each user fails mid-work in round ``rnd``, and when: after a
        uniform fraction of its ``completion_s`` (no failure: the completion time)."""
        users = np.asarray(users, dtype=np.int64)
        t = np.asarray(completion_s, dtype=np.float64)
        if not dropout:
            return np.zeros(users.size, dtype=bool), t.copy()
        u = self._rng(_STREAM_DROPOUT, rnd).random((2, self.population.num_users))[:, users]
        return u[0] < self.population.dropout[users], u[1] * t

    def plan_round(self, rnd: int, selected: np.ndarray, num_examples: np.ndarray,
                   cfg: RoundConfig, k: int | None = None,
                   bytes_down: float | np.ndarray | None = None,
                   bytes_up: float | np.ndarray | None = None) -> RoundPlan:
        """Apply dropout, deadline and over-commitment to the ``selected`` clients.

        ``k``: results wanted (the round ends when the K-th survivor finishes); None =
        wait for all. Labels, by priority: a client that fails before the round ends is
        ``dropped_dropout``; one whose completion time exceeds the deadline is
        ``dropped_deadline``; the first K survivors within the deadline are ``completed``;
        the rest (slower survivors, and failures the round never waited for) are
        ``dropped_overcommit``. The deadline is ``cfg.deadline_s``, or the
        ``cfg.deadline_quantile`` of the selected clients' completion times, or the
        smaller of the two when both are set.
        """
        sel = np.asarray(selected, dtype=np.int64)  # (S,)
        s = sel.size
        t = self.completion_times(sel, num_examples, rnd, bytes_down, bytes_up)  # (S,)
        fail, t_fail = self.failures(sel, t, rnd, cfg.dropout)
        deadline: float | None = cfg.deadline_s
        if cfg.deadline_quantile is not None and s > 0:
            q = float(np.quantile(t, cfg.deadline_quantile))
            deadline = q if deadline is None else min(deadline, q)
        dl = math.inf if deadline is None else deadline
        k_eff = s if k is None else min(int(k), s)
        ok = np.flatnonzero(~fail & (t <= dl))
        ok = ok[np.lexsort((ok, t[ok]))]  # survivors by finish time, ties by position
        done = ok[:k_eff]
        if k_eff > 0 and done.size == k_eff:
            end = float(t[done[-1]])  # K results in: the rest are cancelled
        elif s > 0:
            end = float(min(np.max(np.where(fail, t_fail, t)), dl))
        else:
            end = 0.0
        is_done = np.zeros(s, dtype=bool)
        is_done[done] = True
        is_drop = fail & (t_fail <= end)
        is_late = ~is_drop & (t > dl)
        is_over = ~(is_done | is_drop | is_late)
        return RoundPlan(
            round=int(rnd), selected=sel, completion_s=t, completed=sel[done],
            dropped_deadline=sel[is_late], dropped_dropout=sel[is_drop],
            dropped_overcommit=sel[is_over], duration_s=end, deadline_s=deadline,
        )

    def advance(self, plan: RoundPlan) -> float:
        """Move ``now_s`` past ``plan`` (also for a round skipped for too few results)."""
        self.now_s += plan.duration_s
        self.rounds_done += 1
        return self.now_s

    def state_dict(self) -> dict[str, Any]:
        return {"now_s": self.now_s, "rounds_done": self.rounds_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"clock checkpoint has seed {state['seed']}, this run {self.seed}")
        self.now_s = float(state["now_s"])
        self.rounds_done = int(state["rounds_done"])


def tier_counts(plan: RoundPlan, population: Population,
                offline_ids: np.ndarray | None = None) -> dict[str, int]:
    """Flat per-tier counters ``tier/<name>/<what>`` for one round's metrics row."""
    groups = {
        "selected": plan.selected, "completed": plan.completed,
        "dropped_deadline": plan.dropped_deadline, "dropped_dropout": plan.dropped_dropout,
        "dropped_overcommit": plan.dropped_overcommit,
        "offline": np.zeros(0, dtype=np.int64) if offline_ids is None else offline_ids,
    }
    num_tiers = len(population.tier_names)
    out: dict[str, int] = {}
    for what, ids in groups.items():
        per_tier = np.bincount(population.tier_of_user[np.asarray(ids, dtype=np.int64)],
                               minlength=num_tiers)
        for t, name in enumerate(population.tier_names):
            out[f"tier/{name}/{what}"] = int(per_tier[t])
    return out
