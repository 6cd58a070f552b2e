"""Training dispatch: send this round's instructions to the clients that will finish.

The strategy's own ``configure_train`` builds the instructions (FedProx adds its mu,
FedOpt snapshots w_t) over a :class:`RoundGrid` that shows it exactly the slots this
round uses; each message carries its batch of users and their per-user settings (tier
settings from :class:`TierSettings`, injected faults from ``fault_injection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from rf2.core.config import RunConfig
from rf2.fl.params import numpy_to_record
from rf2.fl.round_grid import RoundGrid
from rf2.fl.tier_settings import TierSettings


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
        round_grid = RoundGrid(grid, slots, users, self.per_client_config_for(users, rnd),
                               self.users_per_message)
        config = ConfigRecord(
            {
                "lr": float(self.cfg.client.lr),
                "local-epochs": int(self.cfg.client.local_epochs),
                "batch-size": int(self.cfg.client.batch_size),
                "seed": int(self.cfg.seed),
                "num-rounds": int(self.cfg.num_rounds),
                # Deadlines per user inside a batch (rf2.fl.deadline); -1 = none.
                "round-timeout-s": float(self.cfg.simulation.round_timeout_s),
                "client-timeout-s": float(self.cfg.simulation.client_timeout_s or -1.0),
                "partial-sum": bool(self.partial_sums),
            }
        )
        messages = self.strategy.configure_train(
            rnd, numpy_to_record(global_arrays), config, round_grid
        )
        pairs = round_grid.exchange(list(messages), timeout=self.cfg.simulation.round_timeout_s)
        answered = {u for u, _ in pairs}
        return Exchange(pairs, [u for u in round_grid.sent_users if u not in answered])

    def per_client_config_for(self, users: list[int], rnd: int) -> dict[int, dict[str, Any]]:
        """Per-user message keys beyond the shared config (only users that have some)."""
        out: dict[int, dict[str, Any]] = {}
        for u in users:
            extra = self.tiers.client_config(u)
            for fi in self.cfg.fault_injection:
                if u in fi.users and (not fi.rounds or rnd in fi.rounds):
                    extra["inject-fault"] = fi.kind
                    extra["inject-hang-s"] = float(fi.hang_s)
            if extra:
                out[u] = extra
        return out
