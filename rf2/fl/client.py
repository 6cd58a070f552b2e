"""Flower ClientApp: one message = the local training of a batch of users (``rf2.fl.user_batch``).

A Flower SuperNode here is a transport slot, not a user: each message names its users,
each with its own task (``rf2.fl.user_task``). Mapping one SuperNode per user would make Flower's
simulation engine poll every node every 0.1 s, i.e. per-round cost growing with the
population; with slots the per-round cost depends only on clients per round.

The dataset is loaded once per worker process (``_WORKER_CACHE``), not per call: on Ray
from the object store, where the driver put it (``ClientSpec.data``,
``rf2.fl.shared_data``), never rebuilt by the worker; in-process the server's own copy.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from rf2.core.config import DatasetConfig, ModelConfig
from rf2.core.typed import from_dict, to_dict
from rf2.data import load_dataset
from rf2.data.base import FederatedDataset
from rf2.fl.deadline import DeadlineExceeded, call_with_deadline
from rf2.fl.params import (
    load_numpy_into,
    num_bytes,
    numpy_to_record,
    record_to_numpy,
    state_to_numpy,
    use_fast_arrays,
)
from rf2.fl.partial_sum import SumBuilder, finite, reply_bytes, summable
from rf2.fl.records import record_of
from rf2.fl.shared_data import SharedDataset
from rf2.fl.user_batch import pack_results, pack_sum, user_tasks
from rf2.fl.user_state import MessageRows, UserStateStore
from rf2.fl.user_task import RoundRecipe, UserTask
from rf2.hetero.faults import apply_injected_fault
from rf2.model import FederatedModel, build_model
from rf2.model.cohort import (
    ClientJob,
    ClientSummary,
    ClientUpdate,
    NotVectorisable,
    one_full_batch_step,
    summed_step,
    train_cohort,
)
from rf2.model.examples import user_examples
from rf2.model.local_training import LocalTrainingResult, train_locally
from rf2.optim.compression import compress_update
from rf2.optim.heterofl import extract, rules_for, slice_spec
from rf2.optim.row_averaging import touched_items
from rf2.optim.sparse import ROWS, VALUES, changed_rows, encode, encode_dense

log = logging.getLogger(__name__)

# Adds one user's n_k Δ_k to its message's sum, at the user's position in the batch.
AddToSum = Callable[[SumBuilder, int], None]


@dataclass(frozen=True)
class ClientSpec:
    """Everything a worker needs to rebuild the data and model: small and picklable."""

    dataset: dict[str, Any]
    model: dict[str, Any]
    seed: int
    torch_threads: int = 1
    fast_transport: bool = True  # simulation.fast_transport: FastArray or stock Array
    # Train a message's users as one cohort (rf2.model.cohort); False: one at a time.
    vectorise: bool = True
    # Reply only the changed rows of the row tables (rf2.optim.sparse); False: dense.
    sparse_updates: bool = True
    # On Ray: the driver's dataset in the object store; None = load it from ``dataset``.
    data: SharedDataset | None = None
    # A model with per-user state: where its users' rows live between rounds.
    user_state: UserStateStore | None = None

    @functools.cached_property
    def key(self) -> str:
        return json.dumps([self.dataset, self.model, self.seed], sort_keys=True)


@dataclass
class _WorkerState:
    """What a worker process keeps across messages: the data and the model skeletons that
    each user's training loads the received weights into."""

    dataset: FederatedDataset
    model: FederatedModel
    model_cfg: ModelConfig
    # HeteroFL sub-model skeletons by width, built on first use.
    narrow_models: dict[float, FederatedModel] = field(default_factory=dict)

    def model_for_width(self, width: float) -> FederatedModel:
        """The full model, or its HeteroFL sub-model (``FederatedModel.at_width``)."""
        if width >= 1.0:
            return self.model
        if width not in self.narrow_models:
            self.narrow_models[width] = self.model.at_width(width)
        return self.narrow_models[width]


_WORKER_CACHE: dict[str, _WorkerState] = {}


def worker_state(spec: ClientSpec, dataset: FederatedDataset | None = None) -> _WorkerState:
    """Load the dataset and build a model skeleton once per process and spec.

    ``dataset``: the one this process already loaded for ``spec`` (the in-process
    backend shares the server's copy instead of generating or reading it again).
    """
    state = _WORKER_CACHE.get(spec.key)
    if state is None:
        # One torch thread per client worker: with 2 threads on a busy 2-core machine
        # client training ran ~40x slower (measured in v0.1; tests/conftest.py pins 1 too).
        torch.set_num_threads(spec.torch_threads)
        dataset_cfg = from_dict(DatasetConfig, spec.dataset, "dataset")
        model_cfg = from_dict(ModelConfig, spec.model, "model")
        if dataset is None:
            dataset = _dataset_of(spec, dataset_cfg)
        model = build_model(model_cfg, dataset, spec.seed)
        state = _WorkerState(dataset=dataset, model=model, model_cfg=model_cfg)
        _WORKER_CACHE.clear()  # one run per worker at a time; free the previous one
        _WORKER_CACHE[spec.key] = state
    return state


