"""rf2.analysis.figures: main() on a fabricated multirun folder writes non-empty PNG and PDF files.

Rendering dominates the cost, so the full sweep is rendered once per module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import pytest
from conftest import text_layout_problems
from matplotlib.figure import Figure

from rf2.analysis.figures import main, plot_fairness_gap, plot_participation, plot_tier_curves
from rf2.analysis.results import ResultsError, load

# The sweep fabricator lives in test_results.py; load it by path so this works under any
# pytest import mode.
_spec = importlib.util.spec_from_file_location(
    "rf2_test_results_fabric", Path(__file__).with_name("test_results.py"))
assert _spec is not None and _spec.loader is not None
fabric = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fabric
_spec.loader.exec_module(fabric)


@pytest.fixture(scope="module")
def multirun(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fabric.make_multirun(tmp_path_factory.mktemp("figs") / "multirun")


@pytest.fixture(scope="module")
def rendered(multirun: Path) -> tuple[Path, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(multirun), "--metric", "recall@20"]) == 0
    return multirun / "figures", stdout.getvalue()


def test_main_writes_png_and_pdf(rendered: tuple[Path, str]) -> None:
    out, _ = rendered
    for name in ("tier_curves_recall_at_20", "fairness_gap_recall_at_20", "participation"):
        for ext in ("png", "pdf"):
            path = out / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
    assert (out / "mdac_recall_at_20.csv").is_file()
    assert (out / "mdac_ratio_recall_at_20.csv").is_file()


def test_main_prints_the_mdac_table(rendered: tuple[Path, str]) -> None:
    _, printed = rendered
    assert "MDAC" in printed and "exclude_low" in printed
    assert "3.333" in printed  # mean-of-seeds ratio 1.0 / 0.3


def test_main_without_reference_says_so(multirun: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Rendering is covered above; here only which files main() chooses to write.
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: Path(path).write_bytes(
        b"x" * 2000))
    shutil.copytree(multirun / "2", tmp_path / "runs" / "2")  # exclude_low only
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--formats", "png"]) == 0
    assert "no reference run with optimization='none'" in capsys.readouterr().out
    assert (tmp_path / "o" / "participation.png").stat().st_size > 1000
    assert (tmp_path / "o" / "tier_curves_recall_at_20.png").is_file()
    assert not list((tmp_path / "o").glob("fairness_gap*"))


def test_main_on_a_folder_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_main_with_an_unknown_metric_is_one_line_and_exit_2(
        multirun: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(multirun), "--metric", "foo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'foo'" in err[0] and "recall@20" in err[0]
    assert not (tmp_path / "o").exists()


def test_plot_functions_return_figures(multirun: Path) -> None:
    df = load(multirun)
    fig = plot_fairness_gap(df)
    assert isinstance(fig, Figure)
    # Two seeds: a ratio's seed spread means nothing, so the ratio is not drawn.
    assert "MDAC ratio not shown: 2 seed(s), needs 3" in fig.axes[0].get_title()
    assert "over 2 seeds" in fig.get_suptitle().replace("\n", " ")
    # One population only: still plotted, without a ratio.
    fig = plot_fairness_gap(df[df["population"] == "independent"])
    assert "no realistic/independent ratio" in fig.axes[0].get_title()
    with pytest.raises(ResultsError, match="tier/<tier>/auc"):
        plot_tier_curves(df, "auc")
    with pytest.raises(ResultsError, match="completed"):
        plot_participation(df[~df["metric"].str.endswith("/completed")])


def test_fairness_gap_with_three_seeds_shows_the_ratio_with_its_spread(
        multirun: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # seed 3's MDAC: independent 0.3, realistic 1.0, so the means stay 0.3 and 1.0
    monkeypatch.setitem(fabric.D["independent"], 3, (-0.15, 0.0, 0.15))
    monkeypatch.setitem(fabric.D["popularity-dirichlet"], 3, (-0.55, 0.0, 0.45))
    runs = tmp_path / "runs"
    shutil.copytree(multirun, runs)
    for job, (optimization, population) in enumerate(
            [(o, p) for p in fabric.POPULATIONS for o in ("none", "exclude_low")], start=100):
        fabric.write_run(runs / str(job), optimization, population, 3)
    fig = plot_fairness_gap(load(runs))
    title = fig.axes[0].get_title()
    assert "3.33x" in title and "per seed" in title and "n = 3" in title
    # every grid slot holds a panel: the optimization's bars and the MDAC panel
    assert len(fig.axes) == 2 and fig.axes[1].get_title().startswith("MDAC = max")
    assert text_layout_problems(fig) == []


def test_single_tier_curves_draw_no_duplicate_series_and_the_baseline(tmp_path: Path) -> None:
    fabric.write_run(tmp_path / "run", "none", "independent", 1)
    df = load(tmp_path / "run")
    one_tier = df[~df["metric"].str.startswith(("tier/low/", "tier/mid/"))]
    fig = plot_tier_curves(one_tier)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["all users", "popularity baseline"]  # the one tier is all users
    baseline = df[df["metric"] == "popularity/recall@20"]["value"].item()
    assert fig.axes[0].get_lines()[1].get_ydata()[0] == pytest.approx(baseline)
    assert "one seed" in fig.get_suptitle() and "±" not in fig.get_suptitle()
    assert not fig.axes[0].collections  # no ± std band for a single seed
    for figure in (fig, plot_tier_curves(df), plot_participation(df)):
        assert text_layout_problems(figure) == []


def test_extra_tiers_never_take_a_reserved_tier_colour() -> None:
    from rf2.analysis.figures import _colors

    tiers = ["a", "b", "mid", *[f"t{i}" for i in range(12)]]
    colors = _colors(tiers)
    assert colors["mid"] == "#ff7f0e"
    reserved = {"#d62728", "#ff7f0e", "#2ca02c"}
    assert not reserved & {colors[t] for t in tiers if t != "mid"}
    assert len({colors[t] for t in tiers[:8]}) == 8  # seven spares, then they repeat
