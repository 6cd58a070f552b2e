"""Hydra composition of rf2.conf and validation of every value before compute."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from conftest import composed, small_run

from rf2.cli.support import GROUPS, group_options, run_job
from rf2.core.config import OptimizationName, RunConfig, load_run_config
from rf2.core.errors import ConfigError, UserInputError
from rf2.data import load_dataset
from rf2.strategies import instantiate_strategy


def test_plain_rf2_builds_rf2s_baseline_on_data_it_needs_no_file_for() -> None:
    cfg = composed()
    # RF²'s baseline: FedAvg's mean, then a server Adagrad step.
    assert type(instantiate_strategy(cfg.strategy, cfg.client)).__name__ == "FedAdagrad"
    dataset = load_dataset(dataclasses.replace(cfg.dataset, num_users=50), cfg.seed)
    assert dataset.num_users == 50 and cfg.dataset.path is None


ALL_OPTIONS = [(g, o) for g in GROUPS if g != "experiment" for o in group_options(g)]


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_every_conf_option_composes(group: str, option: str) -> None:
    # arm (beyond_rf2's arms) is not in config.yaml's defaults: appended with +, as an
    # experiment is; inside +experiment=beyond_rf2 a plain arm=X swaps it.
    extra = [f"+{group}={option}" if group == "arm" else f"{group}={option}"]
    if group == "dataset" and option != "synthetic":
        extra.append("dataset.path=/some/where")
    cfg = composed(*extra)
    assert isinstance(cfg, RunConfig)


def test_optimization_name_is_one_of_the_group_options() -> None:
    assert sorted(get_args(OptimizationName)) == group_options("optimization")
    with pytest.raises(ConfigError) as err:
        load_run_config({"optimization": {"name": "hetrofl"}})
    assert err.value.field == "optimization.name" and "'heterofl'" in str(err.value)


@pytest.mark.parametrize("name", sorted(set(get_args(OptimizationName)) - {"none"}))
def test_an_optimization_name_without_its_setting_is_an_error(name: str) -> None:
    # ``optimization.name=heterofl`` alone would label a plain run as HeteroFL.
    with pytest.raises(ConfigError) as err:
        load_run_config({"optimization": {"name": name}})
    assert err.value.field == "optimization.name" and f"optimization={name}" in str(err.value)


def test_a_setting_the_optimization_name_does_not_say_is_listed_for_a_warning() -> None:
    # Results take "none" as the reference of D_t: a pruned run labelled none would pass
    # for it. Each shipped option names exactly what it sets.
    assert load_run_config({"optimization": {"prune_rate": {"low": 0.5}}}
                           ).optimization.unnamed_settings() == ["prune_rate"]
    assert load_run_config({"optimization": {"name": "heterofl", "width": {"low": 0.5},
                                             "quant_bits": {"low": 8}}}
                           ).optimization.unnamed_settings() == ["quant_bits"]
    for option in group_options("optimization"):
        assert composed(f"optimization={option}").optimization.unnamed_settings() == [], option


def test_the_run_warns_of_a_setting_its_optimization_name_does_not_say(
        caplog: pytest.LogCaptureFixture) -> None:
    from rf2.cli.runner import prepare

    cfg = load_run_config(small_run(**{"devices.profile": "rf2-3tier",
                                       "optimization.prune_rate": {"low": 0.5}}))
    with caplog.at_level(logging.WARNING, logger="rf2.cli.runner"):
        prepare(cfg)
    assert [r.getMessage() for r in caplog.records if r.name == "rf2.cli.runner"] == [
        "rf2: warning: optimization.prune_rate acts but optimization.name=none does not say "
        "so (results and figures label the run none)"]


def test_every_group_has_options() -> None:
    for group in GROUPS:
        if group == "experiment":
            continue
        assert group_options(group), group


BAD_VALUES = [
    ({"client": {"lr": 0}}, "client.lr"),
    ({"client": {"lr": -1.0}}, "client.lr"),
    ({"num_rounds": -1}, "num_rounds"),
    ({"clients_per_round": 0}, "clients_per_round"),
    ({"dataset": {"train_fraction": 1.5}}, "dataset.train_fraction"),
    ({"dataset": {"name": "netflix"}}, "dataset.name"),
    ({"dataset": {"name": "movielens100k"}}, "dataset.path"),
    ({"strategy": {"name": "fedsgd"}}, "strategy.name"),
    ({"strategy": {"server_lr": 0.0}}, "strategy.server_lr"),
    ({"round": {"deadline_quantile": 0.0}}, "round.deadline_quantile"),
    ({"round": {"overcommit": -0.5}}, "round.overcommit"),
    ({"population": {"mode": "random"}}, "population.mode"),
    ({"population": {"alpha": 0}}, "population.alpha"),
    ({"optimization": {"prune_rate": {"low": 1.0}}}, "optimization.prune_rate.low"),
    ({"optimization": {"quant_bits": {"low": 0}}}, "optimization.quant_bits.low"),
    ({"optimization": {"width": {"low": 0.0}}}, "optimization.width.low"),
    ({"simulation": {"backend": "dask"}}, "simulation.backend"),
    ({"eval": {"ks": []}}, "eval.ks"),
    ({"eval": {"ks": [0]}}, "eval.ks"),
    ({"model": {"dim": "big"}}, "model.dim"),
    ({"seed": 1.5}, "seed"),
    ({"colour": "red"}, "colour"),
    ({"client": {"momentum": 0.9}}, "client.momentum"),
]


@pytest.mark.parametrize(("data", "field"), BAD_VALUES)
def test_bad_values_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(data)
    assert info.value.field == field
    message = str(info.value)
    assert field in message and "allowed" in message and "\n" not in message


def _rf2(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rf2", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# Each case runs rf2's command in this process (``rf2_in_process``): a new Python process
# would import torch and Flower first (2-15 s on a busy 2-core machine). The inner loop
# keeps one per path (pre-check, schema, data-dependent check in prepare); the checks
# themselves are covered in-process above and below, a real process just below.
_SLOW_CLI = pytest.mark.slow


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["strategy=fedsgd"], "strategy='fedsgd'"),
        (["client.lr=-1"], "client.lr=-1.0"),
        pytest.param(["dataset=movielens100k", "dataset.path=/nonexistent/ml"], "/nonexistent/ml",
                     marks=_SLOW_CLI),
        pytest.param(["clients_per_round=5000", "simulation=inprocess"], "clients_per_round=5000",
                     marks=_SLOW_CLI),
        pytest.param(["eval.ks=[10,5000]", "simulation=inprocess"], "eval.ks", marks=_SLOW_CLI),
        (["devices=rf2-3tier", "optimization.exclude_tiers=[tiny]"], "optimization.exclude_tiers"),
        pytest.param(["client.momentum=0.9"], "client.momentum", marks=_SLOW_CLI),
        pytest.param(["devices=rf2-3tier", "optimization.prune_rate.low=2"],
                     "optimization.prune_rate.low", marks=_SLOW_CLI),
        pytest.param(["devices=nokia"], "devices='nokia'", marks=_SLOW_CLI),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_run_folder(
    tmp_path: Path, args: list[str], needle: str, rf2_in_process: Any
) -> None:
    _assert_one_line_exit_2_and_no_run_folder(rf2_in_process(*args, cwd=tmp_path), needle,
                                              tmp_path)


def test_cli_bad_input_in_a_real_rf2_process(tmp_path: Path) -> None:
    _assert_one_line_exit_2_and_no_run_folder(_rf2("strategy=fedsgd", cwd=tmp_path),
                                              "strategy='fedsgd'", tmp_path)


def _assert_one_line_exit_2_and_no_run_folder(proc: subprocess.CompletedProcess[str],
                                              needle: str, cwd: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rf2: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cwd / "outputs").exists() or not any((cwd / "outputs").rglob("*.jsonl"))
    leftovers = list((cwd / "outputs").rglob("config.yaml")) if (cwd / "outputs").exists() else []
    assert leftovers == []


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"dataset": {"name": "movielens100k", "path": "/nonexistent/ml"}}, "/nonexistent/ml"),
        ({"clients_per_round": 5000}, "clients_per_round=5000"),
        ({"eval.ks": [10, 5000]}, "eval.ks"),
        ({"devices.profile": "rf2-3tier", "optimization.exclude_tiers": ["tiny"]},
         "optimization.exclude_tiers"),
        ({"devices.profile": "rf2-3tier", "optimization.prune_rate": {"tiny": 0.5}},
         "optimization.prune_rate.tiny"),
    ],
)
def test_data_dependent_checks_fail_before_the_run_folder(tmp_path: Path, overrides: dict,
                                                          needle: str) -> None:
    """Checks that need the data or the profile (``runner.prepare``), in-process."""
    with pytest.raises(UserInputError) as info:
        run_job(small_run(**overrides), tmp_path / "run")
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
