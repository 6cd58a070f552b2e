"""Which Ray nodes a run's clients trained on, and what a lost node costs.

Flower's Ray backend keeps its client actors in a ``BasicActorPool``: each message pops
an idle actor, runs there, and the actor goes back to the pool, even when it died with
its node. A dead actor would then fail a share of the messages of every later round.
:class:`NodeAwarePool` (installed by :func:`node_aware_pool` for one simulation) is that
pool with two changes:

* an actor that died (``RayActorError``: its node was removed or crashed) is dropped, so
  only the message it held fails (its users count as failed clients for that round) and
  later messages wait for a live actor;
* at most ``simulation.ray_max_workers`` actors (Flower sizes the pool to the cluster);
* every reply is tallied on the node its actor runs on (users trained per node), for
  the run folder's ``nodes.json`` (:func:`node_records`).

Messages, retries and errors are otherwise Flower's own. The hook replaces one name in
Flower's Ray backend module (checked before the run: :func:`check_pool_hook`; after it,
that the backend built rf2's pool: :func:`verify_pool_used`).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

from rf2.core.flower_version import FlowerCompatError


@dataclass(frozen=True)
class NodeRecord:
    """One Ray node and the users (simulated clients) that trained on it."""

    node_id: str
    address: str
    cpus: float
    clients_trained: int


class NodeTally:
    """Users trained per Ray node id, counted as replies come back (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.trained: Counter[str] = Counter()
        self.lost_actors = 0
        self.pools_built = 0

    def add(self, node_id: str, users: int) -> None:
        with self._lock:
            self.trained[node_id] += users


def _node_of_actor(actor_self: object) -> str:  # noqa: ARG001 - runs inside the actor
    import ray

    return ray.get_runtime_context().get_node_id()


def _users_trained(reply: Any) -> int:  # noqa: ANN401 - a flwr Message
    """Users of a batch reply that trained (``rf2.fl.user_batch``: one ``metrics/<i>``
    record each; errors have none)."""
    if reply.has_error():
        return 0
    return sum(1 for key in reply.content.keys() if key.startswith("metrics/"))


_POOL_CLASS = "BasicActorPool"  # the class Flower's Ray backend builds its actor pool from


def _pool_class(tally: NodeTally, max_workers: int) -> type:
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    from ray.actor import ActorHandle
    from ray.exceptions import RayActorError

    class NodeAwarePool(BasicActorPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
            super().__init__(*args, **kwargs)
            if max_workers > 0:  # Flower sizes the pool to the whole cluster
                self.actors_capacity = min(self.actors_capacity, max_workers)
            self._idle = threading.Condition()
            self._node_query: dict[str, Any] = {}  # actor id -> ObjectRef of its node id
            self._node: dict[str, str] = {}
            tally.pools_built += 1

        def add_actors_to_pool(self, num_actors: int) -> None:
            super().add_actors_to_pool(num_actors)
            for actor in self.pool:  # Flower types them as its actor class; they are handles
                handle = cast(ActorHandle, actor)
                key = handle._actor_id.hex()  # noqa: SLF001 - the actor's stable id
                if key not in self._node_query:
                    self._node_query[key] = handle.__ray_call__.remote(_node_of_actor)

        def submit(self, actor_fn: Any, job: Any) -> Any:  # noqa: ANN401
            # Flower runs one engine thread per actor it created; with an actor lost,
            # the extra thread waits for a live one instead of popping an empty list.
            with self._idle:
                self._idle.wait_for(lambda: bool(self.pool))
                return super().submit(actor_fn, job)

        def add_actor_back_to_pool(self, future: Any) -> None:  # noqa: ANN401
            with self._idle:
                actor = self._future_to_actor.pop(future, None)
                if actor is not None:
                    self.pool.append(actor)
                    self._idle.notify()

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> Any:  # noqa: ANN401
            import ray

            try:
                _, reply, context = ray.get(future)
            except RayActorError:
                # Its node is gone: drop the actor (the message fails, as in Flower).
                with self._idle:
                    self._future_to_actor.pop(future, None)
                    self.num_actors -= 1
                    tally.lost_actors += 1
                raise
            actor = self._future_to_actor.get(future)
            if actor is not None:
                node = self._node_id(actor)
                if node is not None:
                    tally.add(node, _users_trained(reply))
            self.add_actor_back_to_pool(future)
            return reply, context

        def _node_id(self, actor: Any) -> str | None:  # noqa: ANN401
            import ray

            key = actor._actor_id.hex()  # noqa: SLF001
            if key not in self._node and key in self._node_query:
                try:
                    self._node[key] = ray.get(self._node_query.pop(key))
                except RayActorError:
                    return None
            return self._node.get(key)

    return NodeAwarePool


def check_pool_hook() -> None:
    """Raise if Flower's Ray backend no longer builds its pool from the name we replace."""
    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError as ex:
        raise FlowerCompatError(f"rf2.fl.ray_nodes cannot import Flower's Ray backend: {ex}"
                                ) from ex
    build = getattr(getattr(raybackend, "RayBackend", None), "build", None)
    names = getattr(getattr(build, "__code__", None), "co_names", ())
    if not hasattr(raybackend, "BasicActorPool") or "BasicActorPool" not in names:
        raise FlowerCompatError("flwr's RayBackend.build no longer uses "
                                "raybackend.BasicActorPool, which rf2.fl.ray_nodes replaces")


def verify_pool_used(tally: NodeTally) -> None:
    if not tally.pools_built:
        raise FlowerCompatError("Flower's Ray backend never built rf2's NodeAwarePool "
                                "(rf2.fl.ray_nodes): node records and lost-node handling "
                                "were not in effect")


@contextlib.contextmanager
def node_aware_pool(tally: NodeTally, max_workers: int = 0) -> Iterator[None]:
    """Flower's Ray backend builds :class:`NodeAwarePool` inside this block, with at most
    ``max_workers`` actors (0 = as many as the cluster's CPUs fit)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    check_pool_hook()
    # Replaced by name: the backend looks the class up in its module when it builds a pool.
    original = getattr(raybackend, _POOL_CLASS)
    setattr(raybackend, _POOL_CLASS, _pool_class(tally, max_workers))
    try:
        yield
    finally:
        setattr(raybackend, _POOL_CLASS, original)


def node_records(tally: NodeTally, nodes: list[dict[str, Any]]) -> list[NodeRecord]:
    """The cluster's nodes (``ray.nodes()`` taken while they were alive) with the users
    trained on each; nodes that trained nobody are listed too (0)."""
    out = []
    for node in nodes:
        node_id = str(node.get("NodeID", ""))
        out.append(NodeRecord(
            node_id=node_id,
            address=str(node.get("NodeManagerAddress", "")),
            cpus=float(node.get("Resources", {}).get("CPU", 0.0)),
            clients_trained=int(tally.trained.get(node_id, 0)),
        ))
    return out


def records_as_json(records: list[NodeRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
