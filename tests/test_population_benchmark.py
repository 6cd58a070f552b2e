"""benchmarks/population.py: one small setting measured in-process, the quick mode's table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("population_bench",
                                                  REPO / "benchmarks" / "population.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["inprocess", pytest.param("ray", marks=pytest.mark.slow)])
def test_measure_one_reports_every_figure(tmp_path: Path, backend: str) -> None:
    bench = _bench()
    import rf2.cli.runner as runner

    before = runner.prepare
    row = bench.measure_one(backend, 300, 200, 3, root=tmp_path)  # Ray: its own temp dir
    assert runner.prepare is before  # the timing wrapper is removed again
    assert row["backend"] == backend and row["users"] == 300 and row["clicks"] > 300
    assert 0 < row["build_s"] < row["to_round1_s"] < row["total_s"]
    assert row["round_s"] > 0 and row["full_eval_s"] > 0 and row["peak_rss_gb"] > 0.1
    assert row["eval_users"] == 300  # eval.final_max_users=0: every test user


def test_table_gives_ratios_against_the_smallest_population() -> None:
    bench = _bench()
    base = {"backend": "ray", "users": 10, "clicks": 100, "build_s": 2.0, "to_round1_s": 4.0,
            "round_s": 0.5, "peak_rss_gb": 1.0, "full_eval_s": 1.0, "eval_users": 10}
    big = {**base, "users": 40, "clicks": 400, "build_s": 8.0, "round_s": 0.75}
    lines = bench.table([big, base]).splitlines()
    assert lines[2].startswith("| ray | 40 | 400 | 8.0 (4.00x) | 4.0 (1.00x) | 0.75 (1.50x)")
    assert lines[3].startswith("| ray | 10 | 100 | 2.0 | 4.0 | 0.50 |")


@pytest.mark.slow  # rf2 subprocesses
def test_quick_mode_writes_the_table(tmp_path: Path) -> None:
    """main: one fresh process per setting, the table with ratios, written to --out. One
    backend here: a Ray row costs a Ray start per process, and measure_one on Ray (above)
    and table's rows of another backend (the unit test) are checked on their own."""
    out = tmp_path / "population.md"
    code = _bench().main(["--quick", "--backends", "inprocess", "--sizes", "300,600",
                          "--items", "200", "--rounds", "3", "--out", str(out)])
    assert code == 0
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ")][1:]
    assert len(rows) == 2 and all(r.startswith("| inprocess") for r in rows)
    assert "| 300 |" in rows[0] and "| 600 |" in rows[1] and "x)" in rows[1] and "x)" not in rows[0]
