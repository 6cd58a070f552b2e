"""rf2.analysis.results on a multirun folder fabricated here, with hand-checkable fairness numbers.

Sweep: optimization {none, exclude_low} x population {independent, popularity-dirichlet}
x seed {1, 2}; tiers low/mid/high; rounds 0..3. The reference ("none") reaches BASE at
round 3; the optimized run reaches BASE * (1 + D). Every value scales by (round + 1) / 4,
so D_t is the same at every round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rf2.analysis.results import (
    CONFIG_COLUMNS,
    ResultsError,
    ResultsWarning,
    fairness_gap_table,
    find_runs,
    load,
    load_population,
    load_wide,
    to_parquet,
)
from rf2.core.config import RunConfig
from rf2.core.errors import UserInputError
from rf2.core.typed import to_dict

TIERS = ("low", "mid", "high")
BASE = {"low": 0.1, "mid": 0.2, "high": 0.4}
POPULATIONS = ("independent", "popularity-dirichlet")
# D[population][seed] per tier; MDAC: independent 0.2, 0.4; realistic 0.8, 1.2.
D = {
    "independent": {1: (-0.1, 0.0, 0.1), 2: (-0.2, 0.0, 0.2)},
    "popularity-dirichlet": {1: (-0.5, 0.0, 0.3), 2: (-0.6, 0.0, 0.6)},
}
ROUNDS = 4
METRICS_PER_ROUND = 13  # wall_time_s, recall@20, ndcg@20, 3 x 3 tier keys, 1 fair key
ROWS_PER_RUN = METRICS_PER_ROUND * ROUNDS + 1  # + popularity/recall@20 in round 0


def rows_for(optimization: str, population: str, seed: int) -> list[dict]:
    d = dict(zip(TIERS, D[population][seed], strict=True))
    rows = []
    for r in range(ROUNDS):
        scale = (r + 1) / ROUNDS
        row: dict = {"round": r, "wall_time_s": 1.5 * r}
        for t in TIERS:
            final = BASE[t] if optimization == "none" else BASE[t] * (1 + d[t])
            row[f"tier/{t}/recall@20"] = final * scale
            dropped = optimization == "exclude_low" and t == "low"
            row[f"tier/{t}/completed"] = 0 if dropped or r == 0 else 4 + TIERS.index(t)
            row[f"tier/{t}/selected"] = 0 if r == 0 else 6
        tier_values = [row[f"tier/{t}/recall@20"] for t in TIERS]
        row["recall@20"] = sum(tier_values) / 3
        row["ndcg@20"] = row["recall@20"] / 2
        row["fair/recall@20/max_gap"] = max(tier_values) - min(tier_values)
        if r == 0:
            row["popularity/recall@20"] = 0.05
        rows.append(row)
    return rows


def write_run(folder: Path, optimization: str, population: str, seed: int) -> None:
    config = RunConfig(seed=seed, num_rounds=ROUNDS - 1, clients_per_round=18)
    config.optimization.name = optimization
    config.population.mode = population  # type: ignore[assignment]
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")  # not a run folder
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    lines = [json.dumps(r) for r in rows_for(optimization, population, seed)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "population.json").write_text(json.dumps({  # as rf2.hetero.population writes it
        "num_users": 30, "num_interactions": 600, "mean_cross_tier_jaccard": 0.2,
        "tiers": {t: {"users": 10, "share": 1 / 3, "mean_history": 20.0 + i}
                  for i, t in enumerate(TIERS)},
        "jaccard_top50": {"low|mid": 0.1, "low|high": 0.2, "mid|high": 0.3}}))
    (folder / "checkpoints").mkdir()


def make_multirun(root: Path, nested: bool = False) -> Path:
    """Hydra-style sweep; ``nested`` puts each population in its own sub-sweep."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for population in POPULATIONS:
        parent = root / population if nested else root
        for optimization in ("none", "exclude_low"):
            for seed in (1, 2):
                write_run(parent / str(job), optimization, population, seed)
                job += 1
    return root


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    return make_multirun(tmp_path / "multirun")


