"""Shared fixtures: small, fast configurations and the MovieLens-100K location."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


# Fields that measure wall-clock time: the only ones allowed to differ between two runs
# of the same config and seed.
TIMING = ("wall_time_s", "round_wall_s", "eval_wall_s")


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run folder's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def ml100k_path() -> Path | None:
    """MovieLens-100K: $RF2_ML100K, else ../shared/data/ml-100k next to the checkout."""
    env = os.environ.get("RF2_ML100K")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "ml-100k")
    for path in candidates:
        if (path / "u.data").is_file():
            return path
    return None


def amazon_cds_path() -> Path | None:
    """Amazon-CDs RecBole files: $RF2_AMAZON_CDS, else shared/data/amazon-cds beside the
    checkout (or beside its parent folder, for a git worktree one level down)."""
    env = os.environ.get("RF2_AMAZON_CDS")
    candidates = [Path(env)] if env else []
    candidates += [base / "shared" / "data" / "amazon-cds" for base in REPO.parents[:2]]
    return next((p for p in candidates if (p / "amazon-cds.inter").is_file()), None)


@pytest.fixture
def amazon_cds() -> Path:
    path = amazon_cds_path()
    if path is None:
        pytest.skip("amazon-cds not available (set RF2_AMAZON_CDS or provide "
                    "../shared/data/amazon-cds)")
    return path


@pytest.fixture
def ml100k() -> Path:
    path = ml100k_path()
    if path is None:
        pytest.skip("MovieLens-100K not available (set RF2_ML100K or provide ../shared/data/ml-100k)")
    return path


def rf2_maps_path() -> Path | None:
    """RF²'s own tier maps (test fixtures): ../shared/fixtures/rf2-maps beside the checkout."""
    path = REPO.parent / "shared" / "fixtures" / "rf2-maps"
    return path if (path / "README.md").is_file() else None


@pytest.fixture
def rf2_maps() -> Path:
    path = rf2_maps_path()
    if path is None:
        pytest.skip("RF²'s maps not available (../shared/fixtures/rf2-maps)")
    return path


