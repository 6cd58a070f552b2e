"""``mode=central``: pooled training into the same run folder and metric rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, small_run, without_timing

from rf2.analysis.results import load
from rf2.cli.support import run_job
from rf2.core.config import CentralConfig, DatasetConfig, ModelConfig
from rf2.data import load_dataset
from rf2.model import build_model, user_examples
from rf2.model.central import CentralTrainer, pooled_examples


def _central(**overrides: object) -> dict:
    cfg = small_run(mode="central", **{"central.epochs": 2, "central.evals_per_epoch": 2,
                                       "checkpoint_every": 1, "model.name": "two_tower"})
    cfg["dataset"].update({"num_users": 300, "num_items": 120, "num_groups": 4})
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def test_pooled_examples_are_the_clients_examples() -> None:
    ds = load_dataset(DatasetConfig(num_users=40, num_items=30, num_groups=3), seed=1)
    hist, tgt = pooled_examples(ds)
    parts = [user_examples(ds, u) for u in range(ds.num_users)]
    assert np.array_equal(hist, np.concatenate([h for h, _ in parts]))
    assert np.array_equal(tgt, np.concatenate([t for _, t in parts]))


def test_eval_steps_and_examples_seen() -> None:
    ds = load_dataset(DatasetConfig(num_users=40, num_items=30, num_groups=3), seed=1)
    hist, tgt = pooled_examples(ds)
    n = len(tgt)
    model = build_model(ModelConfig(name="two_tower", dim=8), ds, seed=1)
    trainer = CentralTrainer(model, hist, tgt, CentralConfig(epochs=2, batch_size=64,
                                                             evals_per_epoch=3), seed=1)
    spe = -(-n // 64)
    assert trainer.steps_per_epoch == spe
    points = trainer.eval_steps()
    assert len(points) == 6 and points[2] == spe and points[-1] == 2 * spe
    assert trainer.examples_seen(spe) == n and trainer.examples_seen(2 * spe) == 2 * n
    loss, seen = trainer.train_until(points[0])
    assert seen == trainer.examples_seen(points[0]) == min(points[0] * 64, n)
    assert np.isfinite(loss) and trainer.step == points[0]


def test_central_run_learns_beyond_popularity_with_per_tier_rows(tmp_path: Path) -> None:
    run = run_job(_central(**{"devices.profile": "rf2-3tier"}), tmp_path / "c")
    rows = read_rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["epoch"] for r in rows] == [0.0, pytest.approx(rows[1]["step"] / rows[2]["step"]),
                                         1.0, pytest.approx(rows[3]["step"] / rows[2]["step"]), 2.0]
    assert rows[-1]["examples_seen"] == 2 * rows[2]["examples_seen"]
    popularity = rows[0]["popularity/recall@20"]
    assert rows[-1]["recall@20"] > popularity + 0.05 > rows[0]["recall@20"]
    for tier in ("low", "mid", "high"):
        assert f"tier/{tier}/recall@20" in rows[-1]
    assert rows[-1]["train/loss"] < rows[1]["train/loss"]
    assert {"population.json", "data.json", "model.pt", "DONE"} <= {p.name for p in run.iterdir()}


def test_central_last_evaluation_scores_final_max_users(tmp_path: Path) -> None:
    run = run_job(_central(eval={"ks": [10, 20], "max_users": 40, "final_max_users": 0,
                                 "metrics": ["recall"]}), tmp_path / "c")
    users = [r["eval_users"] for r in read_rows(run)]
    assert users[:-1] == [40] * (len(users) - 1) and users[-1] > 40


def test_central_resume_repeats_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = _central(**{"model.name": "hier_index", "model.loss": "sampled",
                      "model.num_negatives": 20})
    full = run_job(cfg, tmp_path / "full")
    # A run killed after round 3: its last checkpoint is round 3, rows after it are gone.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "round_000004")
    (cut / "DONE").unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][:20])  # torn row 4
    run_job({**cfg, "resume": str(cut)}, tmp_path / "unused")
    assert without_timing(read_rows(cut)) == without_timing(read_rows(full))


def test_federated_and_central_in_one_frame(tmp_path: Path) -> None:
    run_job(_central(), tmp_path / "runs" / "central")
    fed = small_run(**{"model.name": "two_tower", "num_rounds": 2})
    fed["dataset"].update({"num_users": 300, "num_items": 120, "num_groups": 4})
    run_job(fed, tmp_path / "runs" / "federated")
    df = load(tmp_path / "runs")
    assert set(df["mode"]) == {"central", "federated"}
    last = df[(df["metric"] == "recall@20")].groupby("mode")["round"].max()
    assert last.to_dict() == {"central": 4, "federated": 2}


def test_central_learns_beyond_popularity_on_ml100k(ml100k: Path, tmp_path: Path) -> None:
    cfg = small_run(mode="central", **{"central.epochs": 2, "model.name": "two_tower",
                                       "model.dim": 64, "eval.ks": [20]})
    cfg["dataset"] = {"name": "movielens100k", "path": str(ml100k)}
    rows = read_rows(run_job(cfg, tmp_path / "ml"))
    popularity = rows[0]["popularity/recall@20"]
    assert popularity == pytest.approx(0.1585, abs=1e-3)
    # measured: 0.258 after 2 epochs (Adam 0.01, batch 256)
    assert rows[-1]["recall@20"] > popularity + 0.05


def test_central_auto_loss_gets_central_num_negatives_and_federated_keeps_its_own(
        tmp_path: Path) -> None:
    """``model.loss=auto`` above ``auto_sampled_above``: central trains with
    ``central.num_negatives`` (capped at the catalogue), a federated run with
    ``model.num_negatives``; an explicit ``model.loss=sampled`` keeps its own."""
    import yaml

    auto = {"model.auto_sampled_above": 100, "model.num_negatives": 20}  # 150 items
    cases = {"central": ({"mode": "central", "central.num_negatives": 120}, 120),
             "capped": ({"mode": "central"}, 150),  # default 2000 > 150 items
             "explicit": ({"mode": "central", "model.loss": "sampled"}, 20),
             "federated": ({"central.num_negatives": 120}, 20)}
    for name, (extra, negatives) in cases.items():
        run = run_job(small_run(num_rounds=1, **auto, **extra), tmp_path / name)
        saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
        assert saved["num_negatives"] == negatives, name
