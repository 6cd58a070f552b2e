"""Global models (no per-user parameters) and the examples a client trains them on.

May import: rf2.core, rf2.data and torch (never Flower or Ray).
"""

from __future__ import annotations

from rf2.core.config import ModelConfig
from rf2.data.base import FederatedDataset
from rf2.model.examples import PAD, eval_histories, user_examples
from rf2.model.hier_index import HierIndexModel
from rf2.model.retrieval import (
    BeamSearchRetriever,
    BruteForceRetriever,
    FaissIVFRetriever,
    RetrievalResult,
    Retriever,
)
from rf2.model.two_tower import TwoTower


def build_model(cfg: ModelConfig, dataset: FederatedDataset, seed: int) -> TwoTower:
    """The global model named by ``cfg.name``, initialised deterministically from ``seed``.

    ``hier_index`` is a :class:`TwoTower` subclass (same tower parameters, plus the
    index's node embeddings), so everything that handles a two-tower handles it.
    """
    cls = HierIndexModel if cfg.name == "hier_index" else TwoTower
    return cls(dataset.num_items, cfg, dataset.item_genres, dataset.history_len, seed=seed)


__all__ = [
    "PAD",
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
