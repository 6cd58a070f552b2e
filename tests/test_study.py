"""The fairness-gap study end to end: experiment files, sweep, rf2-figures, notebook.

The slow test runs ``rf2 -m +experiment=rf2_fairness_gap_quick`` as a real CLI multirun
(6 optimizations x 2 populations x 2 seeds, synthetic data, 3 rounds), then
``rf2-figures`` on its folder, then executes ``notebooks/fairness_gap.ipynb`` headless
against it. The fast tests check the experiment files compose and validate, the stored
notebook, and the optional TensorBoard logger.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from conftest import compose_experiment, text_layout_problems

from rf2.analysis.figures import (
    plot_fairness_gap,
    plot_participation,
    plot_tier_curves,
    plot_user_cdf,
)
from rf2.analysis.results import find_runs, load
from rf2.cli.support import precheck_overrides
from rf2.core.config import load_run_config
from rf2.core.errors import ConfigError
from rf2.runs.tensorboard_log import TensorBoardLogger, check_available, scalars_of

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "fairness_gap.ipynb"
OPTIMIZATIONS = ("none", "exclude-low", "over-select", "quantize", "prune", "heterofl")
POPULATIONS = ("independent", "popularity-dirichlet")
QUICK_SEEDS = (1, 2)
FIGURES = ("tier_curves_recall_at_20", "fairness_gap_recall_at_20", "participation")


# -- the experiment files -------------------------------------------------------------------

def _sweep(params: dict[str, str]) -> dict[str, list[str]]:
    return {key: [v.strip() for v in str(value).split(",")] for key, value in params.items()}


@pytest.mark.parametrize("experiment, dataset, seeds", [
    ("rf2_fairness_gap", "movielens100k", ["1", "2", "3"]),
    ("rf2_fairness_gap_quick", "synthetic", ["1", "2"]),
])
def test_experiment_composes_and_validates(experiment: str, dataset: str, seeds: list[str]) -> None:
    data = compose_experiment(experiment, "dataset.path=/data/ml-100k")
    params = _sweep(data["hydra"]["sweeper"]["params"])
    assert params == {"optimization": list(OPTIMIZATIONS), "population": list(POPULATIONS),
                      "seed": seeds}
    cfg = load_run_config(data)
    assert cfg.dataset.name == dataset
    assert cfg.devices.profile == "rf2-3tier"
    assert cfg.model.name == "two_tower"  # pinned: the study's numbers are the two-tower's
    assert cfg.simulation.backend == "inprocess"
    assert cfg.round.deadline_quantile is None and cfg.round.deadline_s is None
    # every swept choice exists in its group
    for opt in OPTIMIZATIONS:
        assert (REPO / "conf" / "optimization" / f"{opt}.yaml").is_file()


def test_experiment_needs_the_plus_and_passes_the_cli_precheck() -> None:
    args = ["-m", "+experiment=rf2_fairness_gap", "dataset.path=/data/ml-100k",
            "hydra.sweep.dir=/tmp/x"]
    assert precheck_overrides(args) == args
    text = (REPO / "conf" / "experiment" / "rf2_fairness_gap.yaml").read_text(encoding="utf-8")
    assert text.startswith("# @package _global_")


# -- the stored notebook ------------------------------------------------------------------

def _code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_stored_without_outputs_and_without_library_code() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert all(c.outputs == [] and c.execution_count is None for c in cells)
    assert 'RUN_DIR = os.environ.get("RF2_RUN_DIR"' in cells[0].source
    for cell in cells:
        assert not any(line.lstrip().startswith(("def ", "class ", "lambda"))
                       for line in cell.source.splitlines()), cell.source
    assert any("mdac-table" in c.metadata.get("tags", []) for c in cells)


# -- TensorBoard --------------------------------------------------------------------------

ROW = {"round": 3, "recall@20": 0.25, "ndcg@20": 0.1, "num_clients_trained": 90,
       "skipped": False, "skipped_reason": None, "tier/low/recall@20": 0.2,
       "tier/low/completed": 30, "fair/recall@20/max_gap": float("nan"),
       "activity/q1/recall@20": 0.1, "popularity/recall@20": 0.05, "train/train_loss": 4.0}


def test_scalars_of_keeps_tier_fair_and_overall_numbers() -> None:
    got = scalars_of(ROW)
    assert set(got) == {"recall@20", "ndcg@20", "num_clients_trained", "tier/low/recall@20",
                        "tier/low/completed", "fair/recall@20/max_gap"}
    assert got["tier/low/completed"] == 30.0


class _FakeWriter:
    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.flushes, self.closed = log_dir, [], 0, False

    def add_scalar(self, tag: str, value: float, step: int | None = None) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def test_tensorboard_logger_writes_each_scalar_at_the_round(tmp_path: Path) -> None:
    writers: list[_FakeWriter] = []

    def factory(log_dir: str) -> _FakeWriter:
        writers.append(_FakeWriter(log_dir))
        return writers[-1]

    with TensorBoardLogger(tmp_path, writer_factory=factory) as tb:
        assert tb.log_row(ROW) == 6
        tb.log_row({"round": 4, "tier/mid/auc": 0.7})
    (w,) = writers
    assert w.log_dir == str(tmp_path / "tensorboard") and w.closed and w.flushes == 2
    assert ("tier/low/recall@20", 0.2, 3) in w.scalars and ("tier/mid/auc", 0.7, 4) in w.scalars
    assert all(step in (3, 4) for _, _, step in w.scalars)


def test_tensorboard_missing_is_a_config_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError, match=r"pip install rf2\[tensorboard\]"):
        check_available()
    with pytest.raises(ConfigError, match=r"^config error: tensorboard=True is not allowed"):
        TensorBoardLogger(tmp_path)
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_real_events_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    check_available()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardLogger(tmp_path) as tb:
        tb.log_row(ROW)
        tb.log_row({**ROW, "round": 4, "tier/low/recall@20": 0.3})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "tier/low/recall@20" in acc.Tags()["scalars"]
    events = acc.Scalars("tier/low/recall@20")
    assert [(e.step, round(e.value, 6)) for e in events] == [(3, 0.2), (4, 0.3)]


# -- the quick study, end to end -----------------------------------------------------------

# The README's and docs/studies.md's commands, run verbatim (tests/test_docs_commands.py
# checks these strings are the documented ones) from a fresh folder.
SWEEP_COMMAND = "rf2 -m +experiment=rf2_fairness_gap_quick hydra.sweep.dir=multirun/rf2_fairness_gap_quick"  # noqa: E501
FIGURES_COMMAND = "rf2-figures multirun/rf2_fairness_gap_quick"
NOTEBOOK_COMMAND = "RF2_RUN_DIR=multirun/rf2_fairness_gap_quick jupyter nbconvert --to notebook --execute notebooks/fairness_gap.ipynb --output-dir multirun/rf2_fairness_gap_quick"  # noqa: E501


def _documented(command: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a documented command line in bash, with this interpreter's scripts on PATH."""
    bin_dirs = [str(Path(sys.executable).parent)]
    if not (Path(sys.executable).parent / "jupyter").exists():
        # A virtualenv on a shared base has no jupyter script of its own: make `jupyter`
        # this interpreter's (a jupyter found elsewhere on PATH would import another rf2).
        shim = cwd / ".bin"
        shim.mkdir(exist_ok=True)
        (shim / "jupyter").write_text(  # `jupyter nbconvert ARGS` = `python -m nbconvert ARGS`
            f'#!/bin/sh\n[ "$1" = nbconvert ] && shift && exec "{sys.executable}" -m nbconvert "$@"'
            f'\nexec "{sys.executable}" -m jupyter "$@"\n')
        (shim / "jupyter").chmod(0o755)
        bin_dirs.insert(0, str(shim))
    env = {**os.environ, **extra_env, "HYDRA_FULL_ERROR": "1",
           "PATH": os.pathsep.join([*bin_dirs, os.environ["PATH"]])}
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, command + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("study")
    (tmp / "notebooks").symlink_to(NOTEBOOK.parent)  # the notebook's path as documented
    proc = _documented(SWEEP_COMMAND, tmp)
    (tmp / "console.txt").write_text(proc.stdout, encoding="utf-8")
    return tmp / "multirun" / "rf2_fairness_gap_quick"


