"""Honest records for plug-ins (``rf2.core.plugins``, ``rf2.runs.what_ran``).

A run with a strategy, model, loader and tiering of the user's own (a module written to
a temporary folder, as ``mylab/...`` would be) names each by its ``_target_`` in
``config.yaml``, ``population.json``, the console summary, ``rf2.analysis.results`` and
the figures; built-in-only keys it would leave unused are an error naming the field or
a logged warning, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml
from conftest import plugin_module, read_rows, small_run

from rf2.analysis.figures import plot_tier_curves
from rf2.analysis.results import load, load_wide
from rf2.cli.support import run_job
from rf2.core.config import load_run_config
from rf2.core.errors import ConfigError
from rf2.core.plugins import recorded_config, unused_keys
from rf2.runs.run_folder import RunFolder
from rf2.runs.summary import run_summary

PLUGIN = '''
import numpy as np
from flwr.serverapp.strategy import FedAvg
from rf2.data import Interactions
from rf2.model import TwoTower


class PlainMean(FedAvg):
    """FedAvg's weighted mean, without rf2's server optimizer."""


class SameTwoTower(TwoTower):
    """rf2's two-tower under the user's name (nothing the cohort computes changed)."""
    cohort_vectorisable = True


def clicks(cfg, seed, users=40, items=30, per_user=6):
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), per_user)
    item = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    return Interactions(user=user, item=item, timestamp=np.tile(np.arange(per_user), users),
                        num_users=users, num_items=items)


def dealt(dataset, profile, seed):
    return [u % len(profile.tier_names) for u in range(dataset.num_users)]
'''

CUSTOM = "mylab.strategies.Mine"  # validation alone never imports the target


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = plugin_module(tmp_path, monkeypatch, "mylab_records", PLUGIN)
    yield name
    sys.modules.pop(name, None)


def _all_plugins(plugin: str, **extra: object) -> dict:
    return small_run(**{"strategy": {"_target_": f"{plugin}.PlainMean"},
                        "model._target_": f"{plugin}.SameTwoTower",
                        "dataset": {"_target_": f"{plugin}.clicks", "kwargs": {"users": 60}},
                        "devices.profile": "rf2-3tier",
                        "population._target_": f"{plugin}.dealt",
                        "num_rounds": 1, "clients_per_round": 10, **extra})


def test_a_run_of_plugins_names_each_by_its_target_everywhere(
        plugin: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    targets = {"strategy": f"{plugin}.PlainMean", "model": f"{plugin}.SameTwoTower",
               "dataset": f"{plugin}.clicks", "population": f"{plugin}.dealt"}
    # population=activity chosen out of habit: a warning (the tiering is the plug-in's).
    with caplog.at_level(logging.WARNING, logger="rf2.cli.runner"):
        run = run_job(_all_plugins(plugin, **{"population.mode": "activity"}),
                      tmp_path / "sweep" / "custom")
    warned = [r.getMessage() for r in caplog.records]
    assert [m for m in warned if "population.mode='activity' is unused" in m] == [
        f"rf2: warning: population.mode='activity' is unused: population._target_="
        f"{targets['population']} replaces rf2's tierings (population.mode)"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: config[k]["_target_"] for k in targets} == targets
    # Nothing the run did not use: no rf2 strategy name or server optimizer, no tier mode.
    assert set(config["strategy"]) == {"_target_", "kwargs", "concurrency", "staleness_exponent"}
    assert set(config["population"]) == {"_target_", "kwargs"}
    tiering = json.loads((run / "population.json").read_text())["tiering"]
    assert tiering["_target_"] == targets["population"] and "mode" not in tiering

    summary = "\n".join(run_summary(RunFolder(run)))
    assert f"data     {targets['dataset']} (60 users" in summary
    assert f"model    {targets['model']}; {targets['strategy']}, 10 clients/round" in summary
    assert "server" not in summary and f"population {targets['population']}" in summary

    run_job(small_run(num_rounds=1, clients_per_round=10, **{"devices.profile": "rf2-3tier"}),
            tmp_path / "sweep" / "builtin")
    wide = load_wide(tmp_path / "sweep").groupby("run").first()
    assert wide.loc["custom", list(targets)].to_dict() == targets
    assert wide.loc["custom", "tiering"] == targets["population"]
    assert wide.loc["custom", "server_optimizer"] is None
    assert wide.loc["builtin", ["strategy", "server_optimizer", "model", "population"]].tolist() \
        == ["fedavg", "adagrad", "hier_index", "independent"]
    titles = [ax.get_title() for ax in plot_tier_curves(load(tmp_path / "sweep")).axes]
    assert any(f"strategy={targets['strategy']}" in t and t.endswith(targets["population"])
               for t in titles), titles

    # The record reads back: the run resumes from it and extends. A record from before
    # plug-in records kept keys the strategy never used: the resume drops them.
    (run / "config.yaml").write_text(yaml.safe_dump(
        {**config, "strategy": {**config["strategy"], "server_optimizer": "yogi"}}))
    resumed = run_job({**_all_plugins(plugin), "resume": str(run), "num_rounds": 2},
                      tmp_path / "unused", ["num_rounds=2"])
    assert resumed == run and read_rows(run)[-1]["round"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["strategy"].keys() \
        == config["strategy"].keys()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"strategy.server_optimizer": "yogi"}, "strategy.server_optimizer"),
    ({"strategy.server_optimizer": "none"}, "strategy.server_optimizer"),
    ({"strategy.server_lr": 0.5}, "strategy.server_lr"),
    ({"strategy.tau": 0.01}, "strategy.tau"),
    ({"strategy.beta_1": 0.5}, "strategy.beta_1"),
    ({"strategy.beta_2": 0.5}, "strategy.beta_2"),
    ({"strategy.proximal_mu": 0.1}, "strategy.proximal_mu"),
    ({"strategy.q": 2.0}, "strategy.q"),
    ({"strategy.name": "fedprox"}, "strategy.name"),
    ({"strategy.name": "qffl"}, "strategy.name"),
])
def test_a_builtin_only_strategy_key_with_a_custom_strategy_is_one_error(
        overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(small_run(**{"strategy._target_": CUSTOM, **overrides}))
    text = str(err.value)
    assert err.value.field == field and "\n" not in text
    assert f"strategy._target_={CUSTOM}" in text


@pytest.mark.parametrize(("overrides", "field"), [
    ({"population.alpha": 0.1}, "population.alpha"),
    ({"population.strength": 2.0}, "population.strength"),
    ({"population.mode": "rf2-dirichlet", "population.leak_test": True}, "population.leak_test"),
    ({"population.path": "tiers.csv"}, "population.path"),
])
def test_a_builtin_only_tiering_key_with_a_custom_tiering_is_one_error(
        overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(small_run(**{"population._target_": "mylab.tiers.t", **overrides}))
    assert err.value.field == field and "population._target_=mylab.tiers.t" in str(err.value)


@pytest.mark.parametrize("group", ["dataset", "population"])
def test_kwargs_without_a_target_are_one_error(group: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(small_run(**{f"{group}.kwargs": {"cut": 3}}))
    assert err.value.field == f"{group}.kwargs"


def test_what_a_custom_strategy_keeps_and_what_is_only_a_warning() -> None:
    # fedbuff is the asynchronous schedule around the user's class: used, so recorded.
    cfg = load_run_config(small_run(**{"strategy._target_": CUSTOM, "strategy.name": "fedbuff",
                                       "population._target_": "mylab.tiers.t",
                                       "population.mode": "activity"}))
    assert recorded_config(cfg)["strategy"]["name"] == "fedbuff"
    assert [(u.path, u.error) for u in unused_keys(cfg)] == [("population.mode", False)]
    # Keys at their defaults say nothing; rf2's own parts have no unused keys.
    assert unused_keys(load_run_config(small_run(**{"strategy._target_": CUSTOM}))) == []
    assert unused_keys(load_run_config(small_run(**{"strategy.server_optimizer": "yogi"}))) == []


def test_a_config_error_of_a_plugin_leaves_no_run_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategy.server_optimizer"):
        run_job(small_run(**{"strategy._target_": CUSTOM, "strategy.server_optimizer": "yogi"}),
                tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_test_time_training_without_an_index_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        run_job(small_run(**{"model.name": "two_tower", "model.index.ttt": True}),
                tmp_path / "run")
    assert err.value.field == "model.index.ttt" and "TwoTower has none" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_an_old_record_of_a_custom_strategy_is_read_as_what_ran(tmp_path: Path) -> None:
    # Before plug-in records, config.yaml kept rf2's defaults beside the user's target.
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"strategy": {
        "_target_": CUSTOM, "name": "fedavg", "server_optimizer": "adagrad"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "recall@20": 0.1}) + "\n")
    row = load_wide(run).iloc[0]
    assert row["strategy"] == CUSTOM and row["server_optimizer"] is None
