"""The beyond-RF² study (issue 20 item 4): its experiment files, its analysis, end to end.

Fast tests: the experiments compose and validate with every arm; the CLI's precheck knows
the ``arm`` group; the analysis (rf2.analysis.beyond) on hand-built run folders: D_t of
the reference against itself is 0, D_t and MDAC of another arm by hand, the simulated time
to a target on a hand-built curve, and the per-user statistics against a NumPy reference.
The slow test runs the documented quick study and ``rf2-figures`` on it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import compose_experiment, text_layout_problems

from rf2.analysis.beyond import (
    arm_label,
    beyond_markdown,
    beyond_tables,
    load_arms,
    time_to_target,
)
from rf2.analysis.beyond_figure import plot_beyond_rf2
from rf2.analysis.results import ResultsError
from rf2.cli.support import precheck_overrides
from rf2.core.config import load_run_config
from rf2.eval.distribution import distribution_row, participation_row

ARMS = ("sync", "fedbuff", "dp8", "dp1")
POPULATIONS = ("independent", "popularity-dirichlet")


# -- the experiment files -------------------------------------------------------------------

@pytest.mark.parametrize("experiment, dataset", [("beyond_rf2", "recbole"),
                                                 ("beyond_rf2_quick", "synthetic")])
def test_experiment_sweeps_the_arms_and_every_arm_validates(experiment: str, dataset: str) -> None:
    base = compose_experiment(experiment, "dataset.path=/data/amazon-cds")
    params = {k: [v.strip() for v in str(p).split(",")]
              for k, p in base["hydra"]["sweeper"]["params"].items()}
    assert params["arm"] == list(ARMS) and params["population"] == list(POPULATIONS)
    if experiment == "beyond_rf2":
        assert len(params["seed"]) >= 2
    expected = {"sync": ("fedavg", "none", None), "fedbuff": ("fedbuff", "none", None),
                "dp8": ("fedavg", "dp", 8.0), "dp1": ("fedavg", "dp", 1.0)}
    for arm, (strategy, privacy, epsilon) in expected.items():
        cfg = load_run_config(compose_experiment(experiment, f"arm={arm}",
                                                 "dataset.path=/data/amazon-cds"))
        assert (cfg.strategy.name, cfg.privacy.name) == (strategy, privacy), arm
        assert cfg.privacy.target_epsilon == epsilon
        assert cfg.privacy.delta is None  # 1 / eligible users, as docs/privacy.md says
        assert cfg.dataset.name == dataset and cfg.devices.profile == "rf2-3tier"
        assert cfg.round.deadline_s is None and cfg.round.deadline_quantile is None
        assert arm_label(cfg.strategy.name, cfg.privacy.name, cfg.privacy.target_epsilon,
                         cfg.privacy.noise_multiplier) == {
            "sync": "sync", "fedbuff": "fedbuff", "dp8": "dp ε=8", "dp1": "dp ε=1"}[arm]


def test_precheck_knows_the_arm_group(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["-m", "+experiment=beyond_rf2", "arm=sync,dp1", "dataset.path=/x"]
    assert precheck_overrides(args) == args
    with pytest.raises(SystemExit) as exc:
        precheck_overrides(["+experiment=beyond_rf2", "arm=dp2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "rf2: config error: arm='dp2' is not allowed; allowed: dp1, dp8, fedbuff, sync"


# -- the analysis on hand-built runs --------------------------------------------------------

TIERS = ("low", "mid", "high")
ROUNDS = (0, 10, 20)


def _config(strategy: str, privacy: str, epsilon: float | None, population: str,
            seed: int) -> dict[str, Any]:
    return {"seed": seed, "num_rounds": ROUNDS[-1], "strategy": {"name": strategy,
            "server_optimizer": "adam"},
            "privacy": {"name": privacy, "target_epsilon": epsilon, "noise_multiplier": 1.0},
            "population": {"mode": population}, "optimization": {"name": "none"},
            "devices": {"profile": "rf2-3tier"}, "dataset": {"name": "synthetic"},
            "model": {"name": "two_tower"}}


def _write_run(folder: Path, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                          encoding="utf-8")


# Per arm: the overall curve (value, sim time) at ROUNDS and the last row's tier values.
CURVES = {
    "sync": ([0.0, 0.10, 0.20], [0.0, 100.0, 200.0], [0.10, 0.20, 0.30]),
    "fedbuff": ([0.0, 0.17, 0.25], [0.0, 10.0, 20.0], [0.08, 0.20, 0.33]),
    "dp8": ([0.0, 0.05, 0.10], [0.0, 100.0, 200.0], [0.05, 0.10, 0.15]),
}
SPEC = {"sync": ("fedavg", "none", None), "fedbuff": ("fedbuff", "none", None),
        "dp8": ("fedavg", "dp", 8.0)}


def _per_user(arm: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, len(arm)])
    values = np.where(rng.random(60) < 0.3, 0.0, rng.random(60))  # (U,) some users miss
    return {"recall@20": values}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """2 seeds x 3 arms on one population, the sync arm's curve in a second one."""
    for seed in (1, 2):
        for arm, (strategy, privacy, eps) in SPEC.items():
            values, times, tiers = CURVES[arm]
            users = _per_user(arm, seed)
            groups = np.arange(60) % 3  # (U,) tier index per user
            rows = []
            for i, rnd in enumerate(ROUNDS):
                row: dict[str, Any] = {"round": rnd, "recall@20": values[i], "ndcg@20": values[i] / 2,
                                       "sim_time_s": times[i]}
                if rnd > 0:
                    row.update({f"tier/{t}/completed": n for t, n in zip(TIERS, (1, 2, 3),
                                                                          strict=True)})
                if rnd > 0 and arm == "fedbuff":  # low: 1 arrival 2 steps stale, then 3 fresh
                    row.update({f"tier/{t}/arrivals": (1 if rnd == 10 else 3) for t in TIERS})
                    row.update({f"tier/{t}/staleness_mean": (2.0 if rnd == 10 else 0.0)
                                for t in TIERS})
                if rnd == ROUNDS[-1]:
                    row.update({f"tier/{t}/recall@20": v for t, v in zip(TIERS, tiers, strict=True)})
                    row.update(distribution_row(users, groups, TIERS))
                    row.update(participation_row(np.arange(60) % 4, np.arange(60) % 2, groups, TIERS))
                    if privacy == "dp":
                        row["dp/epsilon"] = 7.9
                rows.append(row)
            _write_run(tmp_path / f"{arm}-{seed}", _config(strategy, privacy, eps,
                                                            "independent", seed), rows)
    return tmp_path