@pytest.mark.slow
def test_quick_study_sweep_figures_and_notebook(quick_sweep: Path) -> None:
    # 1. the multirun: one finished run folder per (optimization, population, seed)
    runs = find_runs(quick_sweep)
    expected = set(itertools.product(OPTIMIZATIONS, POPULATIONS, QUICK_SEEDS))
    assert len(runs) == len(expected)
    seen = set()
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        seen.add((cfg["optimization"]["name"], cfg["population"]["mode"], cfg["seed"]))
        assert (run / "DONE").is_file(), run
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        assert "tier/low/recall@20" in rows[-1]
    assert seen == expected
    # the sweep ends with one table of its jobs and the command to run next
    console = (quick_sweep.parent.parent / "console.txt").read_text(encoding="utf-8")
    assert f"rf2: sweep finished: {len(expected)} of {len(expected)} job(s) done" in console
    assert console.rstrip().endswith(f"next: {FIGURES_COMMAND}")  # what the docs run next
    assert "rf2: run finished" not in console  # one line per job, not a summary each

    # 2. rf2-figures on the folder: PNG and PDF of every figure
    out = quick_sweep / "figures"
    proc = _documented(FIGURES_COMMAND, quick_sweep.parent.parent)
    assert "MDAC" in proc.stdout and "exclude-low" in proc.stdout
    for name in FIGURES:
        for ext in ("png", "pdf"):
            path = out / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path

    # 3. the notebook, headless, against the same folder
    _execute_notebook(quick_sweep)


