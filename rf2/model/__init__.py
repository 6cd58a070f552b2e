"""rf2's models (the two-tower, its learned index, FCF with per-user state), the model
contract, and the examples a client trains them on.

May import: rf2.core, rf2.data and torch (never Flower or Ray).
"""

from __future__ import annotations

from rf2.core.config import ModelConfig
from rf2.core.errors import ConfigError
from rf2.data.base import FederatedDataset
from rf2.model.base import CANDIDATE, HISTORY, FederatedModel, resolve_target
from rf2.model.examples import PAD, eval_histories, user_examples
from rf2.model.fcf import FCF
from rf2.model.hier_index import HierIndexModel
from rf2.model.retrieval import (
    BeamSearchRetriever,
    BruteForceRetriever,
    FaissIVFRetriever,
    RetrievalResult,
    Retriever,
)
from rf2.model.two_tower import TwoTower

_BUILT_IN: dict[str, type[FederatedModel]] = {"two_tower": TwoTower, "hier_index": HierIndexModel,
                                            "fcf": FCF}
_ALLOWED = ("a dotted path to a rf2.model.base.FederatedModel subclass, or to a function "
            "(dataset, cfg, seed) returning one, importable in this Python "
            "(e.g. mylab.models.TiedTwoTower)")


def build_model(cfg: ModelConfig, dataset: FederatedDataset, seed: int) -> FederatedModel:
    """The global model, initialised deterministically from ``seed``: the user's
    ``cfg._target_`` when set, else rf2's model named by ``cfg.name``.

    Raises ConfigError naming ``model._target_`` when it cannot be imported or does not
    give a :class:`FederatedModel`.
    """
    if not cfg._target_:
        return _BUILT_IN[cfg.name].from_dataset(dataset, cfg, seed)
    try:
        target = resolve_target(cfg._target_)
    except Exception as ex:  # noqa: BLE001 - ImportError, AttributeError, ValueError...
        raise ConfigError("model._target_", cfg._target_,
                          f"{_ALLOWED}; it cannot be imported: {ex}") from ex
    if isinstance(target, type) and issubclass(target, FederatedModel):
        model = target.from_dataset(dataset, cfg, seed)
    elif callable(target) and not isinstance(target, type):
        model = target(dataset, cfg, seed)
    else:
        raise ConfigError("model._target_", cfg._target_, _ALLOWED)
    if not isinstance(model, FederatedModel):
        raise ConfigError("model._target_", cfg._target_,
                          f"{_ALLOWED}; it returned a {type(model).__name__}")
    return model


__all__ = [
    "CANDIDATE",
    "HISTORY",
    "PAD",
    "FCF",
    "FederatedModel",
    "BeamSearchRetriever",
    "BruteForceRetriever",
    "FaissIVFRetriever",
    "HierIndexModel",
    "RetrievalResult",
    "Retriever",
    "TwoTower",
    "build_model",
    "eval_histories",
    "user_examples",
]