def test_reference_against_itself_is_zero_and_other_arms_by_hand(study: Path) -> None:
    t = beyond_tables(study)
    assert t.tiers == list(TIERS)
    runs = t.per_run.set_index("run")
    for seed in (1, 2):
        ref = runs.loc[f"sync-{seed}"]
        assert [ref[f"d/{x}"] for x in TIERS] == [0.0, 0.0, 0.0] and ref["mdac"] == 0.0
        buff = runs.loc[f"fedbuff-{seed}"]
        assert [buff[f"d/{x}"] for x in TIERS] == pytest.approx([-0.2, 0.0, 0.1])
        assert buff["mdac"] == pytest.approx(0.3)
        dp = runs.loc[f"dp8-{seed}"]
        assert [dp[f"d/{x}"] for x in TIERS] == pytest.approx([-0.5, -0.5, -0.5])
        assert dp["mdac"] == pytest.approx(0.0) and dp["dp/epsilon"] == 7.9
        assert math.isnan(buff["dp/epsilon"])
        assert [buff[f"share/{x}"] for x in TIERS] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
        assert [buff[f"staleness/{x}"] for x in TIERS] == pytest.approx([0.5] * 3)
        assert math.isnan(ref["staleness/low"])  # a synchronous update is never stale
    s = t.summary.set_index("arm")
    assert list(s.index) == ["sync", "fedbuff", "dp ε=8"]
    assert (s["n_seeds"] == 2).all()
    assert s.loc["fedbuff", "recall@20"] == pytest.approx(0.25)
    assert s.loc["sync", "recall@20_std"] == 0.0


def test_time_to_target_on_the_hand_built_curves(study: Path) -> None:
    t = beyond_tables(study, target_fraction=0.8)  # target = 0.8 x 0.20 = 0.16
    runs = t.per_run.set_index("run")
    assert runs["target"].tolist() == pytest.approx([0.16] * len(runs))
    assert runs.loc["sync-1", "time_to_target_s"] == 200.0  # 0.10 < 0.16 <= 0.20
    assert runs.loc["sync-1", "round_to_target"] == 20
    assert runs.loc["fedbuff-1", "time_to_target_s"] == 10.0  # 0.17 at round 10
    assert math.isnan(runs.loc["dp8-1", "time_to_target_s"])  # never reaches it
    s = t.summary.set_index("arm")
    assert (s.loc["dp ε=8", "n_reached"], s.loc["fedbuff", "n_reached"]) == (0, 2)
    fixed = beyond_tables(study, target=0.05).per_run.set_index("run")
    assert fixed.loc["dp8-2", "time_to_target_s"] == 100.0  # an absolute target
    text = beyond_markdown(t)
    assert "| fedbuff | independent | 2 | 0.2500 ± 0.0000 |" in text
    assert "not reached (0/2)" in text and "| +0.0% | +0.0% | +0.0% |" in text


