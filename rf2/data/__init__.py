"""Dataset layer: files (or the synthetic generator) -> per-user, time-split clicks.

``load_dataset`` is the one entry point the rest of rf2 uses. It never downloads
anything: MovieLens and LightGCN files are read from ``cfg.path``, and every problem
with them is a :class:`rf2.core.errors.DataError` naming the file (and line).

May import: rf2.core (never Flower, Ray or torch).
"""

from __future__ import annotations

import dataclasses

from rf2.core.config import DatasetConfig
from rf2.core.errors import ConfigError
from rf2.data.base import FederatedDataset, Interactions, RatedSplit, Ratings
from rf2.data.lightgcn import load_lightgcn
from rf2.data.movielens import load_movielens1m, load_movielens20m, load_movielens100k
from rf2.data.plugin import load_target
from rf2.data.protocol import PROTOCOLS, drop_unclicked, split_rated
from rf2.data.recbole import RecBoleData, load_recbole
from rf2.data.split import n_train_for, split_interactions
from rf2.data.synthetic import SyntheticWorld, generate_synthetic

__all__ = [
    "FederatedDataset",
    "Interactions",
    "PROTOCOLS",
    "RatedSplit",
    "Ratings",
    "SyntheticWorld",
    "generate_synthetic",
    "load_dataset",
    "load_interactions",
    "n_train_for",
    "split_interactions",
]

_MOVIELENS = {
    "movielens100k": load_movielens100k,
    "movielens1m": load_movielens1m,
    "movielens20m": load_movielens20m,
}


def _raw_interactions(cfg: DatasetConfig, seed: int) -> Interactions:
    if cfg._target_:
        return load_target(cfg, seed)
    if cfg.name == "synthetic":
        return generate_synthetic(cfg, seed).interactions
    if cfg.name in _MOVIELENS:
        return _MOVIELENS[cfg.name](cfg.path, cfg.click_threshold)
    if cfg.name == "recbole":
        return _recbole(cfg, seed).interactions
    raise ValueError(f"dataset {cfg.name!r} has no unsplit interactions")


def load_interactions(cfg: DatasetConfig, seed: int) -> Interactions:
    """Thresholded clicks before splitting (not available for ``lightgcn``, pre-split).

    Under ``dataset.protocol=clicks`` users without clicks are dropped and no ratings
    are kept; under ``rf2`` every rated user and every rating stays (rf2.data.protocol).
    """
    inter = _raw_interactions(cfg, seed)
    if cfg.protocol == "rf2":
        return inter
    return drop_unclicked(inter)


def load_dataset(cfg: DatasetConfig, seed: int) -> FederatedDataset:
    """Load ``cfg.name`` and split it per user in time (see :mod:`rf2.data.split`).

    ``seed`` matters for ``synthetic`` and for the random split of ``recbole`` data
    without timestamps (``cfg.split_seed`` overrides it); other files are deterministic.
    ``lightgcn`` keeps its published train/test split instead of re-splitting.
    ``cfg._target_`` (the user's own loader, :mod:`rf2.data.plugin`) replaces the loader
    named by ``cfg.name``; protocol and split apply to its interactions as to any.
    """
    name = cfg._target_ or cfg.name
    if not cfg._target_:
        if cfg.name == "lightgcn":
            if cfg.protocol == "rf2":
                raise ConfigError("dataset.protocol", cfg.protocol,
                                  "'clicks' for lightgcn (pre-split clicks, no ratings)")
            return dataclasses.replace(load_lightgcn(cfg.path, cfg.history_len), split="given")
        if cfg.name == "recbole":
            return _split_recbole(cfg, seed)
        if cfg.name != "synthetic" and cfg.name not in _MOVIELENS:
            raise ValueError(f"unknown dataset {cfg.name!r}")
    inter = load_interactions(cfg, seed)
    if cfg.protocol == "rf2":
        if inter.ratings is None:
            raise ConfigError("dataset.protocol", cfg.protocol,
                              f"'clicks' for {name} (it has no ratings to label)")
        return split_rated(inter, name, cfg.train_fraction, cfg.history_len)
    return split_interactions(inter, name, cfg.train_fraction, cfg.history_len)


def _split_recbole(cfg: DatasetConfig, seed: int) -> FederatedDataset:
    data = _recbole(cfg, seed)
    if cfg.protocol == "rf2":  # needs the loader to have kept every rating
        if data.interactions.ratings is None:
            raise ConfigError("dataset.protocol", cfg.protocol,
                              "'clicks' for recbole data whose loader kept no ratings")
        ds = split_rated(data.interactions, cfg.name, cfg.train_fraction, cfg.history_len)
    else:
        ds = split_interactions(drop_unclicked(data.interactions), cfg.name,
                                cfg.train_fraction, cfg.history_len)
    split = "chronological" if data.has_timestamp else "random"
    return dataclasses.replace(ds, split=split, report=data.report)


def _recbole(cfg: DatasetConfig, seed: int) -> RecBoleData:
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    return load_recbole(cfg.path, cfg.name_in_dir, cfg.click_threshold, split_seed,
                        cfg.genre_field)
