"""The per-user state store: each user's rows of a stateful model's per-user tables
(``FederatedModel.user_state_names``, e.g. FCF's user vectors), kept across rounds.

A user's rows never travel to the server's aggregation: a client fetches its users'
rows before training and writes them back after, and only the federated parameters
reply. The store starts from the model's initial tables (deterministic from the run
seed), so every backend starts from the same vectors; the server reads the whole table
to evaluate (each user scored with its own vector), to checkpoint and for ``model.pt``.

Where the tables live:

* in-process: NumPy arrays in this process, shared by the server and the clients;
* on Ray (:meth:`UserStateStore.to_ray`, called by the launcher once Ray is up): one
  Ray actor holding the tables, which every client of the cluster calls for its own
  users' rows (one fetch and one write per message); the tables are put there once,
  never re-sent with the rounds. :meth:`UserStateStore.from_ray` takes them back before
  Ray stops. The store pickles as the actor handle alone.

Memory: users x dim x 4 bytes per table (float32), e.g. FCF at dim 64 on amazon-cds's
43,169 users: 11 MB, once (in the actor on Ray; each client worker's model also holds a
table of that size, in which only the users it trains are filled in).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rf2.model.base import FederatedModel


def user_state_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The model's per-user tables (none for a model outside the contract)."""
    names = getattr(model, "user_state_names", None)
    return tuple(names()) if callable(names) else ()


class _Tables:
    """The tables themselves (in-process, or inside the Ray actor)."""

    def __init__(self, tables: Mapping[str, np.ndarray]) -> None:
        # Own writable float32 copies (a Ray object is a read-only view).
        self.tables = {k: np.array(v, dtype=np.float32, copy=True) for k, v in tables.items()}
        self._lock = threading.Lock()

    def fetch(self, users: Sequence[int]) -> dict[str, np.ndarray]:
        ids = np.asarray(users, dtype=np.int64)
        with self._lock:
            return {k: t[ids] for k, t in self.tables.items()}  # copies (fancy indexing)

    def write(self, users: Sequence[int], rows: Mapping[str, np.ndarray]) -> None:
        ids = np.asarray(users, dtype=np.int64)
        with self._lock:
            for k, t in self.tables.items():
                t[ids] = rows[k]

    def snapshot(self) -> dict[str, np.ndarray]:
        with self._lock:
            return {k: t.copy() for k, t in self.tables.items()}


class UserStateStore:
    """Per-user tables by name -> (num_users, ...) float32, in this process or in a Ray
    actor (see the module docstring)."""

    def __init__(self, tables: Mapping[str, np.ndarray]) -> None:
        self._local: _Tables | None = _Tables(tables)
        self._actor: Any = None  # the Ray actor holding the tables, once on Ray

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> UserStateStore | None:
        """A store holding ``model``'s per-user tables as they are now; None for a model
        without per-user state."""
        names = user_state_names(model)
        if not names:
            return None
        state = model.state_dict()
        return cls({name: state[name].detach().cpu().numpy() for name in names})

    # -- what clients and the server call --------------------------------------------------
    def fetch(self, users: Sequence[int]) -> dict[str, np.ndarray]:
        """Table -> (len(users), ...) the rows of ``users``, in that order."""
        if self._actor is not None:
            import ray

            return ray.get(self._actor.fetch.remote(list(users)))
        assert self._local is not None
        return self._local.fetch(users)

    def write(self, users: Sequence[int], rows: Mapping[str, np.ndarray]) -> None:
        """Store ``rows`` (table -> (len(users), ...)) as the rows of ``users``."""
        if not len(users):
            return
        if self._actor is not None:
            import ray

            ray.get(self._actor.write.remote(list(users), dict(rows)))
            return
        assert self._local is not None
        self._local.write(users, rows)

    def tables(self) -> dict[str, np.ndarray]:
        """A copy of every table (checkpoints, evaluation, ``model.pt``)."""
        if self._actor is not None:
            import ray

            return {k: np.array(v) for k, v in ray.get(self._actor.snapshot.remote()).items()}
        assert self._local is not None
        return self._local.snapshot()

    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tables().values()))

    def load_into(self, model: torch.nn.Module) -> None:
        """Write the whole stored tables into ``model`` (evaluation scores each user with
        its own rows)."""
        state = model.state_dict()
        with torch.no_grad():
            for name, table in self.tables().items():
                state[name].copy_(torch.from_numpy(table))

    # -- Ray -------------------------------------------------------------------------------
    def to_ray(self) -> None:
        """Move the tables into a Ray actor (this process is connected to Ray): from now
        on every fetch and write, from any node, goes there."""
        import ray

        assert self._local is not None
        actor_cls = ray.remote(num_cpus=0)(_Tables)  # no CPU: it must not take a client slot
        self._actor = actor_cls.remote(self._local.snapshot())
        self._local = None

    def from_ray(self) -> None:
        """Take the tables back from the actor (before Ray stops) and end it."""
        import ray

        if self._actor is None:
            return
        tables = self.tables()
        ray.kill(self._actor)
        self._actor, self._local = None, _Tables(tables)

    def __getstate__(self) -> dict[str, Any]:
        # To a Ray worker the store is its actor handle; the tables are never pickled
        # with a client's spec.
        if self._actor is None:
            raise TypeError("an in-process UserStateStore is not sent anywhere: call "
                            "to_ray() first")
        return {"_local": None, "_actor": self._actor}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class MessageRows:
    """The per-user rows of one message's users: fetched in one call before training,
    the trained ones written back in one call after."""

    names: tuple[str, ...]
    users: list[int]
    rows: dict[str, np.ndarray]  # table -> (len(users), ...) as fetched
    trained: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def fetch(cls, store: UserStateStore, model: FederatedModel, users: Sequence[int]
              ) -> MessageRows:
        return cls(user_state_names(model), list(users), store.fetch(users))

    def load_into(self, model: torch.nn.Module, user: int) -> None:
        """Write ``user``'s stored rows into its row of the model's per-user tables."""
        at = self.users.index(user)
        state = model.state_dict()
        with torch.no_grad():
            for name in self.names:
                state[name][user].copy_(torch.from_numpy(np.asarray(self.rows[name][at])))

    def keep(self, model: torch.nn.Module, user: int) -> None:
        """Note ``user``'s rows after its training, for :meth:`write_back`."""
        state = model.state_dict()
        self.trained[user] = {n: state[n][user].detach().cpu().numpy().copy() for n in self.names}

    def write_back(self, store: UserStateStore) -> None:
        users = sorted(self.trained)
        store.write(users, {n: np.stack([self.trained[u][n] for u in users]) for n in self.names}
                    if users else {})