def test_figure_draws_every_arm_without_text_collisions(study: Path) -> None:
    fig = plot_beyond_rf2(beyond_tables(study))
    assert text_layout_problems(fig) == []
    curves, bars = fig.axes[0], fig.axes[1]
    assert [line.get_label() for line in curves.get_lines()][:3] == ["sync", "fedbuff", "dp ε=8"]
    assert [t.get_text() for t in bars.get_xticklabels()] == [
        "fedbuff\nMDAC 0.300", "dp ε=8\nMDAC 0.000"]


def test_time_to_target_unit() -> None:
    assert time_to_target([0, 5, 9], [0.1, math.nan, 0.3], 0.3) == (9.0, 2)  # >= counts
    assert time_to_target([0, 5, 9], [0.1, math.nan, 0.3], 0.2) == (9.0, 2)  # NaN never
    t, i = time_to_target([0, 5], [0.1, 0.2], 0.5)
    assert math.isnan(t) and i == -1


def test_distribution_statistics_against_numpy(study: Path) -> None:
    s = beyond_tables(study).summary.set_index("arm")
    for arm in SPEC:
        ref: dict[str, list[float]] = {k: [] for k in ("std", "bottom10", "top10", "gini",
                                                        "no_hit")}
        for seed in (1, 2):
            x = np.sort(_per_user(arm, seed)["recall@20"])
            k = math.ceil(0.1 * x.size)
            ref["std"].append(float(np.std(x)))
            ref["bottom10"].append(float(x[:k].mean()))
            ref["top10"].append(float(x[-k:].mean()))
            ref["gini"].append(float(np.abs(x[:, None] - x[None, :]).sum()
                                     / (2 * x.size**2 * x.mean())))
            ref["no_hit"].append(float(np.mean(x == 0)))
        label = arm_label(*SPEC[arm])
        for stat, values in ref.items():
            assert s.loc[label, f"dist/{stat}"] == pytest.approx(np.mean(values)), (arm, stat)
        counts = np.arange(60) % 2
        gini = np.abs(counts[:, None] - counts[None, :]).sum() / (2 * 60**2 * counts.mean())
        assert s.loc[label, "participation/trainings"] == pytest.approx(gini)


def test_missing_reference_arm_is_one_error(study: Path) -> None:
    for seed in (1, 2):
        for name in ("config.yaml", "metrics.jsonl"):
            (study / f"sync-{seed}" / name).unlink()
        (study / f"sync-{seed}").rmdir()
    with pytest.raises(ResultsError, match=r"no run of the reference arm 'sync' \(found: "
                       r"fedbuff, dp ε=8\)"):
        beyond_tables(load_arms(study))


# -- the quick study, end to end ------------------------------------------------------------

# docs/beyond-rf2.md's commands, run verbatim (tests/test_docs_commands.py checks it).
SWEEP_COMMAND = "rf2 -m +experiment=beyond_rf2_quick hydra.sweep.dir=multirun/beyond_rf2_quick"
FIGURES_COMMAND = "rf2-figures multirun/beyond_rf2_quick --formats png"


@pytest.mark.slow
def test_quick_study_and_its_table(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                  os.environ["PATH"]])}
    for command in (SWEEP_COMMAND, FIGURES_COMMAND):
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, command + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "multirun" / "beyond_rf2_quick" / "figures"
    assert (out / "beyond_rf2.png").stat().st_size > 0
    text = (out / "beyond_rf2.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    for arm in ("sync", "fedbuff", "dp ε=8", "dp ε=1"):
        for pop in POPULATIONS:
            assert sum(r.startswith(f"| {arm} | {pop} |") for r in rows) == 3, (arm, pop)  # 3 tables
    t = beyond_tables(tmp_path / "multirun" / "beyond_rf2_quick")
    runs = t.per_run.set_index("arm")
    assert (runs.loc["sync", "mdac"] == 0).all()
    # DP and sync share the simulated clock (same selection, same devices): same time
    assert (runs.loc["dp ε=1", "sim_time_s"].to_numpy()
            == runs.loc["sync", "sim_time_s"].to_numpy()).all()
    eps = runs.loc["dp ε=1", "dp/epsilon"].to_numpy()
    assert eps == pytest.approx([1.0, 1.0], abs=0.05)