def _dataset_of(spec: ClientSpec, dataset_cfg: DatasetConfig) -> FederatedDataset:
    """The shared copy when the driver put one in Ray's object store, else a fresh load."""
    if spec.data is not None:
        return spec.data.fetch()
    return load_dataset(dataset_cfg, spec.seed)


def client_spec_from(dataset_cfg: DatasetConfig, model_cfg: ModelConfig, seed: int,
                     fast_transport: bool = True, vectorise: bool = True,
                     sparse_updates: bool = True) -> ClientSpec:
    return ClientSpec(dataset=to_dict(dataset_cfg), model=to_dict(model_cfg), seed=seed,
                      fast_transport=fast_transport, vectorise=vectorise,
                      sparse_updates=sparse_updates)


def handle_train(msg: Message, spec: ClientSpec) -> Message:
    """Train each user of the batch in ``msg`` on the global model; one reply for all.

    Vectorised (``spec.vectorise``): the batch's users of equal width train as one
    cohort; otherwise one after the other. Either way each user has its own seed,
    loss and metrics, and a user whose training raises gets an error entry while the
    others still reply. Users the server lets sum (``rf2.fl.partial_sum``) reply one
    sum of their deltas; the others reply their own arrays.
    """
    use_fast_arrays(spec.fast_transport)  # this worker's codec (Ray workers are processes)
    state = worker_state(spec)
    received = record_to_numpy(record_of(msg.content, "arrays", ArrayRecord))  # decoded once
    recipe, tasks = user_tasks(msg)
    # Per-user state (rf2.fl.user_state): this message's users' rows, fetched once.
    store = spec.user_state
    own = (MessageRows.fetch(store, state.model, [t.user for t in tasks])
           if store is not None else None)
    builder = SumBuilder(received, state.model.row_tables()) if any(
        summable(recipe, t) for t in tasks) else None
    # Per position: trained in a cohort, its cohort's error, or None (not trained yet:
    # the per-user path trains it below, within its deadline).
    trained: list[_Trained | BaseException | None] = [None] * len(tasks)
    if spec.vectorise and own is not None:
        _log_fallback_once(f"{type(state.model).__name__} has per-user state "
                           f"{state.model.user_state_names()} (the cohort does not carry it)")
    elif spec.vectorise:
        for group in _cohorts(tasks):
            members = [tasks[i] for i in group]
            outs = None
            if builder is not None and all(summable(recipe, t) for t in members):
                outs = _sum_cohort(state, received, recipe, members, builder, group)
            if outs is None:
                outs = _train_cohort(state, received, recipe, members)
            for i, out in zip(group, outs, strict=True):
                trained[i] = out
    results: list[dict[str, Any] | BaseException] = []
    started = time.monotonic()
    for i, task in enumerate(tasks):
        done = trained[i]
        if isinstance(done, _Trained) and done.summary is not None:
            # Already in the sum: only its metrics are left to reply.
            results.append({"metrics": _metrics(done, reply_bytes(
                received, done.summary.rows, spec.sparse_updates))})
            continue
        # Each user's own part (its training when not in a cohort, compression, reply)
        # has its own deadline: a hanging user times out alone, the batch goes on.
        timeout = user_timeout(recipe, time.monotonic() - started)
        into_sum = builder if summable(recipe, task) else None
        try:
            records, contribution = call_with_deadline(
                functools.partial(_user_reply, state, received, recipe, task, done,
                                  spec.sparse_updates, into_sum=into_sum is not None, own=own),
                timeout)
        except DeadlineExceeded as ex:
            results.append(ex)
            state = retire_worker_model(spec)  # the late call may still write the old one
            continue
        except Exception as ex:  # noqa: BLE001 - reported per user, as Flower reports a client
            results.append(ex)
            continue
        if into_sum is not None and contribution is not None:
            contribution(into_sum, i)  # added here: a late, abandoned call never writes it
        results.append(records)
    if own is not None and store is not None:  # own exists only with a store
        own.write_back(store)  # before replying: the server evaluates them next
    content = pack_results(results)
    if builder is not None and builder.positions:
        pack_sum(content, builder.arrays(), builder.positions, builder.weight)
    return Message(content=content, reply_to=msg)


