"""``simulation.fast_transport``: same metrics with and without Flower internals, and each
hook fails loudly, naming the installed Flower, when its assumption breaks."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, small_run, without_timing
from flwr.app import Array

import rf2.fl.fast_transport as fast_transport
import rf2.fl.params as params
from rf2.cli.support import run_job
from rf2.core.config import ClientConfig, SimulationConfig, StrategyConfig
from rf2.core.flower_version import FlowerCompatError, flwr_version
from rf2.fl.prompt_delivery import PushedNodes, verify_delivery_used
from rf2.strategies import build_strategy
from rf2.strategies.state import optimizer_moments, strategy_state


def _count_fast_arrays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made: list[int] = []
    real = params.FastArray.wrap.__func__

    def counting(cls: type, value: np.ndarray) -> params.FastArray:
        made.append(1)
        return real(cls, value)

    monkeypatch.setattr(params.FastArray, "wrap", classmethod(counting))
    return made


def _assert_one_line_naming_flower(ex: BaseException) -> None:
    text = str(ex)
    assert "\n" not in text and f"flwr {flwr_version()}:" in text and "1.42.x" in text


def test_both_settings_give_identical_metrics_inprocess(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    made = _count_fast_arrays(monkeypatch)
    overrides = {"num_rounds": 2, "strategy.name": "qffl", "optimization.width": {"all": 0.5}}
    stock = run_job(small_run(**overrides, **{"simulation.fast_transport": False}),
                    tmp_path / "stock")
    assert made == []  # public API only: stock Arrays all the way
    assert not params.fast_arrays_enabled()
    fast = run_job(small_run(**overrides), tmp_path / "fast")
    assert len(made) > 0 and params.fast_arrays_enabled()
    rows = read_rows(fast)
    assert rows[-1]["tier/all/trained"] == 20  # HeteroFL + q-FFL path ran
    assert without_timing(read_rows(stock)) == without_timing(rows)


@pytest.mark.slow
def test_both_settings_give_identical_metrics_on_ray(tmp_path: Path) -> None:
    """Flower's stock engine and grid (0.1 s polling) vs rf2's push-driven delivery; the
    fast run also proves the engine called rf2's extractor (else launch raises)."""
    rows = {}
    for fast in (False, True):
        ray_tmp = tempfile.mkdtemp(prefix="rf2ray")  # Ray socket paths must stay short
        cfg = small_run(num_rounds=2)
        cfg["simulation"] = {"backend": "ray", "ray_temp_dir": ray_tmp, "fast_transport": fast}
        try:
            rows[fast] = read_rows(run_job(cfg, tmp_path / f"ray-{fast}"))
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    inproc = read_rows(run_job(small_run(num_rounds=2), tmp_path / "inproc"))
    assert without_timing(rows[False]) == without_timing(rows[True]) == without_timing(inproc)


def test_stock_and_fast_codecs_agree_bit_for_bit() -> None:
    value = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    try:
        params.use_fast_arrays(False)
        stock = params.numpy_to_array(value)
        assert type(stock) is Array
        assert np.array_equal(params.array_to_numpy(params.FastArray.wrap(value.copy())), value)
    finally:
        params.use_fast_arrays(True)
    fast = params.numpy_to_array(value.copy())
    assert isinstance(fast, params.FastArray)
    assert bytes(fast.data) == bytes(stock.data)
    assert np.array_equal(params.array_to_numpy(stock), params.array_to_numpy(fast))


def test_a_fast_array_that_differs_from_flowers_fails_loudly(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    fast_transport.verify_fast_array()  # holds for the installed Flower
    monkeypatch.setattr(params.FastArray, "__getattr__",
                        lambda self, name: b"not npy" if name == "data" else None)
    with pytest.raises(FlowerCompatError, match="FastArray differs from flwr.app.Array in") as err:
        fast_transport.prepare(SimulationConfig(fast_transport=True))
    _assert_one_line_naming_flower(err.value)
    fast_transport.prepare(SimulationConfig(fast_transport=False))  # the way out works
    params.use_fast_arrays(True)


def test_an_untested_flower_refuses_the_fast_transport_only(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(fast_transport, "flwr_is_tested", lambda: False)
    with pytest.raises(FlowerCompatError, match="fast_transport=false") as err:
        fast_transport.prepare(SimulationConfig(fast_transport=True))
    _assert_one_line_naming_flower(err.value)
    fast_transport.prepare(SimulationConfig(fast_transport=False))
    params.use_fast_arrays(True)


def test_delivery_that_the_engine_never_called_fails_loudly() -> None:
    pushed = PushedNodes()
    verify_delivery_used(pushed)  # nothing pushed: nothing to check
    pushed.add([1])
    with pytest.raises(FlowerCompatError, match="never called") as err:
        verify_delivery_used(pushed)
    _assert_one_line_naming_flower(err.value)
    pushed.extractor_runs = 1
    verify_delivery_used(pushed)


def test_server_optimizer_moments_are_read_through_a_checked_accessor() -> None:
    strategy = build_strategy(StrategyConfig(server_optimizer="adam"), ClientConfig())
    assert optimizer_moments(strategy) == {"m_t": None, "v_t": None}
    strategy.m_t = {"w": np.ones(2)}
    strategy.v_t = {"w": np.full(2, 2.0)}
    meta, arrays = strategy_state(strategy)
    assert meta["m_t"] == ["w"] and arrays["v_t/w"].tolist() == [2.0, 2.0]
    del strategy.v_t  # what a Flower rename would look like
    with pytest.raises(FlowerCompatError, match="has no v_t") as err:
        strategy_state(strategy)
    _assert_one_line_naming_flower(err.value)
    plain = build_strategy(StrategyConfig(server_optimizer="none"), ClientConfig())
    assert optimizer_moments(plain) == {}
