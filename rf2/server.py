"""The ServerApp's round loop: select -> simulate the clock -> train -> aggregate ->
evaluate -> one row in ``metrics.jsonl`` -> checkpoint.

Selection and timing are rf2's (seeded, by partition id); aggregation is the Flower
strategy's own ``configure_train``/``aggregate_train``, fed through :class:`RoundGrid`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from rf2.clock import SimClock, num_to_select, tier_counts
from rf2.config import RunConfig
from rf2.evaluation import Evaluator
from rf2.faults import screen_reply
from rf2.params import load_numpy_into, numpy_to_record, record_to_numpy
from rf2.population import Population
from rf2.progress import ProgressPrinter
from rf2.round_grid import RoundGrid
from rf2.run_folder import RunFolder
from rf2.selection import ClientSelector
from rf2.strategies.state import load_strategy_state, strategy_state


@dataclass
class ServerState:
    """Everything that changes round to round and must survive a resume."""

    round: int
    arrays: dict[str, np.ndarray]
    selector: ClientSelector
    clock: SimClock
    wall_offset_s: float = 0.0  # wall time spent before a resume
    extra: dict[str, Any] = field(default_factory=dict)


class FederatedServer:
    def __init__(
        self,
        cfg: RunConfig,
        population: Population,
        num_examples: np.ndarray,  # (num_users,) local training examples per user
        model: torch.nn.Module,
        strategy: Strategy,
        evaluator: Evaluator,
        folder: RunFolder,
        state: ServerState,
        per_client_config: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.population = population
        self.num_examples = num_examples
        self.model = model
        self.strategy = strategy
        self.evaluator = evaluator
        self.folder = folder
        self.state = state
        self.per_client_config = per_client_config or {}
        self.num_slots = 1  # client slots (SuperNodes) the launcher provides
        self.progress = ProgressPrinter(enabled=cfg.progress, total_rounds=cfg.num_rounds)
        self.bytes_down = int(sum(a.nbytes for a in state.arrays.values()))

    # -- the ServerApp main ------------------------------------------------------------
    def main(self, grid: Grid, context: Context) -> None:  # noqa: ARG002 - Flower signature
        started = time.perf_counter() - self.state.wall_offset_s
        slots = self._wait_for_slots(grid)
        if self.state.round == 0:
            row = {"round": 0, "num_clients_selected": 0, "num_clients_trained": 0,
                   "num_examples": 0, "skipped": 0, **self.evaluate()}
            row.update(self.evaluator.evaluate_popularity())
            self._finish_row(row, started, round_started=time.perf_counter(), trained=0)
        for rnd in range(self.state.round + 1, self.cfg.num_rounds + 1):
            round_started = time.perf_counter()
            row = self.run_round(grid, slots, rnd)
            self._finish_row(row, started, round_started, trained=row["num_clients_trained"])
            self.state.round = rnd
            every = self.cfg.checkpoint_every
            if (every and rnd % every == 0) or rnd == self.cfg.num_rounds:
                self.state.wall_offset_s = time.perf_counter() - started
                self.checkpoint()

    def _wait_for_slots(self, grid: Grid, timeout_s: float = 300.0) -> list[int]:
        """Flower's simulation engine registers its SuperNodes after the ServerApp starts."""
        deadline = time.monotonic() + timeout_s
        while True:
            slots = sorted(grid.get_node_ids())
            if len(slots) >= self.num_slots or time.monotonic() > deadline:
                return slots
            time.sleep(0.05)

    def _finish_row(self, row: dict[str, Any], started: float, round_started: float,
                    trained: int) -> None:
        now = time.perf_counter()
        row["wall_time_s"] = now - started
        row["round_wall_s"] = now - round_started
        row["sim_time_s"] = self.state.clock.now_s
        self.folder.append_metrics(row)
        self.progress.round_done(int(row["round"]), row.get("recall@20"), row["wall_time_s"],
                                 trained)

    # -- one round ---------------------------------------------------------------------
    def run_round(self, grid: Grid, slots: list[int], rnd: int) -> dict[str, Any]:
        cfg = self.cfg
        k = cfg.clients_per_round
        clock = self.state.clock
        # RF²'s "over-select then drop the slowest" and FedScale's over-commitment are the
        # same mechanism: select ceil((1 + x) K), keep the K that finish first.
        n_select = num_to_select(k, cfg.round.overcommit + cfg.optimization.overselect)
        selected, offline = self.state.selector.select(n_select, clock.online_fn(rnd, cfg.round))
        plan = clock.plan_round(rnd, selected, self.num_examples[selected], cfg.round, k=k)
        clock.advance(plan)
        row: dict[str, Any] = {"round": rnd, "num_clients_selected": int(len(selected))}
        row.update(tier_counts(plan, self.population, offline))
        completed = [int(u) for u in plan.completed]

        replies, missing = self._dispatch(grid, slots, completed, rnd)
        valid, faults = self._screen(replies, missing)
        row.update({f"fault/{reason}": n for reason, n in sorted(faults.items())})
        trained_users = [int(u) for u, _ in valid]
        row["num_clients_trained"] = len(trained_users)
        row["num_examples"] = int(sum(self.num_examples[u] for u in trained_users))
        row.update(self._traffic(trained_users))

        if len(valid) >= cfg.round.min_completed:
            arrays, metrics = self.strategy.aggregate_train(rnd, [m for _, m in valid])
            if arrays is not None:
                self.state.arrays = record_to_numpy(arrays)
            if metrics is not None:
                row.update({f"train/{k}": float(v) for k, v in metrics.items()
                            if k in ("train_loss", "loss_after")})
            row["skipped"] = 0
        else:
            row["skipped"] = 1
            row["skipped_reason"] = (
                f"{len(valid)} usable replies < round.min_completed={cfg.round.min_completed}"
            )
        every = cfg.eval.every
        if rnd % every == 0 or rnd == cfg.num_rounds:
            row.update(self.evaluate())
        return row

    def _dispatch(
        self, grid: Grid, slots: list[int], users: list[int], rnd: int
    ) -> tuple[list[tuple[int, Message]], list[int]]:
        if not users:
            return [], []
        round_grid = RoundGrid(grid, slots, users, self.per_client_config_for(users, rnd))
        config = ConfigRecord(
            {
                "lr": float(self.cfg.client.lr),
                "local-epochs": int(self.cfg.client.local_epochs),
                "batch-size": int(self.cfg.client.batch_size),
                "seed": int(self.cfg.seed),
                "num-rounds": int(self.cfg.num_rounds),
            }
        )
        messages = self.strategy.configure_train(
            rnd, numpy_to_record(self.state.arrays), config, round_grid
        )
        replies = round_grid.send_and_receive(
            list(messages), timeout=self.cfg.simulation.round_timeout_s
        )
        pairs = [(round_grid.user_of(r), r) for r in replies]
        answered = {u for u, _ in pairs}
        missing = [u for u in round_grid.sent_users if u not in answered]
        return pairs, missing

    def per_client_config_for(self, users: list[int], rnd: int) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for u in users:
            extra = dict(self.per_client_config.get(u, {}))
            fi = self.cfg.fault_injection
            if fi.kind != "none" and u in fi.users and (not fi.rounds or rnd in fi.rounds):
                extra["inject-fault"] = fi.kind
                extra["inject-hang-s"] = float(fi.hang_s)
            if extra:
                out[u] = extra
        return out

    def _screen(
        self, replies: list[tuple[int, Message]], missing: list[int]
    ) -> tuple[list[tuple[int, Message]], Counter[str]]:
        faults: Counter[str] = Counter()
        faults["timeout"] += len(missing)
        valid = []
        for user, reply in sorted(replies, key=lambda p: p[0]):
            if reply.has_error():
                faults["client_error"] += 1
                continue
            reason = screen_reply(record_to_numpy(reply.content["arrays"]), self.state.arrays)
            if reason is not None:
                faults[reason] += 1
                continue
            valid.append((user, reply))
        return valid, faults

    def _traffic(self, trained: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        names = self.population.tier_names
        for t, name in enumerate(names):
            n = sum(1 for u in trained if self.population.tier_of_user[u] == t)
            out[f"tier/{name}/bytes_down"] = n * self.bytes_down
            out[f"tier/{name}/bytes_up"] = n * self.bytes_down
            ex = sum(int(self.num_examples[u]) for u in trained
                     if self.population.tier_of_user[u] == t)
            out[f"tier/{name}/examples"] = ex
        total = sum(out[f"tier/{n}/examples"] for n in names) or 1
        for name in names:
            out[f"tier/{name}/examples_share"] = out[f"tier/{name}/examples"] / total
        return out

    # -- evaluation & checkpoints ------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        load_numpy_into(self.model, self.state.arrays)
        return self.evaluator.evaluate_model(self.model)

    def checkpoint(self) -> None:
        state = {
            "round": self.state.round,
            "selector": self.state.selector.state_dict(),
            "clock": self.state.clock.state_dict(),
            "wall_offset_s": self.state.wall_offset_s,
            "strategy": strategy_state(self.strategy)[0],
        }
        arrays = {f"model/{k}": v for k, v in self.state.arrays.items()}
        for k, v in strategy_state(self.strategy)[1].items():
            arrays[f"strategy/{k}"] = v
        self.folder.save_checkpoint(self.state.round, arrays, state)


def restore_state(
    checkpoint: tuple[int, dict[str, np.ndarray], dict[str, Any]],
    selector: ClientSelector,
    clock: SimClock,
    strategy: Strategy,
) -> ServerState:
    round_, arrays, state = checkpoint
    selector.load_state_dict(state["selector"])
    clock.load_state_dict(state["clock"])
    model = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    strat = {k[len("strategy/"):]: v for k, v in arrays.items() if k.startswith("strategy/")}
    load_strategy_state(strategy, state["strategy"], strat)
    return ServerState(round=round_, arrays=model, selector=selector, clock=clock,
                       wall_offset_s=float(state.get("wall_offset_s", 0.0)))