def _user_reply(state: _WorkerState, received: dict[str, np.ndarray], recipe: RoundRecipe,
                task: UserTask, done: _Trained | BaseException | None, sparse: bool,
                into_sum: bool, own: MessageRows | None = None
                ) -> tuple[dict[str, Any], AddToSum | None]:
    """A user's reply records, and (``into_sum``, update finite) the function that adds
    its update to the message's sum, its records then being its metrics alone."""
    if isinstance(done, BaseException):
        raise done
    if done is None:
        done = _train_one(state, received, recipe, task, own)
    if into_sum:
        add = done.sum_contribution()
        if add is not None:
            return {"metrics": _metrics(done, num_bytes(done.reply_arrays(sparse)))}, add
    return _own_reply(recipe, task, done, sparse), None


def user_timeout(recipe: RoundRecipe, elapsed_s: float) -> float | None:
    """Seconds this user may take: its own deadline (``client_timeout_s``), within what
    is left of the round's budget for the message, less a margin for the reply."""
    round_s, user_s = recipe.round_timeout_s, recipe.client_timeout_s
    limits = []
    if round_s is not None:
        limits.append(round_s - min(2.0, 0.1 * round_s) - elapsed_s)
    if user_s is not None:
        limits.append(user_s)
    return max(0.0, min(limits)) if limits else None


def retire_worker_model(spec: ClientSpec) -> _WorkerState:
    """A fresh model skeleton for ``spec`` on the same dataset: an abandoned late call
    may still be writing into the old one (``rf2.fl.deadline``)."""
    old = _WORKER_CACHE.pop(spec.key, None)
    return worker_state(spec, old.dataset if old is not None else None)


@dataclass
class _Trained:
    """One user's training outcome, before compression, faults and packing."""

    user: int
    received: dict[str, np.ndarray]  # the global model as this user holds it (its width)
    result: LocalTrainingResult
    histories: np.ndarray  # (n, H)
    targets: np.ndarray  # (n,)
    row_tables: tuple[str, ...]  # the model's row tables (FederatedModel.row_tables)
    arrays: dict[str, np.ndarray] | None = None  # per-user path: the whole trained model
    update: ClientUpdate | None = None  # cohort path: its rows and values
    summary: ClientSummary | None = None  # summed step: already in its message's sum

    def sum_contribution(self) -> AddToSum | None:
        """A function adding n_k Δ_k to a message's sum; None when the update is not
        finite or empty (the user then replies alone, and the server's screen counts it)."""
        weight = float(self.result.num_examples)
        if self.update is not None:
            update = self.update
            if not update.values or not finite(update.values.values()):
                return None
            return lambda b, i: b.add_user(i, weight, update.rows, update.values)
        arrays = self.arrays
        if arrays is None or not finite(arrays.values()):
            return None
        return lambda b, i: b.add_full(i, weight, arrays)

    def reply_arrays(self, sparse: bool) -> dict[str, np.ndarray]:
        """Changed rows only (``rf2.optim.sparse``) or the whole model."""
        if self.update is not None:
            if sparse:
                return encode(self.received, self.update.rows, self.update.values)
            return self.update.dense(self.received)
        assert self.arrays is not None
        if sparse:
            return encode_dense(self.received, self.arrays, self.row_tables)
        return self.arrays


def training_seed(run_seed: int, user: int, server_round: int) -> int:
    """(run seed, user, round) -> the user's training seed (negatives, batch order)."""
    return run_seed * 1_000_003 + user * 7919 + server_round


def _user_seed(recipe: RoundRecipe, task: UserTask) -> int:
    return training_seed(recipe.seed, task.user, recipe.server_round)


def _global_at_width(state: _WorkerState, received: dict[str, np.ndarray], width: float
                     ) -> dict[str, np.ndarray]:
    """The global model as a client of this HeteroFL width holds it."""
    if width >= 1.0:
        return received
    # HeteroFL: this client holds the top-left slice of every width-scaled tensor.
    # (The simulation ships the full model and slices here; the clock and the traffic
    # log count what a real server would send at this width: rf2.fl.download.)
    shapes = {k: tuple(v.shape) for k, v in received.items()}
    rules = rules_for(shapes, state.model_cfg.dim, state.model.width_rules())
    return extract(received, slice_spec(shapes, width, rules))


def _set_progress(model: FederatedModel, recipe: RoundRecipe) -> None:
    # Schedules that depend on training progress (the index's temperature and loss
    # warm-up) follow the server round.
    model.set_training_progress(recipe.server_round, recipe.num_rounds)


