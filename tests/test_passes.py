"""Passes ("global epochs"): the selector counts them, rows log them, analysis aligns on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rf2.analysis.results import fairness_gap_table, load
from rf2.core.config import RunConfig
from rf2.core.typed import to_dict
from rf2.fl.selection import ClientSelector


def _online(ids: np.ndarray) -> np.ndarray:
    return np.ones(len(ids), dtype=bool)


def test_selector_counts_a_pass_in_the_round_that_ends_it() -> None:
    sel = ClientSelector(np.arange(10), seed=1)
    done = []
    for _ in range(5):
        sel.select(4, _online)
        done.append(sel.passes_completed)
    # 4, 8, 12 (pass 1 ends in round 3), 16, 20 (pass 2 ends exactly at round 5)
    assert done == [0, 0, 1, 1, 2]


def _write(folder: Path, opt: str, pop: str, rows: list[dict]) -> None:
    cfg = RunConfig(seed=1)
    cfg.optimization.name = opt
    cfg.population.mode = pop  # type: ignore[assignment]
    cfg.population.leak_test = pop == "rf2-dirichlet"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _rows(pass_rounds: list[int], value: dict[int, float], n: int) -> list[dict]:
    """Rounds 0..n; pass k ends at pass_rounds[k-1]; tier metric at the given rounds."""
    rows = []
    for r in range(n + 1):
        row: dict = {"round": r, "pass": sum(r >= e for e in pass_rounds)}
        if r in value:
            for t, f in (("low", 1.0), ("high", 2.0)):
                row[f"tier/{t}/rated_auc"] = value[r] * f
        rows.append(row)
    return rows


def test_fairness_at_pass_compares_after_the_same_pass(tmp_path: Path) -> None:
    # none: pass 1 ends at round 3; exclude-low (fewer clients) at round 2.
    for pop in ("rf2-random", "rf2-dirichlet"):
        _write(tmp_path / pop / "none", "none", pop, _rows([3, 6], {3: 0.5, 5: 0.9, 6: 0.6}, 6))
        low_drop = {2: (0.4, 0.5), 4: (0.1, 0.1)}  # (low, high) at its pass ends
        rows = _rows([2, 4], {}, 4)
        for r, (lo, hi) in low_drop.items():
            rows[r]["tier/low/rated_auc"] = lo
            rows[r]["tier/high/rated_auc"] = hi
        _write(tmp_path / pop / "ex", "exclude-low", pop, rows)
    df = load(tmp_path)
    assert set(df["tiering"]) == {"rf2-random", "rf2-dirichlet-leaky"}
    t = fairness_gap_table(df, "rated_auc", at="pass:1", population_column="tiering",
                           realistic="rf2-dirichlet-leaky", independent="rf2-random")
    per = t.per_tier.set_index(["population", "tier"])
    # reference at pass 1 = round 3 (low 0.5, high 1.0); exclude-low at round 2
    assert per.loc[("rf2-random", "low"), "round"] == 2
    assert per.loc[("rf2-random", "low"), "reference_round"] == 3
    assert per.loc[("rf2-random", "low"), "d"] == pytest.approx(0.4 / 0.5 - 1)
    assert per.loc[("rf2-random", "high"), "d"] == pytest.approx(0.5 / 1.0 - 1)
    assert t.mdac["mdac"].tolist() == pytest.approx([0.3, 0.3])
    t2 = fairness_gap_table(df, "rated_auc", at="pass:2", population_column="tiering",
                            realistic="rf2-dirichlet-leaky", independent="rf2-random")
    per2 = t2.per_tier.set_index(["population", "tier"])
    assert per2.loc[("rf2-random", "low"), "reference_round"] == 6  # first evaluated >= pass 2
    assert per2.loc[("rf2-random", "low"), "d"] == pytest.approx(0.1 / 0.6 - 1)


def test_run_logs_passes_evaluates_at_pass_ends_and_stops_after_num_passes(
        tmp_path: Path) -> None:
    from conftest import read_rows, small_run

    from rf2.cli.support import run_job

    cfg = small_run(num_rounds=50, num_passes=2, clients_per_round=40,
                    devices={"profile": "rf2-3tier"},
                    population={"mode": "rf2-dirichlet", "leak_test": True},
                    dataset={"name": "synthetic", "num_users": 100, "num_items": 80,
                             "num_groups": 4, "protocol": "rf2"},
                    eval={"ks": [10, 20], "every": 1000, "at_pass_end": True},
                    round={"availability": False, "dropout": False})
    run = run_job(cfg, tmp_path / "run")
    rows = read_rows(run)
    # 100 users (all with train clicks), 40 per round: pass 1 ends in round 3, pass 2 in 5
    assert [r["pass"] for r in rows] == [0, 0, 0, 1, 1, 2]
    assert [r["pass_end"] for r in rows] == [0, 0, 0, 1, 0, 1]
    evaluated = [r["round"] for r in rows if "tier/low/rated_auc" in r]
    assert evaluated == [0, 3, 5]
    assert 0.0 <= rows[-1]["rated_auc"] <= 1.0 and rows[-1]["rated_samples"] > 0
    # tiers.csv reads back as the same map, and the same run from it gives the same rows
    tiers = (run / "tiers.csv").read_text().splitlines()
    assert tiers[0] == "user_id,tier" and len(tiers) == 101
    pop = json.loads((run / "population.json").read_text())
    assert pop["tiering"]["leak_test"] is True and pop["tiering"]["uses_test_clicks"] is True
    again = dict(cfg, population={"mode": "from-file", "path": str(run / "tiers.csv")})
    rows2 = read_rows(run_job(again, tmp_path / "again"))
    key = "tier/low/rated_auc"
    assert [r.get(key) for r in rows] == [r.get(key) for r in rows2]
    assert (tmp_path / "again" / "tiers.csv").read_text() == (run / "tiers.csv").read_text()


def test_pass_study_tables_and_figure(tmp_path: Path) -> None:
    from rf2.analysis.figures import main
    from rf2.analysis.results import pass_study_tables

    for pop, f in (("rf2-random", 1.0), ("rf2-dirichlet", 2.0)):
        _write(tmp_path / pop / "none", "none", pop, _rows([3, 6], {3: 0.5, 6: 0.6}, 6))
        rows = _rows([2, 4], {}, 4)
        for r, (lo, hi) in {2: (0.4, 1.0 - 0.5 * 0.1 * f), 4: (0.3, 1.2)}.items():
            rows[r]["tier/low/rated_auc"] = lo
            rows[r]["tier/high/rated_auc"] = hi
        _write(tmp_path / pop / "ex", "exclude-low", pop, rows)
    tables = pass_study_tables(load(tmp_path), "rated_auc", passes=(1, 2))
    # pass 1: D_low = 0.4/0.5 - 1 = -0.2; D_high = (1 - 0.05 f)/1.0 - 1 = -0.05 f
    m = tables.mdac.set_index(["pass", "tiering"])["mdac"]
    assert m[(1, "rf2-random")] == pytest.approx(0.15)
    assert m[(1, "rf2-dirichlet-leaky")] == pytest.approx(0.1)
    r = tables.ratio.set_index(["pass", "realistic"])["ratio"]
    assert r[(1, "rf2-dirichlet-leaky")] == pytest.approx(0.1 / 0.15)
    assert main([str(tmp_path), "--passes", "1,2", "--metric", "rated_auc",
                 "--formats", "png"]) == 0
    assert (tmp_path / "figures" / "pass_study_rated_auc.png").is_file()
    assert (tmp_path / "figures" / "pass_mdac_ratio_rated_auc.csv").is_file()
