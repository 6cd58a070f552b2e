"""Training dispatch: send this round's instructions to the clients that will finish.

The strategy's own ``configure_train`` builds the instructions (FedProx adds its mu,
FedOpt snapshots w_t) over a :class:`RoundGrid` that shows it exactly the slots this
round uses; the shared config is the round's :class:`RoundRecipe`, and each message
carries its batch of users with each one's :class:`UserTask` (tier settings from
:class:`TierSettings`, injected faults from ``fault_injection``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from rf2.core.config import RunConfig
from rf2.fl.params import numpy_to_record
from rf2.fl.round_grid import RoundGrid
from rf2.fl.tier_settings import TierSettings
from rf2.fl.user_task import RoundRecipe, UserTask, recipe_record


@dataclass(frozen=True)
class Exchange:
    """What came back from one round's training messages."""

    replies: list[tuple[int, Message]]  # (user, reply), in partition-id order
    missing: list[int]  # users sent an instruction that never answered


class TrainDispatcher:
    def __init__(self, cfg: RunConfig, strategy: Strategy, tiers: TierSettings,
                 users_per_message: int, partial_sums: bool = False) -> None:
        """``partial_sums``: clients may reply one sum per message for the users without
        a per-client transform (``rf2.fl.partial_sum``)."""
        self.cfg = cfg
        self.partial_sums = partial_sums
        self.strategy = strategy
        self.tiers = tiers
        self.users_per_message = users_per_message  # users batched in one message

    def train(self, grid: Grid, slots: list[int], users: list[int], rnd: int,
              global_arrays: dict[str, np.ndarray]) -> Exchange:
        if not users:
            return Exchange([], [])
        round_grid = RoundGrid(grid, slots, users, self.tasks_for(users, rnd),
                               self.users_per_message)
        sim = self.cfg.simulation
        recipe = RoundRecipe(
            server_round=rnd,
            lr=float(self.cfg.client.lr),
            local_epochs=int(self.cfg.client.local_epochs),
            batch_size=int(self.cfg.client.batch_size),
            seed=int(self.cfg.seed),
            num_rounds=int(self.cfg.num_rounds),
            round_timeout_s=float(sim.round_timeout_s),
            client_timeout_s=None if sim.client_timeout_s is None else float(sim.client_timeout_s),
            partial_sums=self.partial_sums,
        )
        messages = self.strategy.configure_train(
            rnd, numpy_to_record(global_arrays), recipe_record(recipe), round_grid
        )
        pairs = round_grid.exchange(list(messages), timeout=self.cfg.simulation.round_timeout_s)
        answered = {u for u, _ in pairs}
        return Exchange(pairs, [u for u in round_grid.sent_users if u not in answered])

    def tasks_for(self, users: list[int], rnd: int) -> dict[int, UserTask]:
        """Each user's own task this round: its tier's settings and injected faults."""
        out: dict[int, UserTask] = {}
        for u in users:
            task = self.tiers.task_for(u)
            for fi in self.cfg.fault_injection:
                if u in fi.users and (not fi.rounds or rnd in fi.rounds):
                    task = replace(task, fault=fi.kind, hang_s=float(fi.hang_s))
            out[u] = task
        return out