@pytest.mark.slow
def test_quick_study_figures_keep_their_text_clear(quick_sweep: Path) -> None:
    df = load(quick_sweep)
    figures = {"tier curves": plot_tier_curves(df), "fairness gap": plot_fairness_gap(df),
               "participation": plot_participation(df), "user cdf": plot_user_cdf(df)}
    for name, figure in figures.items():
        assert text_layout_problems(figure) == [], name
        # honest titles: what was averaged, over how many seeds
        assert f"over {len(QUICK_SEEDS)} seeds" in figure.get_suptitle().replace("\n", " ")
    gap = figures["fairness gap"]
    # 5 optimizations + the MDAC panel fill the 2 x 3 grid: no empty panel
    assert len(gap.axes) == len(OPTIMIZATIONS)
    assert all("ratio not shown: 2 seed(s)" in ax.get_title() for ax in gap.axes[:-1])
    curves = figures["tier curves"]
    assert all("popularity baseline" in [ln.get_label() for ln in ax.get_lines()]
               for ax in curves.axes)


def _execute_notebook(run_dir: Path) -> None:
    """The documented nbconvert command; the executed copy lands in the run folder. The
    quick sweep stands in for the scale study too (same tierings, compared at the end)."""
    _documented(NOTEBOOK_COMMAND, run_dir.parent.parent,
                RF2_SCALE_RUN_DIR=str(run_dir.relative_to(run_dir.parent.parent)))
    assert not list(NOTEBOOK.parent.glob("*.nbconvert.ipynb"))  # nothing left in notebooks/
    nb = nbformat.read(run_dir / NOTEBOOK.name, as_version=4)
    cells = _code_cells(nb)
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    (mdac,) = [c for c in cells if "mdac-table" in c.metadata.get("tags", [])]
    text = "".join(o.get("data", {}).get("text/plain", "") for o in mdac.outputs)
    assert "mdac_mean" in text and "exclude-low" in text
    images = [c for c in cells if any("image/png" in o.get("data", {}) for o in c.outputs)]
    # tier curves, fairness gap, participation; the scale study's fairness gap and curves
    assert len(images) == 5
    (scale,) = [c for c in cells if "scale-study" in c.metadata.get("tags", [])]
    assert "mdac_realistic" in "".join(o.get("data", {}).get("text/plain", "")
                                       for o in scale.outputs)
    (passes,) = [c for c in cells if "pass-study" in c.metadata.get("tags", [])]
    assert "RF2_PASS_RUN_DIR is not set" in "".join(o.get("text", "") for o in passes.outputs)