def test_load_long_format(multirun: Path) -> None:
    df = load(multirun)
    assert list(df.columns[:4]) == ["run", "round", "metric", "value"]
    assert set(CONFIG_COLUMNS) <= set(df.columns)
    assert len(df) == 8 * ROWS_PER_RUN
    assert sorted(df["run"].unique()) == [str(i) for i in range(8)]
    assert df.groupby("run").size().eq(ROWS_PER_RUN).all()
    run0 = df[df["run"] == "0"]
    assert run0["optimization"].iloc[0] == "none"
    assert run0["population"].iloc[0] == "independent"
    assert run0["seed"].iloc[0] == 1 and run0["num_rounds"].iloc[0] == 3
    assert run0["strategy"].iloc[0] == "fedavg" and run0["server_optimizer"].iloc[0] == "adagrad"
    assert run0["dataset"].iloc[0] == "synthetic" and run0["devices"].iloc[0] == "uniform"
    assert run0["model"].iloc[0] == RunConfig().model.name and run0["clients_per_round"].iloc[0] == 18
    pop = df[df["metric"] == "popularity/recall@20"]
    assert len(pop) == 8 and (pop["round"] == 0).all()
    value = run0[(run0["round"] == 3) & (run0["metric"] == "tier/high/recall@20")]["value"]
    assert value.item() == pytest.approx(0.4)


def test_extra_config_columns_and_nested_sweeps(tmp_path: Path) -> None:
    root = make_multirun(tmp_path / "outer", nested=True)
    df = load(root, config_columns=["population.alpha", "optimization.exclude_tiers"])
    assert len(df) == 8 * ROWS_PER_RUN
    assert df["population.alpha"].eq(0.005).all()
    assert df["optimization.exclude_tiers"].eq("[]").all()
    assert "independent/0" in set(df["run"]) and "popularity-dirichlet/7" in set(df["run"])
    named = load(root, config_columns={"q": "strategy.q"})
    assert named["q"].eq(1.0).all()


def test_single_run_folder_and_wide(multirun: Path) -> None:
    df = load(multirun / "3")
    assert set(df["run"]) == {"."} and len(df) == ROWS_PER_RUN
    wide = load_wide(multirun)
    assert len(wide) == 8 * ROUNDS
    assert list(wide.columns[:2]) == ["run", "round"]
    assert {"recall@20", "tier/low/recall@20", "seed", "optimization"} <= set(wide.columns)
    assert wide["popularity/recall@20"].notna().sum() == 8


def test_torn_last_line_is_skipped_with_a_warning(multirun: Path) -> None:
    with (multirun / "5" / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "recall@20": 0.3, "tier/lo')
    with pytest.warns(ResultsWarning, match="torn"):
        df = load(multirun)
    assert len(df) == 8 * ROWS_PER_RUN
    assert df["round"].max() == ROUNDS - 1


def test_corrupt_middle_line_and_resumed_rounds(tmp_path: Path) -> None:
    write_run(tmp_path / "run", "none", "independent", 1)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # A resumed run re-logs round 3 (last row wins); a null value is a NaN row.
    metrics.write_text("\n".join([*lines, '{"round": 3, "recall@20": null, "note": "x"}']))
    df = load(tmp_path / "run")
    last = df[(df["round"] == 3)]
    assert list(last["metric"]) == ["recall@20"] and math.isnan(last["value"].item())
    metrics.write_text("\n".join([lines[0], "{oops", lines[1]]))
    with pytest.raises(ResultsError, match=r"metrics.jsonl:2"):
        load(tmp_path / "run")


def test_old_users_evaluated_keys_read_as_eval_users(tmp_path: Path) -> None:
    # Rows written before one name: the count twice, and per tier as .../users_evaluated.
    write_run(tmp_path / "run", "none", "independent", 1)
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(
        {"round": 0, "users_evaluated": 30, "eval_users": 30, "tier/low/users_evaluated": 9,
         "activity/q1/users_evaluated": 7}) + "\n")
    row = load_wide(tmp_path / "run").iloc[0]
    assert (row["eval_users"], row["tier/low/eval_users"], row["activity/q1/eval_users"]) \
        == (30, 9, 7)
    assert not any("users_evaluated" in c for c in row.index)


def test_not_a_run_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty" / ".hydra" / "config.yaml").write_text("a: 1\n")
    with pytest.raises(ResultsError, match="no run folder") as info:
        load(tmp_path / "empty")
    assert isinstance(info.value, UserInputError)
    assert str(tmp_path / "empty") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ResultsError, match="no such folder"):
        load(tmp_path / "missing")


def test_runs_sorted_naturally(tmp_path: Path) -> None:
    for job in ("10", "2"):
        write_run(tmp_path / job, "none", "independent", 1)
    assert [p.name for p in find_runs(tmp_path)] == ["2", "10"]


