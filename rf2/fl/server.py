"""The ServerApp's round loop: select -> simulate the clock -> train -> aggregate ->
evaluate -> one row in ``metrics.jsonl`` -> checkpoint.

Selection and timing are rf2's (seeded, by partition id); aggregation is the Flower
strategy's own ``configure_train``/``aggregate_train``, fed through :class:`RoundGrid`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from rf2.core.config import RunConfig
from rf2.eval.evaluation import Evaluator
from rf2.fl.params import load_numpy_into, numpy_to_record, record_to_numpy
from rf2.fl.progress import ProgressPrinter
from rf2.fl.round_grid import RoundGrid
from rf2.fl.selection import ClientSelector
from rf2.fl.tier_settings import TierSettings
from rf2.hetero.clock import SimClock, num_to_select, tier_counts
from rf2.hetero.faults import FAULT_REASONS, screen_reply
from rf2.hetero.population import Population
from rf2.optim.heterofl import aggregate_heterofl, full_spec, pad
from rf2.optim.row_averaging import aggregate_rows, item_row_params, mask_untouched, touched_rows_for
from rf2.runs.run_folder import RunFolder
from rf2.runs.tensorboard_log import TensorBoardLogger
from rf2.strategies.merge import aggregate_precomputed
from rf2.strategies.state import load_strategy_state, strategy_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsableReply:
    """A client reply that passed screening, with its arrays decoded once."""

    user: int
    message: Message
    arrays: dict[str, np.ndarray]


@dataclass
class ServerState:
    """Everything that changes round to round and must survive a resume."""

    round: int
    arrays: dict[str, np.ndarray]
    selector: ClientSelector
    clock: SimClock
    wall_offset_s: float = 0.0  # wall time spent before a resume


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
        tiers: TierSettings,
        num_slots: int,
        users_per_message: int = 1,
    ) -> None:
        self.cfg = cfg
        self.population = population
        self.num_examples = num_examples
        self.model = model
        self.strategy = strategy
        self.evaluator = evaluator
        self.folder = folder
        self.state = state
        self.tiers = tiers
        self.num_items = int(evaluator.dataset.num_items)
        self.num_slots = num_slots  # client slots (SuperNodes) the launcher provides
        self.users_per_message = users_per_message  # users batched in one message
        self.progress = ProgressPrinter(enabled=cfg.progress, total_rounds=cfg.num_rounds)
        self.tensorboard = TensorBoardLogger(folder.path) if cfg.tensorboard else None

    # -- the ServerApp main ------------------------------------------------------------
    def main(self, grid: Grid, context: Context) -> None:  # noqa: ARG002 - Flower signature
        started = time.perf_counter() - self.state.wall_offset_s
        slots = self._wait_for_slots(grid)
        if self.state.round < self.cfg.num_rounds:
            self._warm_up(grid, slots)
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
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _wait_for_slots(self, grid: Grid, timeout_s: float = 300.0) -> list[int]:
        """Flower's simulation engine registers its SuperNodes after the ServerApp starts."""
        deadline = time.monotonic() + timeout_s
        while True:
            slots = sorted(grid.get_node_ids())
            if len(slots) >= self.num_slots or time.monotonic() > deadline:
                return slots
            time.sleep(0.05)

    def _warm_up(self, grid: Grid, slots: list[int]) -> None:
        """One ``query.warmup`` message per slot: every worker loads its data up front."""
        messages = [Message(RecordDict({}), node, "query.warmup") for node in slots]
        grid.send_and_receive(messages, timeout=max(600.0, self.cfg.simulation.round_timeout_s))

    def _finish_row(self, row: dict[str, Any], started: float, round_started: float,
                    trained: int) -> None:
        now = time.perf_counter()
        row["wall_time_s"] = now - started
        row["round_wall_s"] = now - round_started
        row["sim_time_s"] = self.state.clock.now_s
        self.folder.append_metrics(row)
        if self.tensorboard is not None:
            self.tensorboard.log_row(row)
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
        bytes_down, bytes_up = self.tiers.expected_bytes(selected)
        plan = clock.plan_round(rnd, selected, self.num_examples[selected], cfg.round, k=k,
                                bytes_down=bytes_down, bytes_up=bytes_up)
        clock.advance(plan)
        row: dict[str, Any] = {"round": rnd, "num_clients_selected": int(len(selected))}
        row.update(tier_counts(plan, self.population, offline))
        completed = [int(u) for u in plan.completed]

        replies, missing = self._dispatch(grid, slots, completed, rnd)
        valid, faults = self._screen(replies, missing)
        row.update({f"fault/{reason}": int(faults[reason]) for reason in FAULT_REASONS})
        trained_users = [r.user for r in valid]
        row["num_clients_trained"] = len(trained_users)
        row["num_examples"] = int(sum(self.num_examples[u] for u in trained_users))
        row.update(self._traffic(valid))

        if len(valid) >= cfg.round.min_completed:
            arrays, metrics = self._aggregate(rnd, valid)
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
        round_grid = RoundGrid(grid, slots, users, self.per_client_config_for(users, rnd),
                               self.users_per_message)
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
        pairs = round_grid.exchange(list(messages), timeout=self.cfg.simulation.round_timeout_s)
        answered = {u for u, _ in pairs}
        missing = [u for u in round_grid.sent_users if u not in answered]
        return pairs, missing

    def _aggregate(self, rnd: int, valid: list[UsableReply]) -> tuple[Any, Any]:
        """The strategy's aggregation; HeteroFL and per-row averaging compute the mean
        themselves and hand it to the strategy (so server optimizers and q-FFL apply)."""
        replies = [r.message for r in valid]
        if not self.tiers.custom_aggregation:
            return self.strategy.aggregate_train(rnd, replies)
        g = self.state.arrays
        clients = [r.arrays for r in valid]
        weights = [float(m.content["metrics"]["num-examples"]) for m in replies]
        if self.tiers.heterofl:
            specs = [self.tiers.spec_of(r.user) or full_spec(g) for r in valid]
            return aggregate_precomputed(
                self.strategy, rnd, replies,
                mean=lambda: aggregate_heterofl(g, clients, specs, weights),
                padded=lambda: [pad(g, c, sp) for c, sp in zip(clients, specs, strict=True)],
            )
        row_params = item_row_params({k: v.shape for k, v in g.items()}, self.num_items)
        touched = [touched_rows_for(np.asarray(m.content["rf2"]["touched-items"], dtype=np.int64),
                                    row_params) for m in replies]
        return aggregate_precomputed(
            self.strategy, rnd, replies,
            mean=lambda: aggregate_rows(g, clients, touched, weights),
            padded=lambda: [mask_untouched(g, c, t) for c, t in zip(clients, touched, strict=True)],
        )

    def per_client_config_for(self, users: list[int], rnd: int) -> dict[int, dict[str, Any]]:
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

    def _screen(
        self, replies: list[tuple[int, Message]], missing: list[int]
    ) -> tuple[list[UsableReply], Counter[str]]:
        faults: Counter[str] = Counter()
        faults["timeout"] += len(missing)
        valid = []
        for user, reply in sorted(replies, key=lambda p: p[0]):
            if reply.has_error():
                faults["client_error"] += 1
                log.warning("client %d failed in round %s: %s", user,
                            reply.metadata.group_id or "?", reply.error.reason)
                continue
            reference = self.tiers.reference_arrays(user, self.state.arrays)
            arrays = record_to_numpy(reply.content["arrays"])
            reason = screen_reply(arrays, reference)
            if reason is not None:
                faults[reason] += 1
                continue
            valid.append(UsableReply(user, reply, arrays))
        return valid, faults

    def _traffic(self, valid: list[UsableReply]) -> dict[str, float]:
        """Per tier: clients trained, examples, share of examples, bytes down and up."""
        names = self.population.tier_names
        out: dict[str, float] = {}
        for name in names:
            for what in ("trained", "examples", "bytes_down", "bytes_up"):
                out[f"tier/{name}/{what}"] = 0
        for r in valid:
            tier = self.tiers.tier_of(r.user)
            t = names[tier]
            out[f"tier/{t}/trained"] += 1
            out[f"tier/{t}/examples"] += int(self.num_examples[r.user])
            out[f"tier/{t}/bytes_down"] += int(self.tiers.bytes_down[tier])
            out[f"tier/{t}/bytes_up"] += int(r.message.content["metrics"]["bytes-up"])
        total = sum(out[f"tier/{n}/examples"] for n in names) or 1
        for name in names:
            out[f"tier/{name}/examples_share"] = out[f"tier/{name}/examples"] / total
        out["bytes_up"] = sum(out[f"tier/{n}/bytes_up"] for n in names)
        out["bytes_down"] = sum(out[f"tier/{n}/bytes_down"] for n in names)
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
