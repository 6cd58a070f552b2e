"""The ServerApp's round loop.

One round reads as the data flow: select clients -> the simulated clock decides who
finishes -> only those train -> screen their replies -> aggregate -> evaluate -> one row
in ``metrics.jsonl`` -> checkpoint. Each step past the clock is a named collaborator in
its own module: :class:`TrainDispatcher` (``dispatch``), :class:`ReplyScreen`
(``screening``), :class:`TrafficMeter` (``traffic``), :class:`Aggregator`
(``aggregation``), :class:`Checkpointer` (``checkpointing``).

Selection and timing are rf2's (seeded, by partition id); aggregation is the Flower
strategy's own ``configure_train``/``aggregate_train``, fed through :class:`RoundGrid`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from rf2.core.config import RunConfig
from rf2.eval.evaluation import Evaluator
from rf2.fl.aggregation import Aggregator
from rf2.fl.buffered import BufferedRounds
from rf2.fl.checkpointing import Checkpointer, ServerState
from rf2.fl.dispatch import TrainDispatcher
from rf2.fl.download import DownloadSizes
from rf2.fl.interrupt import STOP, RunInterrupted, register_server_thread, stop_requested
from rf2.fl.params import load_numpy_into
from rf2.fl.participation import Participation
from rf2.fl.private_aggregation import PrivateAggregator
from rf2.fl.progress import ProgressPrinter
from rf2.fl.screening import ReplyScreen, Screened
from rf2.fl.tier_settings import TierSettings
from rf2.fl.traffic import TrafficMeter
from rf2.fl.user_state import UserStateStore
from rf2.hetero.clock import RoundPlan, num_to_select, tier_counts
from rf2.model.base import FederatedModel
from rf2.privacy.plan import PrivacyPlan
from rf2.runs.run_folder import RunFolder
from rf2.runs.tensorboard_log import TensorBoardLogger


@dataclass(frozen=True)
class ServerSetup:
    """What the server is built from (fixed for the run)."""

    cfg: RunConfig
    num_examples: np.ndarray  # (num_users,) local training examples per user
    model: FederatedModel  # holds w_t for evaluation
    strategy: Strategy
    evaluator: Evaluator
    folder: RunFolder
    tiers: TierSettings  # per-tier client settings; its population gives the tiers
    num_slots: int  # client slots (SuperNodes) the launcher provides
    users_per_message: int = 1  # users batched in one message
    privacy: PrivacyPlan | None = None  # privacy=dp: resolved settings
    # A model with per-user state: the store its clients keep their rows in.
    user_state: UserStateStore | None = None


class FederatedServer:
    def __init__(self, setup: ServerSetup, state: ServerState) -> None:
        cfg = setup.cfg
        self.setup = setup
        self.cfg = cfg
        self.state = state
        population = setup.tiers.population
        if state.participation is None:
            state.participation = Participation(int(population.tier_of_user.size))
        self.aggregator = Aggregator(setup.strategy, setup.tiers,
                                     int(setup.evaluator.dataset.num_items))
        self.private: PrivateAggregator | None = None
        if setup.privacy is not None:
            self.private = PrivateAggregator(setup.privacy, setup.strategy, cfg.seed)
            if state.privacy is not None:
                self.private.load_state_dict(state.privacy)
        # Partial sums only where the aggregate is a plain weighted mean of deltas (DP
        # clips each client's update, FedBuff rebases each stale one: they need them one
        # by one).
        fedbuff = cfg.strategy.name == "fedbuff"
        self.dispatcher = TrainDispatcher(
            cfg, setup.strategy, setup.tiers, setup.users_per_message,
            partial_sums=(cfg.simulation.partial_aggregation and self.private is None
                          and not fedbuff and self.aggregator.accepts_sums()))
        self.screen = ReplyScreen(setup.tiers)
        self.buffered: BufferedRounds | None = None
        if fedbuff:
            self.buffered = BufferedRounds(cfg, setup.tiers, setup.num_examples,
                                           self.dispatcher, self.screen)
            if state.buffered is not None:
                self.buffered.load(state.buffered, state.buffered_arrays or {})
        self.traffic = TrafficMeter(setup.tiers, setup.num_examples)
        self.downloads = DownloadSizes(setup.model, setup.evaluator.dataset, setup.tiers,
                                       cfg.seed, cfg.num_rounds, cfg.simulation.sparse_updates)
        self._bytes_down: dict[int, float] = {}  # this round's download per selected user
        self.checkpointer = Checkpointer(setup.folder, setup.strategy, cfg.checkpoint_every,
                                         cfg.num_rounds)
        self.progress = ProgressPrinter(enabled=cfg.progress, total_rounds=cfg.num_rounds)
        self.tensorboard = TensorBoardLogger(setup.folder.path) if cfg.tensorboard else None

    # -- the ServerApp main ------------------------------------------------------------
    def main(self, grid: Grid, context: Context) -> None:  # noqa: ARG002 - Flower signature
        register_server_thread()  # Ctrl-C abandons a round by interrupting this thread
        try:
            self._rounds(grid)
        except RunInterrupted:
            # Ctrl-C and the round in flight did not end in time: it is dropped (nothing
            # of it was written); return normally so the launcher shuts down at once.
            STOP.requested.set()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _rounds(self, grid: Grid) -> None:
        started = time.perf_counter() - self.state.wall_offset_s
        slots = self._wait_for_slots(grid)
        if self.state.round < self.cfg.num_rounds:
            self._warm_up(grid, slots)
        if self.state.round == 0:
            # Round 0 is the evaluation of the initial model: its time is round time,
            # not start-up.
            round_started = time.perf_counter()
            row: dict[str, Any] = {"round": 0, "num_clients_selected": 0, "num_clients_trained": 0,
                   "num_examples": 0, "skipped": 0, "pass": 0, "pass_end": 0,
                   **self.evaluate(popularity=True)}
            self._finish_row(row, started, round_started, trained=0)
        for rnd in range(self.state.round + 1, self.cfg.num_rounds + 1):
            if self.passes_done():
                break
            round_started = time.perf_counter()
            row = self.run_round(grid, slots, rnd)
            self._finish_row(row, started, round_started, trained=row["num_clients_trained"])
            self.state.round = rnd
            stopping = (stop_requested() and rnd < self.cfg.num_rounds
                        and not self.passes_done())
            if self.checkpointer.due(rnd) or self.passes_done() or stopping:
                # Ctrl-C: checkpoint this round too, so no completed round is lost.
                self.state.wall_offset_s = time.perf_counter() - started
                if self.private is not None:
                    self.state.privacy = self.private.state_dict()
                if self.buffered is not None:
                    self.state.buffered, self.state.buffered_arrays = self.buffered.state()
                if self.setup.user_state is not None:
                    self.state.user_state = self.setup.user_state.tables()
                self.checkpointer.save(self.state)
            if stopping:
                return

    def _wait_for_slots(self, grid: Grid, timeout_s: float = 300.0) -> list[int]:
        """Flower's simulation engine registers its SuperNodes after the ServerApp starts."""
        deadline = time.monotonic() + timeout_s
        while True:
            slots = sorted(grid.get_node_ids())
            if len(slots) >= self.setup.num_slots or time.monotonic() > deadline:
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
        self.setup.folder.append_metrics(row)
        if self.tensorboard is not None:
            self.tensorboard.log_row(row)
        self.progress.round_done(int(row["round"]), row.get("recall@20"), row["wall_time_s"],
                                 trained)

    # -- one round ---------------------------------------------------------------------
    def run_round(self, grid: Grid, slots: list[int], rnd: int) -> dict[str, Any]:
        if self.buffered is not None:
            return self._run_buffered_step(grid, slots, rnd)
        passes_before = self.state.selector.passes_completed
        plan, offline = self._select_and_time(rnd)
        passes = self.state.selector.passes_completed
        # pass = passes over the eligible clients completed by the end of this round.
        row: dict[str, Any] = {"round": rnd, "num_clients_selected": int(len(plan.selected)),
                               "pass": passes, "pass_end": int(passes > passes_before)}
        row.update(tier_counts(plan, self.setup.tiers.population, offline))

        exchange = self.dispatcher.train(grid, slots, [int(u) for u in plan.completed], rnd,
                                         self.state.arrays)
        screened = self.screen.screen(exchange.replies, exchange.missing, self.state.arrays)
        usable = screened.usable
        row.update(screened.fault_row())
        return self._aggregate_and_evaluate(rnd, row, usable, plan.selected)

    def _run_buffered_step(self, grid: Grid, slots: list[int], rnd: int) -> dict[str, Any]:
        """strategy=fedbuff: one server step (rf2.fl.buffered)."""
        buffered = self.buffered
        assert buffered is not None
        passes_before = self.state.selector.passes_completed
        step = buffered.step(grid, slots, rnd, self.state.selector, self.state.clock,
                             self.state.arrays, self.downloads.for_users)
        self._bytes_down = step.bytes_down
        passes = self.state.selector.passes_completed
        row: dict[str, Any] = {"round": rnd, "num_clients_selected": int(step.started.size),
                               "pass": passes, "pass_end": int(passes > passes_before)}
        population = self.setup.tiers.population
        row.update(buffered.row(step, list(population.tier_names), self.setup.tiers.tier_of))
        faults = Screened([], Counter()).fault_row()  # every reason, zeros included
        for screened in step.screened:
            for key, value in screened.fault_row().items():
                faults[key] += value
        row.update(faults)
        strategy = self.setup.strategy
        if hasattr(strategy, "current_arrays"):
            # FedOpt keeps w_t from its last configure_train, which may have been an older
            # version's batch: its pseudo-gradient must be against the current model.
            strategy.current_arrays = dict(self.state.arrays)
        before = self.state.arrays
        row = self._aggregate_and_evaluate(rnd, row, step.usable, step.started)
        buffered.stepped(None if self.state.arrays is before else self.state.arrays, before)
        return row

    def _aggregate_and_evaluate(self, rnd: int, row: dict[str, Any], usable: list[Any],
                                selected: np.ndarray) -> dict[str, Any]:
        cfg = self.cfg
        row["num_clients_trained"] = len(usable)
        row["num_examples"] = int(sum(self.setup.num_examples[r.user] for r in usable))
        participation = self.state.participation
        assert participation is not None  # sized in __init__
        participation.record(selected, [r.user for r in usable])
        if self.cfg.eval.distributions:
            population = self.setup.tiers.population
            tiered = len(population.tier_names) > 1  # one tier would repeat the overall
            row.update(participation.row(population.tier_of_user if tiered else None,
                                         population.tier_names))
        row.update(self.traffic.row(usable, self._bytes_down))

        if len(usable) >= cfg.round.min_completed:
            if self.private is not None:
                arrays, metrics, dp_row = self.private.aggregate(
                    rnd, self.state.arrays, usable, len(selected))
                row.update(dp_row)
            else:
                arrays, metrics = self.aggregator.aggregate(rnd, self.state.arrays, usable)
            if arrays is not None:
                self.state.arrays = arrays
            if metrics is not None:
                row.update({f"train/{k}": float(v) for k, v in metrics.items()
                            if k in ("train_loss", "loss_after")})
            row["skipped"] = 0
        else:
            row["skipped"] = 1
            row["skipped_reason"] = (
                f"{len(usable)} usable replies < round.min_completed={cfg.round.min_completed}"
            )
        if self.private is not None:
            row.update(self.private.row())
        at_pass = row["pass_end"] and (cfg.eval.at_pass_end or self.passes_done())
        last = rnd == cfg.num_rounds or self.passes_done()
        if rnd % cfg.eval.every == 0 or last or at_pass:
            row.update(self.evaluate(final=last))
        return row

    def passes_done(self) -> bool:
        """``num_passes`` reached: the run ends (num_rounds is only an upper bound)."""
        n = self.cfg.num_passes
        return bool(n) and self.state.selector.passes_completed >= n

    def _select_and_time(self, rnd: int) -> tuple[RoundPlan, np.ndarray]:
        """Select clients, then let the simulated clock decide who finishes in time.

        Returns the clock's plan and the offline users met while selecting.
        """
        cfg = self.cfg
        k = cfg.clients_per_round
        clock = self.state.clock
        # RF²'s "over-select then drop the slowest" and FedScale's over-commitment are the
        # same mechanism: select ceil((1 + x) K), keep the K that finish first.
        n_select = num_to_select(k, cfg.round.overcommit + cfg.optimization.overselect)
        selected, offline = self.state.selector.select(n_select, clock.online_fn(rnd, cfg.round))
        _, bytes_up = self.setup.tiers.expected_bytes(selected)
        bytes_down = self.downloads.for_users(selected, rnd)
        self._bytes_down = dict(zip(np.asarray(selected).tolist(), bytes_down.tolist(),
                                    strict=True))
        plan = clock.plan_round(rnd, selected, self.setup.num_examples[selected], cfg.round, k=k,
                                bytes_down=bytes_down, bytes_up=bytes_up)
        clock.advance(plan)
        return plan, offline

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, popularity: bool = False, final: bool = False) -> dict[str, float]:
        """The global model's metrics (and at round 0 the popularity baseline), with
        ``eval_wall_s``: the wall time they took. ``final``: the run's last evaluation
        (``eval.final_max_users``)."""
        started = time.perf_counter()
        load_numpy_into(self.setup.model, self.state.arrays)
        if self.setup.user_state is not None:
            self.setup.user_state.load_into(self.setup.model)  # each user's own rows
        evaluator = self.setup.evaluator.final() if final else self.setup.evaluator
        row = evaluator.evaluate_model(self.setup.model)
        if popularity:
            row.update(self.setup.evaluator.evaluate_popularity())
        row["eval_wall_s"] = time.perf_counter() - started
        return row