_LOGGED_FALLBACKS: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    """Say once per worker process why a model trains user by user."""
    if reason not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(reason)
        log.warning("training user by user instead of as one cohort: %s", reason)


def _cohorts(tasks: list[UserTask]) -> list[list[int]]:
    """Positions of the batch's users grouped by model width (the rest of their
    training recipe is the message's, shared by all)."""
    groups: dict[float, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task.width, []).append(i)
    return list(groups.values())


def _train_cohort(state: _WorkerState, received: dict[str, np.ndarray], recipe: RoundRecipe,
                  tasks: list[UserTask]) -> list[_Trained | BaseException | None]:
    """Train ``tasks``' users (all of one width) together. A model that does not declare
    cohort support leaves each user to the per-user path (None), with the reason logged
    once; any other error is every user's error (reported per user, never retried
    silently)."""
    try:
        width = tasks[0].width
        held = _global_at_width(state, received, width)
        model = state.model_for_width(width)
        _set_progress(model, recipe)
        jobs = _cohort_jobs(state, recipe, tasks)
        updates = train_cohort(
            model, held, jobs,
            lr=recipe.lr,
            local_epochs=recipe.local_epochs,
            batch_size=recipe.batch_size,
            proximal_mu=recipe.proximal_mu,
        )
    except NotVectorisable as ex:
        _log_fallback_once(str(ex))
        return [None] * len(tasks)
    except Exception as ex:  # noqa: BLE001 - reported per user, as Flower reports a client
        return [ex] * len(tasks)
    return _cohort_outcomes(model, held, tasks, jobs, updates)


def _sum_cohort(state: _WorkerState, received: dict[str, np.ndarray], recipe: RoundRecipe,
                tasks: list[UserTask], builder: SumBuilder, positions: list[int]
                ) -> list[_Trained | BaseException | None] | None:
    """One full-batch step of ``tasks``' users as one summed gradient, added to
    ``builder``; None when the recipe is not one full-batch step, the model is not
    vectorisable or the sum is not finite (then the per-client path runs instead)."""
    try:
        model = state.model  # summed users train the full model (no HeteroFL width)
        _set_progress(model, recipe)
        jobs = _cohort_jobs(state, recipe, tasks)
        if (any(len(j.targets) == 0 for j in jobs)
                or not one_full_batch_step(jobs, recipe.local_epochs, recipe.batch_size)):
            return None
        summed, summaries = summed_step(model, received, jobs, lr=recipe.lr)
    except NotVectorisable:
        return None  # _train_cohort says why and leaves it to the per-user path
    except Exception as ex:  # noqa: BLE001 - reported per user, as Flower reports a client
        return [ex] * len(tasks)
    if not finite(summed.deltas.values()):
        return None
    builder.add_sum(summed, positions)
    return _cohort_outcomes(model, received, tasks, jobs, summaries)


def _cohort_jobs(state: _WorkerState, recipe: RoundRecipe, tasks: list[UserTask]
                 ) -> list[ClientJob]:
    """Each user's examples and own training seed."""
    return [ClientJob(*user_examples(state.dataset, t.user), _user_seed(recipe, t))
            for t in tasks]


def _cohort_outcomes(model: FederatedModel, held: dict[str, np.ndarray], tasks: list[UserTask],
                     jobs: list[ClientJob], outcomes: Sequence[ClientUpdate | ClientSummary]
                     ) -> list[_Trained | BaseException | None]:
    """Each cohort user's training outcome: its update (trained), or its summary (already
    in the message's sum)."""
    tables = tuple(model.row_tables())
    return [
        _Trained(t.user, held, LocalTrainingResult(o.num_examples, o.loss_before, o.loss_after),
                 j.histories, j.targets, tables,
                 update=o if isinstance(o, ClientUpdate) else None,
                 summary=o if isinstance(o, ClientSummary) else None)
        for t, j, o in zip(tasks, jobs, outcomes, strict=True)
    ]


def _train_one(state: _WorkerState, received: dict[str, np.ndarray], recipe: RoundRecipe,
               task: UserTask, own: MessageRows | None = None) -> _Trained:
    """One user's local training from the global model (the per-user reference path).

    ``own``: a stateful model's per-user rows; the user's are loaded before training and
    kept after (they are never part of the reply)."""
    held = _global_at_width(state, received, task.width)
    model = state.model_for_width(task.width)
    load_numpy_into(model, held)
    if own is not None:
        own.load_into(model, task.user)
    _set_progress(model, recipe)
    histories, targets = user_examples(state.dataset, task.user)
    result = train_locally(
        model,
        histories,
        targets,
        lr=recipe.lr,
        local_epochs=recipe.local_epochs,
        batch_size=recipe.batch_size,
        proximal_mu=recipe.proximal_mu,
        seed=_user_seed(recipe, task),
        user=task.user,
        track_rows=True,
    )
    if own is not None:
        own.keep(model, task.user)
    tables = tuple(model.row_tables())
    if result.touched is None:  # rows not tracked: the whole model, compared row by row
        return _Trained(task.user, held, result, histories, targets, tables,
                        arrays=state_to_numpy(model))
    return _Trained(task.user, held, result, histories, targets, tables,
                    update=_row_update(model, held, result))


