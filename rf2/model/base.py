"""The model contract: what rf2 asks of a federated recommender.

Everything outside a model's own module (sparse replies, HeteroFL, the vectorised
cohort, download accounting, evaluation, central mode) reads a model through these
methods, never through its parameter names. A model is an ``nn.Module`` whose
``state_dict`` is what the clients train and the server aggregates; on top of that it
says

* how it **scores** users against the catalogue (:meth:`score_users`) and what its
  **loss** is (:meth:`loss`, with the random items one client draws up front:
  :meth:`draw_sample`);
* which parameters are **row tables** indexed by item id, and by which ids a batch
  indexes them (:meth:`row_tables`, :meth:`rows_touched`): a client's reply (and its
  download) carries only those rows; every other parameter is **dense**
  (:meth:`dense_parameters`) and travels whole;
* its **HeteroFL width rules** (:meth:`width_rules`, :meth:`at_width`);
* whether rf2's **vectorised cohort** may train it (:meth:`cohort_unsupported_reason`);
  a model that does not declare it is trained user by user, and rf2 logs why once;
* optional **per-user state** (:meth:`user_state_names`): tables with one row per user
  that never leave the user's device (FCF's user vectors, ``rf2.model.fcf``); rf2 keeps
  each user's rows between rounds in its per-user state store (``rf2.fl.user_state``).

``model._target_`` (``rf2.core.config.ModelConfig``) names a subclass (or a function
returning an instance) in the user's own module; :func:`rf2.model.build_model` builds it
with :meth:`FederatedModel.from_dataset`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from rf2.core.arrays import sorted_unique

if TYPE_CHECKING:
    from rf2.core.config import ModelConfig
    from rf2.data.base import FederatedDataset

# Which item ids index a row table: a user's history items ("history") or the items its
# loss scores (targets, sampled negatives, the index's balance sample: "candidate").
Role = Literal["history", "candidate"]
HISTORY: Role = "history"
CANDIDATE: Role = "candidate"


class FederatedModel(nn.Module, ABC):
    """A federated recommender (see the module docstring for what each method is for)."""

    num_items: int

    # -- building ------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset: FederatedDataset, cfg: ModelConfig, seed: int
                     ) -> FederatedModel:
        """The model for ``dataset``, initialised deterministically from ``seed`` (every
        client and the server build it this way, so all start from the same weights)."""
        return cls(dataset.num_items, cfg, dataset.item_genres, dataset.history_len,
                   seed=seed)

    # -- scoring and training ------------------------------------------------------------
    @abstractmethod
    def score_users(self, histories: torch.Tensor, users: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(B, H) history item ids (PAD = -1) and optionally (B,) user ids -> (B, I)
        scores of every item, higher = more relevant. Evaluation and central mode rank
        with this; a model without per-user state ignores ``users``."""

    @abstractmethod
    def loss(self, history: torch.Tensor, target: torch.Tensor, sample: Any = None
             ) -> torch.Tensor:
        """Mean training loss of (B, H) histories predicting (B,) targets. ``sample``:
        what :meth:`draw_sample` drew for this client (None: draw fresh, central mode).

        A model with per-user state also takes ``users=``: the (B,) user id of each
        example (rf2 passes it to such models only)."""

    def draw_sample(self, generator: torch.Generator) -> Any:  # noqa: ANN401 - model's own
        """The random items one client's loss uses, drawn once per client and round from
        its own seed, so that the rows it touches are known before training. None: the
        loss draws nothing."""
        return None

    # -- the federated state -------------------------------------------------------------
    def row_tables(self) -> Mapping[str, frozenset[Role]]:
        """Parameters with one row per item (axis 0 of length ``num_items``) -> which
        ids index them.

        A table with both roles (e.g. one embedding table for history and candidates)
        is touched by the union. Default: none (every parameter travels whole).
        """
        return {}

    def candidate_rows(self, targets: np.ndarray, sample: Any) -> np.ndarray | None:  # noqa: ANN401
        """(R,) sorted ids of the candidate rows a client's loss reads: its targets plus
        the sample's items; None = the whole catalogue (e.g. a full softmax)."""
        return None

    def rows_touched(self, histories: np.ndarray, targets: np.ndarray, sample: Any
                     ) -> dict[str, np.ndarray]:  # noqa: ANN401
        """Row table -> (R,) sorted ids of the rows a client with these examples and
        loss sample reads (and so may change, and must download)."""
        history = sorted_unique(histories[histories >= 0]).astype(np.int64)
        candidate = self.candidate_rows(targets, sample)
        out: dict[str, np.ndarray] = {}
        for name, roles in self.row_tables().items():
            if CANDIDATE in roles and candidate is None:
                out[name] = np.arange(self.num_items, dtype=np.int64)
                continue
            parts = [history] if HISTORY in roles else []
            if CANDIDATE in roles and candidate is not None:
                parts.append(np.asarray(candidate, dtype=np.int64))
            out[name] = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return out

    def user_state_names(self) -> tuple[str, ...]:
        """Per-user tables: parameters whose axis 0 has one row per user (length
        ``dataset.num_users``), row u belonging to user u alone.

        rf2 never sends them to the server and never aggregates them: they are left out
        of the federated state (``rf2.fl.params.state_to_numpy``); a per-user state store
        (``rf2.fl.user_state``) holds them across rounds, starting from this model's
        initial values (so: deterministic from the run seed). Before a client trains,
        its user's rows are written into the model, and read back into the store after;
        :meth:`loss` then gets ``users=``. Evaluation, checkpoints and ``model.pt`` use
        the whole stored table, central mode trains it as any parameter."""
        return ()

    def fit_user_state(self, history: torch.Tensor, target: torch.Tensor, sample: Any,  # noqa: ANN401
                       users: torch.Tensor) -> None:
        """On-device update of a stateful model's per-user rows before the client's
        federated step (FCF fits the user's vector to the current item table), with the
        client's (B, H) histories, (B,) targets, loss sample and (B,) users. Local training
        calls it for models with per-user state only. It must change per-user rows only:
        a row table changes through its gradient alone (the per-user client path builds
        the reply from the rows that got one). Default: nothing."""

    def dense_parameters(self) -> list[str]:
        """Federated parameters that travel whole: neither row tables nor user state."""
        skip = set(self.row_tables()) | set(self.user_state_names())
        return [name for name in self.state_dict() if name not in skip]

    # -- HeteroFL --------------------------------------------------------------------------
    def width_rules(self) -> dict[str, tuple[int, ...]] | None:
        """Parameter -> the axes that shrink with a HeteroFL width (``rf2.optim.heterofl``);
        None: let HeteroFL guess from the shapes (``heterofl.default_rules``)."""
        return None

    def at_width(self, width: float) -> FederatedModel:
        """This model's HeteroFL sub-model at ``width`` in (0, 1): the same class whose
        parameters are the top-left slices that :meth:`width_rules` give."""
        raise NotImplementedError(f"{type(self).__name__} has no HeteroFL sub-model "
                                  "(implement at_width to train narrower tiers)")

    # -- training paths -----------------------------------------------------------------
    def cohort_unsupported_reason(self) -> str | None:
        """None when ``rf2.model.cohort`` may train this model (its maths are rf2's
        two-tower or index maths); else why not, and it trains user by user."""
        return (f"{type(self).__name__} does not declare cohort support (the cohort "
                "vectorises rf2's own two-tower maths only)")

    def set_training_progress(self, step: float, total_steps: float) -> None:
        """Schedules that follow the server round (default: none)."""


def resolve_target(path: str) -> Any:  # noqa: ANN401 - a class or a function
    """The object a dotted ``path`` names (``package.module.Name``)."""
    import importlib

    module, _, attr = path.rpartition(".")
    if not module:
        raise ImportError(f"{path!r} is not a dotted path (package.module.Name)")
    obj: Any = importlib.import_module(module)
    return getattr(obj, attr)
