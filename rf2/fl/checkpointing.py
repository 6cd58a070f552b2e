"""The server's resumable state and its checkpoints in the run folder.

A checkpoint is the global model (``model/<name>`` arrays), the strategy's own state
(server-optimizer moments, ``strategy/<name>``), a stateful model's per-user tables
(``user_state/<name>``, ``rf2.fl.user_state``), and a JSON part: the round, the client
selector's and the simulated clock's RNG state, and the wall time spent so far. Restoring
it and running on gives the same ``metrics.jsonl`` as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from rf2.fl.participation import Participation
from rf2.fl.selection import ClientSelector
from rf2.hetero.clock import SimClock
from rf2.runs.run_folder import Checkpoint, RunFolder
from rf2.strategies.state import load_strategy_state, strategy_state


@dataclass
class ServerState:
    """Everything that changes round to round and must survive a resume."""

    round: int
    arrays: dict[str, np.ndarray]  # the global model, by parameter name
    selector: ClientSelector
    clock: SimClock
    wall_offset_s: float = 0.0  # wall time spent before a resume
    # Per-user selection/training counts (None until the server sizes them).
    participation: Participation | None = None
    # privacy=dp: the accountant's ledger and the adaptive clip norm (JSON-able).
    privacy: dict[str, Any] | None = None
    # strategy=fedbuff: the schedule (JSON-able) and the model versions still in flight.
    buffered: dict[str, Any] | None = None
    buffered_arrays: dict[str, np.ndarray] | None = None
    # A model with per-user state: the stored per-user tables (rf2.fl.user_state).
    user_state: dict[str, np.ndarray] | None = None


class Checkpointer:
    def __init__(self, folder: RunFolder, strategy: Strategy, every: int, num_rounds: int
                 ) -> None:
        self.folder = folder
        self.strategy = strategy
        self.every = every  # 0: only after the last round
        self.num_rounds = num_rounds

    def due(self, rnd: int) -> bool:
        return bool(self.every and rnd % self.every == 0) or rnd == self.num_rounds

    def save(self, state: ServerState) -> None:
        meta, strategy_arrays = strategy_state(self.strategy)
        json_part = {
            "round": state.round,
            "selector": state.selector.state_dict(),
            "clock": state.clock.state_dict(),
            "wall_offset_s": state.wall_offset_s,
            "strategy": meta,
        }
        if state.privacy is not None:
            json_part["privacy"] = state.privacy
        if state.buffered is not None:
            json_part["buffered"] = state.buffered
        arrays = {f"model/{k}": v for k, v in state.arrays.items()}
        for k, v in strategy_arrays.items():
            arrays[f"strategy/{k}"] = v
        if state.participation is not None:
            for k, v in state.participation.arrays().items():
                arrays[f"participation/{k}"] = v
        for k, v in (state.buffered_arrays or {}).items():
            arrays[f"buffered/{k}"] = v
        for k, v in (state.user_state or {}).items():
            arrays[f"user_state/{k}"] = v
        self.folder.save_checkpoint(state.round, arrays, json_part)


def restore_state(
    checkpoint: Checkpoint,
    selector: ClientSelector,
    clock: SimClock,
    strategy: Strategy,
) -> ServerState:
    """Load a checkpoint into ``selector``, ``clock`` and ``strategy``; return the state."""
    round_, arrays, state = checkpoint.round, checkpoint.arrays, checkpoint.state
    selector.load_state_dict(state["selector"])
    clock.load_state_dict(state["clock"])
    model = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    strat = {k[len("strategy/"):]: v for k, v in arrays.items() if k.startswith("strategy/")}
    load_strategy_state(strategy, state["strategy"], strat)
    counts = {k[len("participation/"):]: v for k, v in arrays.items()
              if k.startswith("participation/")}
    participation = None
    if counts:  # checkpoints from before participation counting have none
        participation = Participation(int(np.asarray(counts["selected"]).size))
        participation.load(counts)
    return ServerState(round=round_, arrays=model, selector=selector, clock=clock,
                       wall_offset_s=float(state.get("wall_offset_s", 0.0)),
                       participation=participation, privacy=state.get("privacy"),
                       buffered=state.get("buffered"),
                       buffered_arrays={k[len("buffered/"):]: v for k, v in arrays.items()
                                        if k.startswith("buffered/")},
                       user_state={k[len("user_state/"):]: v for k, v in arrays.items()
                                   if k.startswith("user_state/")} or None)