def _row_update(model: FederatedModel, held: dict[str, np.ndarray],
                result: LocalTrainingResult) -> ClientUpdate:
    """A per-user result in the cohort's row-sparse form: of each row table, the rows
    training changed (looked for among the rows it gave a gradient, ``result.touched``:
    plain SGD moves no other), every other parameter whole. The same rows and values as
    comparing the whole trained model with ``held`` (``SumBuilder.add_full``,
    ``encode_dense``), without a pass over every row of every table per user."""
    assert result.touched is not None
    own = set(model.user_state_names())
    rows: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if name in own:
            continue  # per-user state: never sent (rf2.fl.user_state)
        ids = result.touched.get(name)
        if ids is None:
            values[name] = tensor.detach().cpu().numpy().copy()
            continue
        new = tensor.detach()[torch.from_numpy(ids)].cpu().numpy()  # (R, ...) a copy
        old = np.asarray(held[name])[ids].astype(new.dtype, copy=False)
        keep = changed_rows(new, old)
        rows[name], values[name] = ids[keep], new[keep]
    return ClientUpdate(result.num_examples, result.loss_before, result.loss_after, rows, values)


def _own_reply(recipe: RoundRecipe, task: UserTask, done: _Trained, sparse: bool
               ) -> dict[str, Any]:
    """The reply records of a user that replies alone (not in its message's sum): its
    arrays (compressed, with any injected fault), its metrics, its touched rows."""
    received = done.received
    arrays = done.reply_arrays(sparse)
    bytes_up = num_bytes(arrays)
    if task.prune_rate is not None or task.quant_bits is not None:
        # Compress the update (not the weights); the server sees the decompressed,
        # unbiased update, and the clock and traffic log see the compressed size. A
        # sparse reply compresses the deltas of its rows; the row ids travel as they are.
        rng = np.random.default_rng([recipe.seed, task.user, recipe.server_round, 1])
        base = _reference_values(received, arrays)
        delta = {k: arrays[k] - base[k] for k in base}
        delta_hat, bytes_up = compress_update(delta, task.prune_rate, task.quant_bits, rng)
        ids = {k: v for k, v in arrays.items() if k not in base}
        bytes_up += num_bytes(ids)
        arrays = {k: ids[k] if k in ids else (base[k] + delta_hat[k]).astype(arrays[k].dtype)
                  for k in arrays}
    arrays = apply_injected_fault(task.fault, task.hang_s, arrays)
    records: dict[str, Any] = {"arrays": numpy_to_record(arrays),
                               "metrics": _metrics(done, bytes_up)}
    if task.report_touched:
        # Per-row embedding averaging needs the rows this client's data touched.
        touched = touched_items(done.histories, done.targets)
        records["rf2"] = ConfigRecord({"touched-items": [int(i) for i in touched]})
    return records


def _metrics(done: _Trained, bytes_up: int) -> MetricRecord:
    """The per-user figures the server logs (``bytes-up``: what this client sends)."""
    return MetricRecord({
        "num-examples": done.result.num_examples,
        "train_loss": done.result.loss_before,
        "loss_after": done.result.loss_after,
        "partition-id": done.user,
        "bytes-up": int(bytes_up),
    })


def _reference_values(received: dict[str, np.ndarray], arrays: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
    """For each value array of a reply, what the client received there (w_t)."""
    out = {}
    for key in arrays:
        if key.endswith(ROWS):
            continue
        if key.endswith(VALUES):
            name = key[: -len(VALUES)]
            out[key] = received[name][arrays[name + ROWS]]
        else:
            out[key] = received[key]
    return out


def make_client_app(spec: ClientSpec) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:  # noqa: ARG001 - Flower signature
        return handle_train(msg, spec)

    @app.query("warmup")
    def warmup(msg: Message, context: Context) -> Message:  # noqa: ARG001 - Flower signature
        # Load the dataset and build the model now, so that round 1 is not the one that
        # pays for worker start-up (and round timeouts measure training only).
        worker_state(spec)
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)

    return app
