"""What a client is told to do for one user in one round, typed, and its one wire codec.

Two frozen dataclasses, validated at construction:

* :class:`RoundRecipe`: the local-training recipe every user of a message shares (one
  copy in the message's ``config`` record, which the strategy's ``configure_train``
  also writes: Flower's strategies add the round, FedProx its mu);
* :class:`UserTask`: the one user's own instructions, built per user by the server (tier
  settings from ``TierSettings.task_for``, injected faults from ``fault_injection``);
  every field's default means "no override".

Flower messages carry records, so both travel as ConfigRecord keys; this module is the
only place that knows them (``recipe_record``/``read_recipe``, ``task_record``/
``read_task``). A record a reader cannot make sense of raises :class:`MalformedTask`
naming the key (or, built in Python, the field) and what it must hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from flwr.app import ConfigRecord

FaultKind = Literal["raise", "nan", "shape", "hang"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


class MalformedTask(ValueError):  # noqa: N818 - reads as what the record is
    """A task record (or a task's field) holds something a client cannot act on."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:  # noqa: ANN401
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"malformed user task: {key}={value!r}; allowed: {allowed}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:  # noqa: ANN401
    if not ok:
        raise MalformedTask(key, value, allowed)


@dataclass(frozen=True)
class RoundRecipe:
    """Local training shared by every user of one message (the message's config)."""

    server_round: int
    lr: float  # client SGD learning rate
    local_epochs: int
    batch_size: int  # 0 = full batch
    seed: int = 0  # the run's seed; each user's own seed derives from it (training_seed)
    num_rounds: int = 1  # for schedules that follow training progress
    proximal_mu: float = 0.0  # FedProx's mu (set by the strategy); 0 = no proximal term
    # Deadlines inside a batch message (rf2.fl.deadline); None = none.
    round_timeout_s: float | None = None
    client_timeout_s: float | None = None
    # The server takes one sum per message for users without a per-client transform
    # (rf2.fl.partial_sum).
    partial_sums: bool = False

    def __post_init__(self) -> None:
        _check(self.server_round >= 0, "server_round", self.server_round, "an integer >= 0")
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        _check(self.local_epochs >= 1, "local_epochs", self.local_epochs, "an integer >= 1")
        _check(self.batch_size >= 0, "batch_size", self.batch_size, "an integer >= 0")
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(self.num_rounds >= 1, "num_rounds", self.num_rounds, "an integer >= 1")
        _check(math.isfinite(self.proximal_mu) and self.proximal_mu >= 0, "proximal_mu",
               self.proximal_mu, "a finite number >= 0")
        for name, value in (("round_timeout_s", self.round_timeout_s),
                            ("client_timeout_s", self.client_timeout_s)):
            _check(value is None or value > 0, name, value, "none or a number > 0")


@dataclass(frozen=True)
class UserTask:
    """One user's own instructions for this round; each default means "no override"."""

    user: int  # the partition id: whose data the client trains on
    width: float = 1.0  # HeteroFL sub-model width; 1 = the full model
    prune_rate: float | None = None  # top-k pruning of the update; None = none
    quant_bits: int | None = None  # stochastic quantisation of the update; None = none
    report_touched: bool = False  # reply the item rows its data touched (per-row averaging)
    fault: FaultKind | None = None  # injected fault (rf2.hetero.faults); None = none
    hang_s: float = 30.0  # fault "hang": seconds the client sleeps

    def __post_init__(self) -> None:
        _check(self.user >= 0, "user", self.user, "an integer >= 0")
        _check(0 < self.width <= 1, "width", self.width, "a fraction in (0, 1]")
        _check(self.prune_rate is None or 0 <= self.prune_rate < 1, "prune_rate",
               self.prune_rate, "none or a fraction in [0, 1)")
        _check(self.quant_bits is None or 1 <= self.quant_bits <= 32, "quant_bits",
               self.quant_bits, "none or an integer in [1, 32]")
        _check(self.fault is None or self.fault in FAULT_KINDS, "fault", self.fault,
               f"none or one of {', '.join(FAULT_KINDS)}")
        _check(self.hang_s > 0, "hang_s", self.hang_s, "a number > 0")

    @property
    def replies_alone(self) -> bool:
        """True when this user's reply cannot go into its message's sum: its update is
        transformed per client (a HeteroFL width, compression, an injected fault) or it
        reports its touched rows."""
        return (self.width < 1 or self.prune_rate is not None or self.quant_bits is not None
                or self.report_touched or self.fault is not None)


# The wire keys. "server-round" and "proximal-mu" are Flower's own (its strategies'
# configure_train writes them into the shared config).
_ROUND, _MU = "server-round", "proximal-mu"
_LR, _EPOCHS, _BATCH, _SEED, _ROUNDS = "lr", "local-epochs", "batch-size", "seed", "num-rounds"
_ROUND_TIMEOUT, _CLIENT_TIMEOUT, _PARTIAL = "round-timeout-s", "client-timeout-s", "partial-sum"
_USER, _WIDTH, _PRUNE, _BITS = "partition-id", "width", "prune-rate", "quant-bits"
_TOUCHED, _FAULT, _HANG = "report-touched", "inject-fault", "inject-hang-s"
_TASK_KEYS = (_USER, _WIDTH, _PRUNE, _BITS, _TOUCHED, _FAULT, _HANG)
_NO_TIMEOUT = -1.0  # a deadline that is not set travels as -1


def recipe_record(recipe: RoundRecipe) -> ConfigRecord:
    """The shared config record of a round's training messages."""
    record = ConfigRecord({
        _ROUND: recipe.server_round,
        _LR: float(recipe.lr),
        _EPOCHS: int(recipe.local_epochs),
        _BATCH: int(recipe.batch_size),
        _SEED: int(recipe.seed),
        _ROUNDS: int(recipe.num_rounds),
        _ROUND_TIMEOUT: _NO_TIMEOUT if recipe.round_timeout_s is None
        else float(recipe.round_timeout_s),
        _CLIENT_TIMEOUT: _NO_TIMEOUT if recipe.client_timeout_s is None
        else float(recipe.client_timeout_s),
        _PARTIAL: bool(recipe.partial_sums),
    })
    if recipe.proximal_mu:  # else left to the strategy (FedProx writes its own)
        record[_MU] = float(recipe.proximal_mu)
    return record


def read_recipe(record: Mapping[str, Any]) -> RoundRecipe:
    """The recipe in a message's shared config (keys other strategies add are ignored)."""
    return RoundRecipe(
        server_round=_read(record, _ROUND, int),
        lr=_read(record, _LR, float),
        local_epochs=_read(record, _EPOCHS, int),
        batch_size=_read(record, _BATCH, int),
        seed=_read(record, _SEED, int),
        num_rounds=_read(record, _ROUNDS, int),
        proximal_mu=_read(record, _MU, float, 0.0),
        round_timeout_s=_timeout(_read(record, _ROUND_TIMEOUT, float, _NO_TIMEOUT)),
        client_timeout_s=_timeout(_read(record, _CLIENT_TIMEOUT, float, _NO_TIMEOUT)),
        partial_sums=_read(record, _PARTIAL, bool, False),
    )


def task_record(task: UserTask) -> ConfigRecord:
    """One user's record: its partition id and only the fields it overrides."""
    record = ConfigRecord({_USER: int(task.user)})
    if task.width < 1:
        record[_WIDTH] = float(task.width)
    if task.prune_rate is not None:
        record[_PRUNE] = float(task.prune_rate)
    if task.quant_bits is not None:
        record[_BITS] = int(task.quant_bits)
    if task.report_touched:
        record[_TOUCHED] = True
    if task.fault is not None:
        record[_FAULT] = str(task.fault)
        record[_HANG] = float(task.hang_s)
    return record


def read_task(record: Mapping[str, Any]) -> UserTask:
    """The user task in a user's record; an unknown key is an error, not ignored."""
    unknown = sorted(set(record) - set(_TASK_KEYS))
    _check(not unknown, ", ".join(unknown), {k: record[k] for k in unknown},
           f"only the keys {', '.join(_TASK_KEYS)}")
    prune = _read(record, _PRUNE, float, None)
    bits = _read(record, _BITS, int, None)
    fault = _read(record, _FAULT, str, None)
    return UserTask(
        user=_read(record, _USER, int),
        width=_read(record, _WIDTH, float, 1.0),
        prune_rate=prune,
        quant_bits=bits,
        report_touched=_read(record, _TOUCHED, bool, False),
        fault=fault,  # checked against FAULT_KINDS on construction
        hang_s=_read(record, _HANG, float, UserTask.hang_s),
    )


_REQUIRED = object()
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _read(record: Mapping[str, Any], key: str, kind: type,
          default: Any = _REQUIRED) -> Any:  # noqa: ANN401
    """``record[key]`` as ``kind``; ``default`` when absent (required when not given)."""
    if key not in record:
        _check(default is not _REQUIRED, key, None, f"{_TYPE_NAMES[kind]} (the key is required)")
        return default
    value = record[key]
    # Exact types: a bool is no integer here, and a number no string.
    ok = (type(value) is kind or (kind is float and type(value) is int))
    _check(ok, key, value, _TYPE_NAMES[kind])
    return kind(value)


def _timeout(value: float) -> float | None:
    return None if value <= 0 else value