def small_run(**overrides: Any) -> dict[str, Any]:
    """A run config mapping: 200 synthetic users, 20 clients/round, in-process, quiet."""
    cfg: dict[str, Any] = {
        "seed": 7,
        "num_rounds": 3,
        "clients_per_round": 20,
        "progress": False,
        "dataset": {"name": "synthetic", "num_users": 200, "num_items": 150, "num_groups": 5},
        "model": {"dim": 16},
        "simulation": {"backend": "inprocess"},
        "eval": {"ks": [10, 20]},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def send_signal(pid: int, sig: signal.Signals) -> None:
    """SIGINT as a terminal's Ctrl-C (the whole process group), SIGTERM as ``kill``,
    ``timeout`` or a scheduler sends it (the process only)."""
    if sig == signal.SIGINT:
        os.killpg(pid, sig)
    else:
        os.kill(pid, sig)


def signal_sweep(proc: subprocess.Popen[str], sweep: Path, running: int, sig: signal.Signals,
                 timeout_s: float = 60) -> tuple[int, str]:
    """``sig`` to an rf2 sweep (started in its own session) once ``running`` of its jobs
    have logged 3 rows each; its exit code and stderr."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        started = [m for m in sweep.glob("*/metrics.jsonl") if m.read_text().count("\n") >= 3]
        if len(started) >= running:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    send_signal(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def assert_sweep_stopped_at_checkpoints(sweep: Path, err: str, running: int) -> None:
    """An interrupted sweep: its ``running`` jobs stopped at a round boundary with their
    checkpoint, no later job started, one summary on stderr lists what to resume."""
    assert "Traceback" not in err, err
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [str(i) for i in range(running)], err  # no later job
    lines = err.strip().splitlines()
    assert f"rf2: sweep interrupted; {running} job(s) to resume" in lines, err
    for job in jobs:
        n = read_rows(job)[-1]["round"]
        newest = sorted((job / "checkpoints").glob("round_*"))[-1]
        assert int(newest.name.split("_")[1]) == n
        assert f"  rf2 resume={job}" in lines
        assert f"rf2: interrupted after round {n}; resume with: rf2 resume={job}" in lines
        assert not (job / "DONE").exists() and not (job / ".lock").exists()


@pytest.fixture
def rf2_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:  # noqa: ANN401
    """``rf2 ARGS`` run by ``rf2.cli.main.main`` in this process, from ``cwd``: its exit
    status, stdout and stderr, as ``subprocess.run`` gives them. For checks that end before
    a run starts: the same code path as ``python -m rf2`` without a new interpreter that
    imports torch and Flower (seconds each); real ``rf2`` processes stay tested for exit
    codes and signals (tests/test_run_safety.py, tests/test_interrupt.py)."""
    import logging
    import logging.config

    from rf2.cli.main import SWEEP_INTERRUPTS, SWEEP_JOBS, main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["rf2", *args])
        for name in (SWEEP_INTERRUPTS, SWEEP_JOBS):  # a sweep sets them: undone at teardown
            monkeypatch.setenv(name, "")
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        # Hydra's job logging replaces the root logger's handlers (put back below) and
        # would close every handler there is, pytest's own capturing ones included.
        monkeypatch.setattr(logging.config, "_clearExistingHandlers", logging._handlers.clear)
        root = logging.getLogger()
        root_handlers, root_level = root.handlers[:], root.level
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else int(ex.code is not None)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            root.handlers[:] = root_handlers
            root.setLevel(root_level)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["rf2", *args], code, out.out, out.err)

    return run


def composed(*overrides: str) -> Any:
    """``rf2 OVERRIDES`` composed by Hydra and validated: the run's RunConfig."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from rf2.core.config import load_run_config

    with initialize_config_module(config_module="rf2.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    data = OmegaConf.to_container(cfg, resolve=True)
    return load_run_config(data)  # type: ignore[arg-type]


def compose_experiment(experiment: str, *overrides: str) -> dict[str, Any]:
    """``+experiment=NAME`` composed by Hydra (with its sweep settings), as a plain mapping."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="rf2.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}", *overrides],
                      return_hydra_config=True)
    data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    return data


def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str,
                  source: str) -> str:
    """Write ``source`` as a module of the user's own (``mylab/...`` in the docs) into a
    temporary folder on ``sys.path`` and on ``PYTHONPATH`` (Ray's workers inherit it) for
    this test only; returns its unique module name. Pop it from ``sys.modules`` after."""
    import textwrap

    pkg = tmp_path / "plugins"
    pkg.mkdir(exist_ok=True)
    name = f"{prefix}_{abs(hash(str(tmp_path))) % 10**8}"
    (pkg / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(pkg), os.environ.get("PYTHONPATH", "")) if p))
    return name


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread: on a busy 2-core machine two threads made SGD loops ~60x slower.
    import torch

    torch.set_num_threads(1)


def text_layout_problems(fig: Any) -> list[str]:
    """Texts of a drawn matplotlib figure that leave the canvas or overlap each other.

    Every visible, non-empty Text (titles, labels, tick labels, legend entries,
    annotations) is measured after a full draw on the Agg canvas; its bounding box must lie
    inside the figure and must not intersect another text's (1 px of slack).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    # Tick labels of ticks outside an axis's view interval exist but are not drawn.
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            slack = (hi - lo) * 1e-6
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not lo - slack <= tick.get_loc() <= hi + slack:
                    hidden.update({id(tick.label1), id(tick.label2)})
    boxes = []
    for text in fig.findobj(Text):
        if id(text) in hidden or not text.get_visible() or not text.get_text().strip():
            continue
        axes = text.axes
        if axes is not None and not axes.get_visible():
            continue
        box = text.get_window_extent(renderer)
        if box.width == 0 or box.height == 0:
            continue
        boxes.append((text.get_text().replace("\n", " "), box))
    problems = [f"{label!r} leaves the canvas ({box.x0:.0f},{box.y0:.0f})-"
                f"({box.x1:.0f},{box.y1:.0f}) of {width:.0f}x{height:.0f}"
                for label, box in boxes
                if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1]
    for i, (a_label, a) in enumerate(boxes):
        for b_label, b in boxes[i + 1:]:
            if (min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1):
                problems.append(f"{a_label!r} overlaps {b_label!r}")
    return problems