def test_population_and_parquet(multirun: Path, tmp_path: Path) -> None:
    pop = load_population(multirun)
    assert len(pop) == 8 * 3  # one row per (run, tier)
    assert {"run", "tier", "users", "share", "mean_history", "num_users",
            "jaccard_top50.low|mid", "optimization", "seed"} <= set(pop.columns)
    run0 = pop[pop["run"] == "0"].set_index("tier")
    assert run0.loc["high", "mean_history"] == 22.0 and run0.loc["low", "num_users"] == 30
    assert run0.loc["mid", "jaccard_top50.mid|high"] == pytest.approx(0.3)
    # A plain list of records also works.
    (multirun / "0" / "population.json").write_text(json.dumps([{"client": 0, "tier": "low"}]))
    single = load_population(multirun / "0")
    assert single[["run", "client", "tier"]].values.tolist() == [[".", 0, "low"]]
    df = load(multirun)
    out = to_parquet(df, tmp_path / "out" / "metrics.parquet")
    back = pd.read_parquet(out)
    assert len(back) == len(df) and list(back.columns) == list(df.columns)


def test_fairness_gap_table_by_hand(multirun: Path) -> None:
    tables = fairness_gap_table(load(multirun), metric="recall@20")
    per_tier = tables.per_tier
    assert len(per_tier) == 2 * 2 * 3  # exclude_low x 2 populations x 2 seeds x 3 tiers
    assert set(per_tier["optimization"]) == {"exclude_low"}
    for population, seeds in D.items():
        for seed, expected in seeds.items():
            rows = per_tier[(per_tier["population"] == population) & (per_tier["seed"] == seed)]
            assert list(rows["tier"]) == list(TIERS)
            assert rows["d"].tolist() == pytest.approx(list(expected))
            assert (rows["round"] == 3).all()
    mdac = tables.mdac.set_index(["population", "seed"])["mdac"]
    assert mdac[("independent", 1)] == pytest.approx(0.2)
    assert mdac[("popularity-dirichlet", 2)] == pytest.approx(1.2)
    summary = tables.mdac_summary.set_index("population")
    assert summary.loc["independent", "mdac_mean"] == pytest.approx(0.3)
    assert summary.loc["popularity-dirichlet", "mdac_mean"] == pytest.approx(1.0)
    assert summary.loc["popularity-dirichlet", "mdac_std"] == pytest.approx(math.sqrt(0.08))
    tiers = tables.per_tier_summary.set_index(["population", "tier"])
    assert tiers.loc[("popularity-dirichlet", "low"), "d_mean"] == pytest.approx(-0.55)
    assert tiers.loc[("popularity-dirichlet", "low"), "n_seeds"] == 2
    ratio = tables.ratio.set_index("optimization").loc["exclude_low"]
    assert ratio["mdac_independent"] == pytest.approx(0.3)
    assert ratio["mdac_realistic"] == pytest.approx(1.0)
    assert ratio["ratio"] == pytest.approx(1.0 / 0.3)
    assert ratio["ratio_seed_mean"] == pytest.approx(3.5)  # seeds: 0.8/0.2 = 4, 1.2/0.4 = 3
    assert ratio["ratio_seed_std"] == pytest.approx(math.sqrt(0.5))
    assert ratio["n_seeds"] == 2


def test_fairness_gap_table_round_and_missing_reference(multirun: Path) -> None:
    df = load(multirun)
    early = fairness_gap_table(multirun, round=1)
    assert (early.per_tier["round"] == 1).all()
    assert early.mdac["mdac"].tolist() == pytest.approx([0.2, 0.4, 0.8, 1.2])
    with pytest.raises(ResultsError, match="no reference run with optimization='none'"):
        fairness_gap_table(df[df["optimization"] != "none"])
    no_seed2_ref = df[~((df["optimization"] == "none") & (df["seed"] == 2))]
    with pytest.warns(ResultsWarning, match="no reference run for"):
        tables = fairness_gap_table(no_seed2_ref)
    assert tables.mdac.set_index("seed")["mdac"].loc[2].isna().all()
    with pytest.raises(ResultsError, match="no tier/<tier>/auc"):
        fairness_gap_table(df, metric="auc")
    with pytest.raises(ResultsError, match="only reference runs"):
        fairness_gap_table(df[df["optimization"] == "none"])
    with pytest.raises(ResultsError, match="long frame"):
        fairness_gap_table(load_wide(multirun))
