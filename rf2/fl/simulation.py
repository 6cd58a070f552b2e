"""The only module that starts Ray or calls Flower's simulation launcher.

Two backends run the same ServerApp logic and ClientApp:

* ``ray``: Flower's simulation engine (``flwr.simulation.run_simulation``) on Ray, with
  client resources set deliberately (1 CPU per client = 2 actors on 2 cores) and an
  optional ``ray_address`` to join an existing cluster.
* ``inprocess``: :class:`InProcessGrid`, a ``flwr.serverapp.Grid`` that calls the
  ClientApp directly in this process — same messages, no Ray start-up.

``simulation.fast_transport`` (``rf2.fl.fast_transport``) switches Flower internals used
for speed on or off; on Ray, off means Flower's stock engine and grid.

On Ray the driver puts the dataset into Ray's object store once (``rf2.fl.shared_data``):
client actors, on this node or any other, read it from there and never load it
themselves. The launcher returns the nodes the clients trained on (``rf2.fl.ray_nodes``),
and a node lost mid-run fails only the messages it held.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from uuid import uuid4

from flwr.app import ConfigRecordValues, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from rf2.core.config import SimulationConfig
from rf2.core.flower_version import FlowerCompatError
from rf2.fl import fast_transport
from rf2.fl.deadline import DeadlineExceeded, call_with_deadline
from rf2.fl.interrupt import start_noting_stops, stop_requested
from rf2.fl.ray_nodes import NodeRecord, NodeTally, node_aware_pool, node_records, verify_pool_used
from rf2.fl.ray_start import LeanHead, start_lean
from rf2.fl.shared_data import SharedDataset, share

if TYPE_CHECKING:
    from rf2.data.base import FederatedDataset
    from rf2.fl.user_state import UserStateStore

ServerMain = Callable[[Grid, Context], None]
# The ClientApp for a dataset shared in Ray's object store (None: in-process, or nothing
# shared; the clients then load the dataset from its config).
ClientAppFor = Callable[[SharedDataset | None], ClientApp]

log = logging.getLogger(__name__)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    It sets the run, node and task identity the way Flower's simulation engine does
    before the ServerApp builds Messages (:func:`verify_task_identity` checks that
    Messages pick it up), and turns a raising ClientApp into an error reply (as the
    engine does). Message ids stay rf2's own (returned by ``push_messages``, never
    written into Flower's read-only metadata): nothing downstream reads them.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int,
                 on_abandoned: Callable[[], object] | None = None) -> None:
        run_id = secrets.randbits(63)
        self._run = Run.create_empty(run_id=run_id)
        self._run.primary_task_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        verify_task_identity(run_id)
        self._client_app = client_app
        self._node_ids = list(range(1, num_nodes + 1))
        self._contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                # As Flower's engine sets it; rf2 never reads it: a node is a transport
                # slot, and each message names its users (rf2.fl.user_batch).
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node_id in enumerate(self._node_ids)
        }
        self._replies: dict[str, Message] = {}
        self._on_abandoned = on_abandoned
        self._deadline: float | None = None  # monotonic time a round's replies are due

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            message_id = str(uuid4())
            context = self._contexts[msg.metadata.dst_node_id]
            remaining = None if self._deadline is None else self._deadline - time.monotonic()
            try:
                reply = call_with_deadline(functools.partial(self._client_app, msg, context),
                                           remaining)
            except DeadlineExceeded:
                # No reply: its users count as fault/timeout. The late call may still run
                # in its thread; it gets a retired model (rf2.fl.deadline).
                if self._on_abandoned is not None:
                    self._on_abandoned()
                ids.append(message_id)  # pulled, it yields nothing
                continue
            except Exception as ex:  # noqa: BLE001 - reported as an error reply, like Flower
                reason = f"{type(ex)}:<'{ex}'>"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                    reply_to=msg,
                )
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        # The round's deadline holds in-process too: each ClientApp call runs in a worker
        # thread that is waited for only until then (rf2.fl.deadline).
        self._deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return list(self.pull_messages(list(self.push_messages(messages))))
        finally:
            self._deadline = None


def verify_task_identity(run_id: int) -> None:
    """Server-side Messages must carry the identity :class:`InProcessGrid` set."""
    probe = Message(RecordDict({}), 1, "train")
    if (probe.metadata.run_id, probe.metadata.src_node_id) != (run_id, SUPERLINK_NODE_ID):
        raise FlowerCompatError(
            "Messages no longer take their run and node from flwr.supercore.task_identity."
            "TaskIdentity, which rf2's in-process backend sets",
            remedy="use simulation=ray")


# Flower's engine costs ~10 ms per message here, a few users' training: batches smaller
# than this only add overhead (measured: 10 clients/round on 2 actors ran 0.077 s/round
# at 2 users per message, 0.041 s at 5).
MIN_USERS_PER_MESSAGE = 5
# Messages per round at most on a Ray cluster, whose size is unknown until it is joined:
# enough to keep 32 actors busy, few enough that the driver is not the bottleneck.
CLUSTER_MESSAGES_PER_ROUND = 32


def users_per_message(sim: SimulationConfig, clients_per_round: int) -> int:
    """``sim.users_per_message``, or for 0 (auto) a batch size: with ``sim.vectorise``
    one cohort (<= ``sim.cohort_size`` users) per message; otherwise from the workers.

    Messages per round: about ``MIN_USERS_PER_MESSAGE`` users each, but at least one per
    client worker and at most 4 per worker (load balance: 100 clients on 2 actors ran
    0.23 s/round as 8 messages, 0.30 s as 2). Workers: 1 in-process; on local Ray the
    actors that fit (CPUs / CPUs per client); on a cluster (``ray_address``) up to
    ``CLUSTER_MESSAGES_PER_ROUND`` messages.
    """
    if sim.users_per_message > 0:
        return sim.users_per_message
    if sim.vectorise:
        # One cohort per message, sized from ``cohort_size`` alone: message (= cohort)
        # composition must not depend on the backend or on the worker count, since a
        # cohort's stacked arithmetic rounds differently from another grouping's.
        messages = -(-clients_per_round // sim.cohort_size)
        return max(1, -(-clients_per_round // messages))
    if sim.backend == "inprocess":
        fewest, most = 1, 4
    elif sim.ray_address:
        fewest, most = 1, CLUSTER_MESSAGES_PER_ROUND
    else:
        workers = local_ray_workers(sim)
        fewest, most = workers, 4 * workers
    wanted = -(-clients_per_round // MIN_USERS_PER_MESSAGE)
    messages = min(most, max(fewest, wanted))
    return max(1, -(-clients_per_round // messages))


def local_ray_workers(sim: SimulationConfig) -> int:
    """Client workers (actors) a local Ray runs: the CPUs / CPUs per client."""
    workers = max(1, int((os.cpu_count() or 1) // sim.num_cpus_per_client))
    return min(workers, sim.ray_max_workers) if sim.ray_max_workers > 0 else workers


def launch(
    server_main: ServerMain,
    client_app_for: ClientAppFor,
    num_supernodes: int,
    sim: SimulationConfig,
    on_abandoned: Callable[[], object] | None = None,
    dataset: FederatedDataset | None = None,
    user_state: UserStateStore | None = None,
) -> list[NodeRecord]:
    """Run ``server_main`` against ``num_supernodes`` client slots on the chosen backend.

    ``dataset``: the one the driver built; on Ray it goes into the object store once and
    the ClientApp gets a reference to it (``client_app_for(shared)``). ``user_state``: a
    stateful model's per-user store, moved into a Ray actor for the run
    (``rf2.fl.user_state``). ``on_abandoned``: called in-process when a ClientApp call
    misses the round deadline (retire the model it may still be writing;
    ``rf2.fl.deadline``). Returns the Ray nodes the clients ran
    on (empty in-process).
    """
    fast_transport.prepare(sim)
    if sim.backend == "inprocess":
        grid = InProcessGrid(client_app_for(None), num_supernodes, on_abandoned)
        server_main(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                  state=RecordDict(), run_config={}))
        return []
    return _launch_ray(server_main, client_app_for, num_supernodes, sim, dataset, user_state)


def _init_ray(ray: object, sim: SimulationConfig) -> LeanHead | None:
    """Start (or join) Ray ourselves, before Flower would; the head node this process
    started itself (``simulation.lean_start``), to stop after ``ray.shutdown()``.

    Flower's own ``ray.init`` passes a ``runtime_env``, which stops Ray from reusing its
    pre-started workers (~10 s start-up on 2 cores). Locally the workers inherit this
    process's environment instead, including one OpenMP/torch thread per worker.
    """
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Opt in to Ray's future behaviour for CPU-only actors (silences its FutureWarning).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if sim.ray_address:
        # A remote cluster does not inherit our environment: ship it as a runtime_env.
        # Workers' console lines stay in the cluster's logs (a client's error reaches
        # the run as its reply).
        ray.init(address=sim.ray_address, runtime_env={"env_vars": threads},  # type: ignore[attr-defined]
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        return None
    saved = {k: os.environ.get(k) for k in threads}
    os.environ.update(threads)
    try:
        kwargs: dict[str, object] = {"num_cpus": os.cpu_count() or 1,
                                     "include_dashboard": False,
                                     "logging_level": logging.WARNING,
                                     "log_to_driver": False}
        if sim.ray_temp_dir:
            kwargs["_temp_dir"] = os.path.abspath(sim.ray_temp_dir)
        # Ray's processes ignore the terminal's SIGINT: _launch_ray starts Ray inside
        # rf2.fl.interrupt.start_noting_stops.
        head = start_lean(os.cpu_count() or 1, sim.ray_temp_dir) if sim.lean_start else None
        if head is None:
            ray.init(**kwargs)  # type: ignore[attr-defined]
        else:
            ray.init(address=head.address, logging_level=logging.WARNING,  # type: ignore[attr-defined]
                     log_to_driver=False)
        return head
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rf2_owns_sigterm(record: logging.LogRecord) -> bool:
    # ray.init from rf2's start-up thread leaves SIGTERM to rf2: not worth a warning.
    return "SIGTERM handler is not set" not in record.getMessage()


def _launch_ray(
    server_main: ServerMain, client_app_for: ClientAppFor, num_supernodes: int,
    sim: SimulationConfig, dataset: FederatedDataset | None,
    user_state: UserStateStore | None = None,
) -> list[NodeRecord]:
    import ray
    from flwr.simulation import run_simulation

    from rf2.fl.prompt_delivery import PromptGrid, PushedNodes, prompt_delivery

    server_app = ServerApp()
    pushed = PushedNodes() if sim.fast_transport else None

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            server_main(grid if pushed is None else PromptGrid(grid, pushed), context)
        finally:
            if user_state is not None:  # the tables back here while Ray still runs
                user_state.from_ray()
        print("[rf2] stopping Ray", flush=True)  # Flower shuts it down after this returns

    # Ray's start and shutdown take seconds to tens of seconds and print nothing: say so.
    if sim.ray_address:
        print(f"[rf2] joining the Ray cluster at {sim.ray_address}", flush=True)
    else:
        print(f"[rf2] starting Ray: {local_ray_workers(sim)} workers "
              f"({os.cpu_count() or 1} CPUs, {sim.num_cpus_per_client:g} per client worker)",
              flush=True)
    # A Ctrl-C or SIGTERM while Ray starts is noted, and acted on below (rf2.fl.interrupt);
    # Ray lives inside ``starting`` (its processes die with the thread that started them).
    logging.getLogger("ray._private.worker").addFilter(_rf2_owns_sigterm)
    heads: list[LeanHead | None] = []
    starting = contextlib.ExitStack()
    starting.enter_context(start_noting_stops(lambda: heads.append(_init_ray(ray, sim))))
    head = heads[0] if heads else None
    if sim.ray_address:
        cpus = float(ray.cluster_resources().get("CPU", 0))
        workers = int(cpus // sim.num_cpus_per_client)
        if sim.ray_max_workers > 0:
            workers = min(workers, sim.ray_max_workers)
        print(f"[rf2] Ray cluster: {workers} workers ({cpus:g} CPUs)", flush=True)
    backend_config: dict[str, dict[str, ConfigRecordValues]] = {
        "client_resources": {
            "num_cpus": sim.num_cpus_per_client,
            "num_gpus": sim.num_gpus_per_client,
        },
    }
    started = time.perf_counter()
    tally = NodeTally()
    try:
        if stop_requested():
            return []  # stopped while Ray started: no round ran, shut Ray down again
        # Held until the simulation is over: this reference keeps the data in the store.
        shared = None if dataset is None else share(dataset)
        if user_state is not None:
            user_state.to_ray()  # per-user rows: in one actor, not sent with the rounds
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        with contextlib.ExitStack() as hooks:
            hooks.enter_context(node_aware_pool(tally, sim.ray_max_workers))
            if pushed is not None:
                hooks.enter_context(prompt_delivery(pushed))
            run_simulation(
                server_app=server_app,
                client_app=client_app_for(shared),
                num_supernodes=num_supernodes,
                backend_name="ray",
                backend_config=backend_config,
            )
        verify_pool_used(tally)
        del shared
        return node_records(tally, nodes)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if head is not None:
            head.stop()
        starting.close()
        log.debug("ray simulation finished in %.1fs", time.perf_counter() - started)
