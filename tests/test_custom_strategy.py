"""``strategy._target_`` is honoured: a Strategy class from outside rf2 aggregates a run.

The plug-in lives in a module written to a temporary directory on ``sys.path``, as a
user's ``mylab/strategies.py`` would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import plugin_module, small_run

from rf2.cli.support import run_job
from rf2.core.config import ClientConfig, StrategyConfig
from rf2.core.errors import ConfigError
from rf2.strategies import instantiate_strategy
from rf2.strategies.build import FedAvg

PLUGIN = '''
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

CALLS = []


class ShiftedMean(FedAvg):
    """FedAvg's weighted mean, then ``shift`` added to every parameter."""

    def __init__(self, shift, **kwargs):
        super().__init__(**kwargs)
        self.shift = shift

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        CALLS.append((server_round, len(replies)))
        arrays, metrics = super().aggregate_train(server_round, replies)
        return ArrayRecord({k: Array(v.numpy() + self.shift) for k, v in arrays.items()}), metrics


def not_a_strategy():
    return 42
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    name = plugin_module(tmp_path, monkeypatch, "mylab_strategies", PLUGIN)
    __import__(name)
    yield sys.modules[name]
    sys.modules.pop(name, None)


def test_a_strategy_class_from_outside_the_package_aggregates_the_run(plugin, tmp_path: Path
                                                                       ) -> None:
    rounds = 2
    ref = run_job(small_run(num_rounds=rounds, **{"strategy.server_optimizer": "none"}),
                  tmp_path / "fedavg")
    custom = run_job(small_run(num_rounds=rounds, strategy={
        "_target_": f"{plugin.__name__}.ShiftedMean", "kwargs": {"shift": 0.0}}),
        tmp_path / "custom")
    shifted = run_job(small_run(num_rounds=1, strategy={
        "_target_": f"{plugin.__name__}.ShiftedMean", "kwargs": {"shift": 0.25}}),
        tmp_path / "shifted")
    one_round = run_job(small_run(num_rounds=1, **{"strategy.server_optimizer": "none"}),
                        tmp_path / "fedavg1")
    # Called once per round with every trained client (20 per round in small_run).
    assert plugin.CALLS == [(1, 20), (2, 20), (1, 20)]
    # shift = 0 is FedAvg exactly; shift = 0.25 is FedAvg's model + 0.25 everywhere.
    a = torch.load(ref / "model.pt")
    b = torch.load(custom / "model.pt")
    # (Equal to rounding: rf2's FedAvg averages sparse replies from their row deltas in
    # float64, a strategy rf2 does not know gets them densified and sums in float32.)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    base = torch.load(one_round / "model.pt")
    moved = torch.load(shifted / "model.pt")
    for k in base:
        if base[k].is_floating_point():
            torch.testing.assert_close(moved[k], base[k] + 0.25)


def test_rf2_sampling_is_passed_where_the_class_accepts_it(plugin) -> None:
    cfg = StrategyConfig(_target_=f"{plugin.__name__}.ShiftedMean", kwargs={"shift": 1.0})
    strategy = instantiate_strategy(cfg, ClientConfig())
    assert isinstance(strategy, FedAvg)
    assert (strategy.shift, strategy.min_available_nodes, strategy.fraction_evaluate) == (1.0, 0, 0.0)


def test_builtin_target_still_picks_the_class_by_name() -> None:
    strategy = instantiate_strategy(StrategyConfig(name="fedprox", server_optimizer="none",
                                                   proximal_mu=0.3), ClientConfig())
    assert type(strategy).__name__ == "FedProx" and strategy.proximal_mu == 0.3


@pytest.mark.parametrize(("target", "kwargs", "says"), [
    ("nowhere_lab.Strategy", {}, "cannot be imported"),
    ("rf2.strategies.build.NoSuchClass", {}, "cannot be imported"),
    ("{plugin}.ShiftedMean", {}, "TypeError"),  # shift missing
    ("{plugin}.ShiftedMean", {"shift": 1.0, "bogus": 2}, "TypeError"),
    ("{plugin}.not_a_strategy", {}, "returned a int"),
    ("{plugin}.CALLS", {}, "not callable"),
])
def test_a_bad_target_is_one_line_naming_the_field(plugin, target: str, kwargs: dict,
                                                   says: str) -> None:
    cfg = StrategyConfig(_target_=target.format(plugin=plugin.__name__), kwargs=kwargs)
    with pytest.raises(ConfigError) as err:
        instantiate_strategy(cfg, ClientConfig())
    text = str(err.value)
    assert "\n" not in text and text.startswith("config error: strategy._target_=")
    assert says in text


def test_a_bad_target_leaves_no_run_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategy._target_"):
        run_job(small_run(strategy={"_target_": "nowhere_lab.Strategy"}), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_kwargs_with_the_builtin_builder_are_rejected() -> None:
    with pytest.raises(ConfigError, match="strategy.kwargs"):
        instantiate_strategy(StrategyConfig(kwargs={"shift": 1}), ClientConfig())
