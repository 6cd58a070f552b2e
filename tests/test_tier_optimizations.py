"""RF²'s tier-aware optimizations and the strategies, end to end through the Flower apps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_run

from rf2.cli.support import run_job
from rf2.core.config import load_run_config
from rf2.core.errors import ConfigError


def run(tmp_path: Path, name: str, **overrides: object) -> list[dict]:
    cfg = small_run(**{"num_rounds": 3, "devices.profile": "rf2-3tier", **overrides})
    out = tmp_path / name
    run_job(cfg, out)
    with open(out / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def totals(rows: list[dict], key: str) -> float:
    return sum(r.get(key, 0) for r in rows[1:])


def test_exclude_low_trains_no_low_tier_client(tmp_path: Path) -> None:
    rows = run(tmp_path, "ex", **{"optimization.exclude_tiers": ["low"]})
    assert totals(rows, "tier/low/trained") == 0
    assert totals(rows, "tier/low/selected") == 0
    assert totals(rows, "tier/mid/trained") > 0 and totals(rows, "tier/high/trained") > 0


def test_quantize_and_prune_cut_the_low_tiers_upload(tmp_path: Path) -> None:
    # Whole-model replies: every element is a value the compressor sees.
    dense = {"simulation.sparse_updates": False}
    plain = run(tmp_path, "plain", **dense)
    quant = run(tmp_path, "quant", **{"optimization.quant_bits": {"low": 8}}, **dense)
    prune = run(tmp_path, "prune", **{"optimization.prune_rate": {"low": 0.9}}, **dense)

    def per_client(rows: list[dict], tier: str) -> float:
        return totals(rows, f"tier/{tier}/bytes_up") / totals(rows, f"tier/{tier}/trained")

    full = per_client(plain, "low")
    # 8 bits per element plus an 8-byte (min, step) header per tensor.
    assert per_client(quant, "low") == pytest.approx(full / 4, rel=0.03)
    assert per_client(prune, "low") < 0.2 * full
    # Untouched tiers keep the full upload.
    assert per_client(quant, "high") == pytest.approx(per_client(plain, "high"))
    assert quant[-1]["recall@20"] > quant[0]["recall@20"]
    # Sparse replies (the default) ship the changed rows; compression then shrinks their
    # values, not the row ids.
    small = {"model.name": "two_tower", "model.loss": "sampled", "model.num_negatives": 10}
    sparse_plain = run(tmp_path, "sparse", **small)
    sparse_quant = run(tmp_path, "squant", **small, **{"optimization.quant_bits": {"low": 8}})
    assert per_client(sparse_plain, "low") < 0.5 * full
    assert per_client(sparse_quant, "low") < 0.6 * per_client(sparse_plain, "low")


def test_over_select_keeps_k_of_more_selected(tmp_path: Path) -> None:
    rows = run(tmp_path, "over", **{"optimization.overselect": 0.5, "round.dropout": False,
                                    "round.availability": False})
    for r in rows[1:]:
        assert r["num_clients_selected"] == 30
        assert r["num_clients_trained"] == 20


def test_heterofl_and_per_row_averaging_train(tmp_path: Path) -> None:
    hetero = run(tmp_path, "hetero", **{"optimization.width": {"low": 0.25, "mid": 0.5}})
    assert totals(hetero, "tier/low/trained") > 0
    assert hetero[-1]["recall@20"] > hetero[0]["recall@20"]
    low_down = totals(hetero, "tier/low/bytes_down") / totals(hetero, "tier/low/trained")
    high_down = totals(hetero, "tier/high/bytes_down") / totals(hetero, "tier/high/trained")
    assert low_down < 0.5 * high_down
    fsl = run(tmp_path, "fsl", **{"optimization.per_row_embedding_avg": True})
    assert fsl[-1]["recall@20"] > fsl[0]["recall@20"]


def test_heterofl_with_per_row_averaging_is_rejected() -> None:
    with pytest.raises(ConfigError, match="per_row_embedding_avg"):
        load_run_config(small_run(**{"optimization.width": {"low": 0.5},
                                     "optimization.per_row_embedding_avg": True}))


@pytest.mark.parametrize("strategy", [
    {"name": "fedprox", "proximal_mu": 0.1},
    {"name": "qffl", "q": 1.0},
    {"name": "qffl", "q": 1.0, "server_optimizer": "none"},
    {"name": "fedavg", "server_optimizer": "yogi"},
    {"name": "qffl", "q": 1.0, "server_optimizer": "momentum"},
])
def test_strategies_run_end_to_end(tmp_path: Path, strategy: dict) -> None:
    rows = run(tmp_path, "s", strategy=strategy, **{"client.local_epochs": 2})
    assert rows[-1]["recall@20"] > rows[0]["recall@20"]


def test_deadline_under_represents_the_low_tier(tmp_path: Path) -> None:
    rows = run(tmp_path, "deadline", **{"round.deadline_quantile": 0.6, "num_rounds": 4})
    completed = {t: totals(rows, f"tier/{t}/completed") for t in ("low", "mid", "high")}
    dropped = {t: totals(rows, f"tier/{t}/dropped_deadline") for t in ("low", "mid", "high")}
    share_low = completed["low"] / sum(completed.values())
    assert share_low < 0.2  # population share is 1/3
    assert dropped["low"] > dropped["high"]
    assert all(r["sim_time_s"] > 0 for r in rows[1:])
    assert [r["sim_time_s"] for r in rows[1:]] == sorted(r["sim_time_s"] for r in rows[1:])
