"""What the console says at the end of a run and of a sweep (rf2.runs.summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rf2.runs.run_folder import RunFolder
from rf2.runs.summary import JobOutcome, job_line, run_summary, sweep_summary


def _write_run(folder: Path, tiers: list[str], mode: str = "federated") -> list[dict[str, Any]]:
    """A run folder written by hand: config, data sizes, tiers and three metric rows."""
    folder.mkdir(parents=True)
    config = {"mode": mode, "clients_per_round": 50,
              "dataset": {"name": "movielens100k"}, "model": {"name": "two_tower"},
              "strategy": {"_target_": "rf2.strategies.build_strategy", "name": "fedprox",
                           "server_optimizer": "adam", "server_lr": 0.03},
              "central": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 256},
              "devices": {"profile": "rf2-3tier" if len(tiers) > 1 else "uniform"},
              "population": {"mode": "popularity-dirichlet"},
              "optimization": {"name": "exclude-low"}, "simulation": {"backend": "ray"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "data.json").write_text(json.dumps({"users": 943, "items": 1682}))
    # population.json is written with sorted keys: high before low.
    (folder / "population.json").write_text(
        json.dumps({"tiers": {t: {"users": 1} for t in sorted(tiers)}}, sort_keys=True))
    rows = []
    for rnd, (rec, ndcg) in enumerate([(0.03, 0.02), (0.27, 0.16), (0.25, 0.15)]):
        row: dict[str, Any] = {"round": rnd, "wall_time_s": 1.5 * rnd, "sim_time_s": 9.0 * rnd,
                               "recall@20": rec, "ndcg@20": ndcg}
        for i, tier in enumerate(tiers):
            row[f"tier/{tier}/recall@20"] = rec + 0.01 * i
            row[f"tier/{tier}/ndcg@20"] = ndcg
        if rnd == 0:
            row["popularity/recall@20"], row["popularity/ndcg@20"] = 0.2215, 0.1441
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_summary_names_what_ran_and_shows_the_popularity_baseline(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", ["all"])
    lines = run_summary(RunFolder(tmp_path / "run"))
    text = "\n".join(lines)
    assert lines[0] == f"rf2: run finished: {tmp_path / 'run'}"
    for part in ("movielens100k (943 users x 1,682 items)", "two_tower",
                 "fedprox + server adam (lr 0.03)", "50 clients/round", "exclude-low",
                 "devices  uniform: one tier", "clients on Ray", "rounds 2, wall 3.0 s",
                 "simulated 18.0 s"):
        assert part in text, part
    recall = next(line for line in lines if line.strip().startswith("recall@20"))
    # popularity, round 0, final, best (with its round), in that order
    assert recall.split()[1:6] == ["0.2215", "0.0300", "0.2500", "0.2700", "(round"]
    assert "tier" not in text.replace("one tier", "")  # one tier: no per-tier lines


def test_summary_lists_tiers_in_reading_order_only_when_there_are_several(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", ["low", "mid", "high"])
    text = "\n".join(run_summary(RunFolder(tmp_path / "run")))
    assert "rf2-3tier: 3 tiers (low, mid, high), population popularity-dirichlet" in text
    assert "recall@20 per tier, final: low 0.2500, mid 0.2600, high 0.2700" in text


def test_central_summary_names_the_optimizer_and_counts_evaluations(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", ["all"], mode="central")
    text = "\n".join(run_summary(RunFolder(tmp_path / "run")))
    assert "central: adam lr 0.01, 2 epoch(s), batch 256" in text
    assert "evaluations 2" in text and "simulated" not in text and "fedprox" not in text


def test_job_line_and_sweep_table_point_at_rf2_figures(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sweep = Path("multirun") / "study"
    _write_run(tmp_path / sweep / "0", ["all"])
    _write_run(tmp_path / sweep / "1", ["all"])
    assert job_line(RunFolder(sweep / "0")).endswith("recall@20 0.2500 (popularity 0.2215)")
    # without the popularity baseline evaluated (eval.metrics), no "(popularity n/a)"
    metrics = tmp_path / sweep / "1" / "metrics.jsonl"
    metrics.write_text("".join(
        json.dumps({k: v for k, v in json.loads(line).items()
                    if not k.startswith("popularity/")}) + "\n"
        for line in metrics.read_text().splitlines()))
    assert job_line(RunFolder(sweep / "1")).endswith("recall@20 0.2500")
    lines = sweep_summary([JobOutcome("1", sweep / "1", "interrupted", ("seed=2", "a=1")),
                           JobOutcome("0", sweep / "0", "done", ("seed=1", "a=1")),
                           JobOutcome("2", None, "not started", ("seed=3", "a=1"))])
    assert lines[0] == "rf2: sweep finished: 1 of 3 job(s) done"
    rows = [line.split() for line in lines[2:5]]
    # the overrides all jobs share (a=1) are left out
    assert rows == [["0", "0.2500", "done", str(sweep / "0"), "seed=1"],
                    ["1", "0.2500", "interrupted", str(sweep / "1"), "seed=2"],
                    ["2", "n/a", "not", "started", "-", "seed=3"]]
    assert lines[-1] == f"  next: rf2-figures {sweep}"
