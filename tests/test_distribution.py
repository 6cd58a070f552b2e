"""Per-user fairness distributions (rf2.eval.distribution) against plain NumPy references
on hand-made arrays, their keys in the evaluator's row, participation Gini, and the
analysis layer's reading (rf2.analysis.results.distributions / user_cdf, the CDF figure)."""

from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml
from conftest import read_rows, small_run

from rf2.analysis.figures import plot_user_cdf
from rf2.analysis.results import ALL_USERS, ResultsError, distributions, load, user_cdf
from rf2.core.config import DatasetConfig, RunConfig
from rf2.core.typed import to_dict
from rf2.eval.distribution import (
    CDF_GRID,
    cdf_at,
    distribution_row,
    gini,
    participation_row,
    summary,
    tail_mean,
)
from rf2.fl.participation import Participation

matplotlib.use("Agg")


def gini_reference(x: np.ndarray) -> float:
    """Mean absolute difference over twice the mean (the textbook double sum)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean()))


def tail_reference(x: np.ndarray, top: bool) -> float:
    k = max(1, math.ceil(0.1 * x.size))
    s = np.sort(x)
    return float((s[-k:] if top else s[:k]).mean())


CASES = [
    np.array([0.0, 0.0, 0.0, 1.0]),  # one user has everything: (n-1)/n
    np.array([0.2, 0.4, 0.4, 0.9, 0.1, 0.0, 0.0, 0.3, 0.25, 0.7, 0.05]),
    np.array([3.0, 1.0, 2.0]),
    np.arange(1.0, 26.0),  # 25 values: the tails hold ceil(2.5) = 3
]


@pytest.mark.parametrize("x", CASES)
def test_gini_and_tails_equal_the_numpy_reference(x: np.ndarray) -> None:
    assert gini(x) == pytest.approx(gini_reference(x), abs=1e-12)
    assert tail_mean(x) == pytest.approx(tail_reference(x, top=False))
    assert tail_mean(x, top=True) == pytest.approx(tail_reference(x, top=True))
    s = summary(x, hit_metric=True)
    assert s["std"] == pytest.approx(np.std(x))
    assert s["no_hit"] == pytest.approx(np.mean(x == 0))
    assert cdf_at(x) == pytest.approx([np.mean(x <= g) for g in CDF_GRID])


def test_gini_closed_forms_and_edge_cases() -> None:
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)
    assert gini([5, 5, 5]) == 0.0
    assert gini([0, 0]) == 0.0  # all zero: equal
    assert math.isnan(gini([]))
    assert math.isnan(gini([1.0, -0.5]))  # undefined for negative values
    assert gini([1.0, np.nan, 0.0]) == pytest.approx(gini([1.0, 0.0]))  # NaN dropped
    assert "no_hit" not in summary([0.5, 0.7])  # only hit metrics get it
    assert all(math.isnan(v) for v in summary([np.nan], hit_metric=True).values())


def test_distribution_row_per_tier_matches_a_reference() -> None:
    rng = np.random.default_rng(0)
    recall = rng.choice([0.0, 0.25, 0.5, 1.0], size=40)
    recall[3] = np.nan  # a user the metric does not apply to
    loss = rng.uniform(1, 5, size=40)
    tiers = np.arange(40) % 3
    row = distribution_row({"recall@20": recall, "loss": loss}, tiers, ["low", "mid", "high"])
    for t, name in enumerate(["low", "mid", "high"]):
        r = recall[(tiers == t) & ~np.isnan(recall)]
        assert row[f"dist/tier/{name}/recall@20/std"] == pytest.approx(r.std())
        assert row[f"dist/tier/{name}/recall@20/gini"] == pytest.approx(gini_reference(r))
        assert row[f"dist/tier/{name}/recall@20/no_hit"] == pytest.approx(np.mean(r == 0))
        assert row[f"dist/tier/{name}/recall@20/bottom10"] == pytest.approx(
            tail_reference(r, top=False))
        assert row[f"dist/tier/{name}/recall@20/cdf_0.50"] == pytest.approx(np.mean(r <= 0.5))
        lt = loss[tiers == t]
        assert row[f"dist/tier/{name}/loss/top10"] == pytest.approx(tail_reference(lt, top=True))
        assert f"dist/tier/{name}/loss/no_hit" not in row
    r = recall[~np.isnan(recall)]
    assert row["dist/recall@20/gini"] == pytest.approx(gini_reference(r))
    assert row["dist/recall@20/cdf_0.00"] == pytest.approx(np.mean(r == 0))
    assert row["dist/recall@20/cdf_1.00"] == 1.0
    assert "dist/loss/cdf_0.50" not in row  # CDFs only for CDF_METRICS
    with pytest.raises(ValueError, match="recall@20: 40 values for 39 users"):
        distribution_row({"recall@20": recall}, tiers[:39], ["low", "mid", "high"])


def test_participation_counts_and_gini() -> None:
    counter = Participation(6)
    counter.record([0, 1, 2], [0, 1])
    counter.record([3, 0], [3, 0])
    assert counter.selected.tolist() == [2, 1, 1, 1, 0, 0]
    assert counter.trained.tolist() == [2, 1, 0, 1, 0, 0]
    tiers = np.array([0, 0, 0, 1, 1, 1])
    row = counter.row(tiers, ["low", "high"])
    assert row["dist/selections/gini"] == pytest.approx(gini_reference(counter.selected))
    assert row["dist/trainings/gini"] == pytest.approx(gini_reference(counter.trained))
    assert row["dist/tier/low/selections/gini"] == pytest.approx(gini_reference([2, 1, 1]))
    assert row["dist/tier/high/trainings/gini"] == pytest.approx(2 / 3)  # [1, 0, 0]
    other = Participation(6)
    other.load(counter.arrays())
    assert other.row(tiers, ["low", "high"]) == row
    with pytest.raises(ValueError, match="5 users, the run has 6"):
        other.load({"selected": np.zeros(5)})
    assert participation_row(np.zeros(3), np.zeros(3))["dist/selections/gini"] == 0.0


def test_evaluator_row_holds_the_distribution_of_its_per_user_values() -> None:
    from rf2.data import load_dataset
    from rf2.eval.evaluation import Evaluator

    dataset = load_dataset(DatasetConfig(num_users=60, num_items=40, num_groups=4), seed=1)
    tiers = np.arange(dataset.num_users) % 3
    evaluator = Evaluator(dataset, [20], 16, tiers, ["low", "mid", "high"])
    rng = np.random.default_rng(2)
    n = len(evaluator.users)
    per_user = {"recall@20": rng.choice([0.0, 0.5, 1.0], size=n), "auc": rng.uniform(size=n)}
    row = evaluator.summarise(per_user)
    user_tiers = tiers[evaluator.users]
    want = distribution_row(per_user, user_tiers, ["low", "mid", "high"])
    assert {k: row[k] for k in want} == want
    low = per_user["recall@20"][user_tiers == 0]
    assert row["dist/tier/low/recall@20/std"] == pytest.approx(low.std())
    quiet = Evaluator(dataset, [20], 16, tiers, ["low", "mid", "high"], distributions=False)
    assert not any(k.startswith("dist/") for k in quiet.summarise(per_user))


def write_run(folder: Path, population: str, seed: int, shift: float) -> None:
    config = RunConfig(seed=seed, num_rounds=2)
    config.population.mode = population  # type: ignore[assignment]
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    rows = []
    for rnd in range(3):
        row: dict = {"round": rnd, "recall@20": 0.1 * rnd}
        for tier, base in (("low", 0.6), ("high", 0.2)):
            for x in CDF_GRID:
                row[f"dist/tier/{tier}/recall@20/cdf_{x:.2f}"] = min(1.0, base + shift + x / 2)
            row[f"dist/tier/{tier}/index/recall@20/gini"] = base
        row["dist/recall@20/gini"] = 0.5 + rnd
        row["dist/selections/gini"] = 1.0 - 0.1 * rnd
        rows.append(row)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for i, (pop, seed) in enumerate(product(("independent", "popularity-dirichlet"), (1, 2))):
        write_run(tmp_path / str(i), pop, seed, shift=0.1 * seed)
    return tmp_path


def test_analysis_splits_distribution_keys(sweep: Path) -> None:
    d = distributions(sweep)
    gini_all = d[(d["metric"] == "recall@20") & (d["stat"] == "gini")]
    assert set(gini_all["tier"]) == {ALL_USERS}
    assert sorted(gini_all[gini_all["run"] == "0"]["value"]) == [0.5, 1.5, 2.5]
    nested = d[d["metric"] == "index/recall@20"]  # a metric with a slash keeps it
    assert set(nested["tier"]) == {"low", "high"} and set(nested["stat"]) == {"gini"}
    part = distributions(sweep, metric="selections", stat="gini")
    assert len(part) == 4 * 3 and set(part["tier"]) == {ALL_USERS}
    assert "population" in d  # config columns kept


def test_user_cdf_and_its_figure(sweep: Path) -> None:
    cdf = user_cdf(load(sweep))
    assert set(cdf["round"]) == {2}
    low = cdf[(cdf["run"] == "0") & (cdf["tier"] == "low")]
    assert low["x"].tolist() == list(CDF_GRID)
    assert low["share"].iloc[0] == pytest.approx(0.7)  # base 0.6 + shift 0.1 at x = 0
    fig = plot_user_cdf(load(sweep))
    assert len(fig.axes) == 2  # one panel per population (one variant)
    assert len(fig.axes[0].lines) == 2  # low, high (no overall CDF logged here)
    with pytest.raises(ResultsError, match="cdf_"):
        user_cdf(load(sweep), metric="ndcg@20")


@pytest.mark.slow
def test_run_logs_distributions_and_participation(tmp_path: Path) -> None:
    from rf2.cli.support import run_job

    cfg = small_run(num_rounds=3, **{"round.availability": False, "round.dropout": False,
                                     "devices.profile": "rf2-3tier"})
    run_dir = run_job(cfg, tmp_path / "run")
    rows = read_rows(run_dir)
    last = rows[-1]
    for tier in ("low", "mid", "high"):
        for key in ("recall@20/std", "recall@20/gini", "recall@20/no_hit", "auc/top10",
                    "recall@20/cdf_0.00", "selections/gini"):
            assert f"dist/tier/{tier}/{key}" in last, key
    # No client is selected twice within a pass (200 users, 20 per round): counts are 0/1,
    # so the Gini of selections is 1 - selected so far / users.
    selected = 0
    for row in rows[1:]:
        selected += row["num_clients_selected"]
        assert row["dist/selections/gini"] == pytest.approx(1 - selected / 200)
    assert last["dist/recall@20/cdf_0.00"] == pytest.approx(last["dist/recall@20/no_hit"])
