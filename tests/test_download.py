"""Download accounting: with sparse replies a client downloads the rows its loss reads
(history items, targets, negatives) and the dense parameters; else the whole model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from conftest import read_rows, small_run

from rf2.cli.support import run_job
from rf2.core.config import DatasetConfig, ModelConfig, OptimizationConfig
from rf2.data import load_dataset
from rf2.fl.client import training_seed
from rf2.fl.download import DownloadSizes
from rf2.fl.tier_settings import TierSettings
from rf2.model import build_model, user_examples
from rf2.model.cohort import ClientJob, train_cohort


def _setup(loss: str, width: float = 1.0):  # noqa: ANN202
    ds = load_dataset(DatasetConfig(num_users=40, num_items=300, num_groups=4), seed=1)
    model = build_model(ModelConfig(name="two_tower", dim=8, loss=loss, num_negatives=11), ds, 1)
    tier_of_user = (np.arange(ds.num_users) % 2).astype(np.int64)
    # What TierSettings reads of a population: the tiers and who is in which.
    population = SimpleNamespace(tier_of_user=tier_of_user, tier_names=("low", "high"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    opt = OptimizationConfig(width={"low": width} if width < 1 else {})
    tiers = TierSettings(opt, population, shapes, 8, model.width_rules())  # type: ignore[arg-type]
    return ds, model, tiers


def test_sparse_download_is_the_rows_training_reads() -> None:
    ds, model, tiers = _setup("sampled")
    sizes = DownloadSizes(model, ds, tiers, run_seed=5, num_rounds=3, sparse=True)
    users = np.array([2, 4, 9])
    got = sizes.for_users(users, server_round=2)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    for user, size in zip(users.tolist(), got.tolist(), strict=True):
        h, t = user_examples(ds, user)
        # What the cohort trains on is exactly what the client downloads.
        [update] = train_cohort(model, arrays, [ClientJob(h, t, training_seed(5, user, 2))],
                                lr=0.5, local_epochs=1, batch_size=0)
        row_values = sum(len(update.rows[n]) * arrays[n][0].size for n in update.rows)
        dense = sum(a.size for n, a in arrays.items() if n not in update.rows)
        assert size == 4 * (row_values + dense)
        assert size < tiers.bytes_down[tiers.tier_of(user)]
    dense_sizes = DownloadSizes(model, ds, tiers, 5, 3, sparse=False).for_users(users, 2)
    np.testing.assert_array_equal(dense_sizes, tiers.bytes_down[[0, 0, 1]])


def test_full_softmax_downloads_the_whole_candidate_tables_at_the_tier_width() -> None:
    ds, model, tiers = _setup("full", width=0.5)
    [low, high] = DownloadSizes(model, ds, tiers, 5, 3, sparse=True).for_users(
        np.array([0, 1]), server_round=1)
    for user, size, dim in ((0, low, 4), (1, high, 8)):
        h, _ = user_examples(ds, user)
        history_rows = len(np.unique(h[h >= 0]))
        genres = model.genre_table.shape[0] if model.genre_table is not None else 0
        want = 4 * (ds.num_items * (dim + 1) + history_rows * dim + genres * dim)
        assert size == want


def test_run_rows_report_sparse_downloads(tmp_path: Path) -> None:
    over = {"model.name": "two_tower", "model.loss": "sampled", "model.num_negatives": 10,
            "dataset.num_items": 400, "num_rounds": 2}
    sparse = read_rows(run_job(small_run(**over), tmp_path / "s"))
    dense = read_rows(run_job(small_run(**{**over, "simulation.sparse_updates": False}),
                              tmp_path / "d"))
    model_bytes = sum(v.numel() * 4 for v in torch.load(tmp_path / "d" / "model.pt").values())
    for s, d in zip(sparse[1:], dense[1:], strict=True):
        assert d["bytes_down"] == d["num_clients_trained"] * model_bytes
        assert 0 < s["bytes_down"] < 0.5 * d["bytes_down"]
        assert s["sim_time_s"] <= d["sim_time_s"]  # the clock's download time follows
