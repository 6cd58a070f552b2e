"""The RF² reproduction study (issue 13): experiment files compose; the quick variant runs
end to end through the CLI and ``rf2-figures --passes``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, compose_experiment, text_layout_problems
from nbclient import NotebookClient

from rf2.analysis.figures import main as figures_main
from rf2.analysis.figures import plot_pass_study
from rf2.analysis.results import find_runs, load, pass_study_tables
from rf2.core.config import load_run_config

TIERINGS = ["rf2-random", "rf2-dirichlet", "rf2-dirichlet-leakfree"]
OPTIMIZATIONS = ["none", "exclude-low", "over-select"]


@pytest.mark.parametrize(("experiment", "dataset", "seeds"), [
    ("rf2_reproduce_ml100k", "movielens100k", ["1", "2", "3", "4", "5"]),
    ("rf2_reproduce_quick", "synthetic", ["1", "2"]),
])
def test_reproduce_experiments_sweep_the_study_and_validate(experiment: str, dataset: str,
                                                           seeds: list[str]) -> None:
    data = compose_experiment(experiment, "dataset.path=/data/ml-100k")
    params = {k: [v.strip() for v in str(p).split(",")]
              for k, p in data["hydra"]["sweeper"]["params"].items()}
    assert params == {"population": TIERINGS, "optimization": OPTIMIZATIONS, "seed": seeds}
    cfg = load_run_config(data)
    assert cfg.dataset.name == dataset
    # Compared by pass: a row at the end of each pass, and at least the passes compared.
    assert cfg.eval.at_pass_end and cfg.num_passes >= 2
    leaky = load_run_config(compose_experiment(experiment, "dataset.path=/x", "population=rf2-dirichlet"))
    free = load_run_config(compose_experiment(experiment, "dataset.path=/x",
                                    "population=rf2-dirichlet-leakfree"))
    assert leaky.population.leak_test and not free.population.leak_test


@pytest.mark.slow
def test_quick_reproduce_study_end_to_end(tmp_path: Path, rf2_in_process: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # rf2's command and rf2-figures in this process (no interpreter start importing torch
    # each); real rf2 and rf2-figures processes run the documented study in test_study.py.
    sweep = tmp_path / "study"
    proc = rf2_in_process("-m", "+experiment=rf2_reproduce_quick", f"hydra.sweep.dir={sweep}",
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(find_runs(sweep)) == 18
    # the notebook draws the same pass study with the same rf2.analysis functions
    nb = nbformat.read(REPO / "notebooks" / "fairness_gap.ipynb", as_version=4)
    env = {"RF2_RUN_DIR": str(sweep), "RF2_PASS_RUN_DIR": str(sweep), "RF2_PASSES": "1,2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, kernel_name="python3", timeout=300,
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    (cell,) = [c for c in nb.cells if "pass-study" in c.metadata.get("tags", [])]
    assert "rf2-dirichlet" in "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs)
    tables = pass_study_tables(load(sweep), "rated_auc", passes=(1, 2))
    assert set(tables.ratio["realistic"]) == {"rf2-dirichlet", "rf2-dirichlet-leaky"}
    # two seeds: the ratios' spread means nothing, so the figure draws MDAC only, clear text
    figure = plot_pass_study(tables, "rated_auc")
    assert len(figure.axes) == 2 and "ratios need 3 seeds" in figure.get_suptitle().replace("\n", " ")
    assert text_layout_problems(figure) == []
    # RF²'s dirichlet map has no caps: on 150 synthetic users a tier can hold ~20 users whose
    # test ratings are all one class, so that tier's AUC (and the run's MDAC) is undefined.
    # MDAC is NaN exactly there; every other run has a finite, non-negative MDAC.
    frame = load(sweep)
    tier_auc = frame[frame["metric"].str.match(r"tier/[^/]+/rated_auc$")]
    undefined = set(tier_auc[tier_auc["value"].isna()]["run"].astype(str))
    mdac = tables.mdac
    assert (mdac["mdac"].dropna() >= 0).all()
    assert mdac[mdac["tiering"] == "rf2-random"]["mdac"].notna().all()
    assert set(mdac[mdac["mdac"].isna()]["run"].astype(str)) <= undefined
    finite = mdac.dropna(subset=["mdac"]).groupby(["pass", "optimization", "tiering"]).size()
    summary = tables.mdac_summary.set_index(["pass", "optimization", "tiering"])["n_seeds"]
    assert (summary.reindex(finite.index) == finite).all() and finite.max() == 2
    capsys.readouterr()
    code = figures_main([str(sweep), "--passes", "1,2", "--metric", "rated_auc",
                         "--formats", "png"])
    assert code == 0
    assert "MDAC(realistic) / MDAC(rf2-random)" in capsys.readouterr().out
    assert (sweep / "figures" / "pass_study_rated_auc.png").is_file()
