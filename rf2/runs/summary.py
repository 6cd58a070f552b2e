"""What a finished run and a finished sweep tell the researcher on the console.

A run's summary says what ran (data, model, strategy, tiering, devices, backend), how
long, and what was learned: each headline metric's popularity baseline, untrained value
(round 0), final and best value side by side, so a rise from round 0 is read against
what recommending the most clicked items already gets. Per-tier lines appear only when
the run has more than one tier. A sweep ends with one table of its jobs.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rf2.runs.run_folder import RunFolder
from rf2.runs.what_ran import config_value, part_used, server_optimizer_used

SUMMARY_METRICS = ("recall@20", "ndcg@20")


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4f}"
    return "n/a"


def _seconds(value: Any) -> str:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    return f"{value:.1f} s" if ok else "n/a"


def _shown(path: Path) -> str:
    """A folder as the user would type it: relative to the working directory if below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_get = config_value


def _read_yaml_or_json(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_run(config: Mapping[str, Any], data: Mapping[str, Any],
                 tiers: Sequence[str]) -> list[str]:
    """Three lines naming what ran, from the run's config.yaml and data.json (a plug-in
    by its ``_target_``: ``rf2.runs.what_ran``)."""
    name = part_used(config, "dataset") or "?"
    sizes = (f" ({int(data['users']):,} users x {int(data['items']):,} items)"
             if "users" in data and "items" in data else "")
    model = part_used(config, "model") or "?"
    if _get(config, "mode") == "central":
        how = (f"central: {_get(config, 'central.optimizer')} lr {_get(config, 'central.lr')}, "
               f"{_get(config, 'central.epochs')} epoch(s), batch {_get(config, 'central.batch_size')}")
    else:
        strategy = str(part_used(config, "strategy") or "?")
        server = server_optimizer_used(config)
        if server and server != "none":
            beta = (f", beta {_get(config, 'strategy.server_momentum')}"
                    if server == "momentum" else "")
            strategy += f" + server {server} (lr {_get(config, 'strategy.server_lr')}{beta})"
        how = (f"{strategy}, {_get(config, 'clients_per_round')} clients/round, "
               f"optimization {_get(config, 'optimization.name', 'none')}")
    backend = _get(config, "simulation.backend", "?")
    where = "on Ray" if backend == "ray" else "in-process"
    if backend == "ray" and _get(config, "simulation.ray_address"):
        where += f" (cluster {_get(config, 'simulation.ray_address')})"
    tiering = (f"{len(tiers)} tiers ({', '.join(tiers)}), population "
               f"{part_used(config, 'population') or '?'}" if len(tiers) > 1 else "one tier")
    return [f"  data     {name}{sizes}",
            f"  model    {model}; {how}",
            f"  devices  {_get(config, 'devices.profile', '?')}: {tiering}"
            + ("" if _get(config, "mode") == "central" else f"; clients {where}")]


def _ordered(names: Sequence[str]) -> list[str]:
    """low, mid, high first (reading order), then the rest as given."""
    known = [t for t in ("low", "mid", "high") if t in names]
    return known + [t for t in names if t not in known]


def _tiers(folder: Path, last_row: Mapping[str, Any]) -> list[str]:
    population = _read_yaml_or_json(folder / "population.json")
    names = list((population.get("tiers") or {}).keys())
    if names:
        return _ordered(names)
    return _ordered(sorted({k.split("/")[1] for k in last_row if k.startswith("tier/")
                   and k.endswith("/" + SUMMARY_METRICS[0])}))


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, int]]:
    return [(float(r[key]), int(r["round"])) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def run_summary(folder: RunFolder) -> list[str]:
    """The end-of-run summary: folder, what ran, rounds and times, and per headline
    metric its popularity baseline, round 0, final and best values (per tier too when
    the run has several tiers)."""
    rows = folder.read_metrics()
    if not rows:
        return [f"rf2: run folder {folder.path}: no rounds yet"]
    last, first = rows[-1], rows[0]
    config = _read_yaml_or_json(folder.path / "config.yaml")
    data = _read_yaml_or_json(folder.path / "data.json")
    tiers = _tiers(folder.path, last)
    unit = "evaluations" if _get(config, "mode") == "central" else "rounds"
    lines = [f"rf2: run finished: {folder.path}", *describe_run(config, data, tiers),
             f"  {unit} {int(last['round'])}, wall {_seconds(last.get('wall_time_s'))}"
             + (f", simulated {_seconds(last.get('sim_time_s'))}"
                if _get(config, "mode") != "central" else "")]
    lines.append(f"  {'metric':<10} {'popularity':>10} {'round 0':>8} {'final':>8} {'best':>8}")
    for metric in SUMMARY_METRICS:
        evaluated = _series(rows, metric)
        if not evaluated:
            continue
        best, best_round = max(evaluated)
        lines.append(f"  {metric:<10} {_fmt(first.get('popularity/' + metric)):>10} "
                     f"{_fmt(first.get(metric)):>8} {_fmt(evaluated[-1][0]):>8} "
                     f"{_fmt(best):>8} (round {best_round})")
    if len(tiers) > 1:
        for metric in SUMMARY_METRICS:
            finals = []
            for tier in tiers:
                series = _series(rows, f"tier/{tier}/{metric}")
                if series:
                    finals.append(f"{tier} {_fmt(series[-1][0])}")
            if finals:
                lines.append(f"  {metric} per tier, final: " + ", ".join(finals))
    return lines + node_lines(folder.path)


NODES = "nodes.json"  # written by rf2.cli.runner from rf2.fl.ray_nodes


def node_lines(path: Path) -> list[str]:
    """The Ray nodes the run's clients trained on (``nodes.json``), one line each."""
    try:
        nodes = json.loads((path / NODES).read_text(encoding="utf-8"))["nodes"]
    except (OSError, ValueError, KeyError):
        return []
    lines = [f"  ray nodes {len(nodes)}:"]
    for node in nodes:
        lines.append(f"    {node['node_id'][:12]} at {node['address']}, {node['cpus']:g} CPU: "
                     f"{node['clients_trained']} clients trained")
    return lines


def job_line(folder: RunFolder) -> str:
    """One line for a finished sweep job: folder, final headline metric and, when it
    was evaluated, its popularity baseline (the sweep's table follows at the end)."""
    rows = folder.read_metrics()
    metric = SUMMARY_METRICS[0]
    series = _series(rows, metric)
    final = _fmt(series[-1][0]) if series else "n/a"
    baseline = rows[0].get("popularity/" + metric) if rows else None
    # Only when evaluated (eval.metrics lists popularity): "n/a" on every job is noise.
    known = f" (popularity {_fmt(baseline)})" if isinstance(baseline, (int, float)) else ""
    return f"rf2: job finished: {_shown(folder.path)}  {metric} {final}{known}"


@dataclass(frozen=True)
class JobOutcome:
    """One sweep job as the sweep summary lists it."""

    job: str  # Hydra's job number
    folder: Path | None
    status: str  # done, interrupted, failed, not started
    overrides: tuple[str, ...] = ()  # the job's command-line overrides


def final_value(folder: Path | None, metric: str) -> float | None:
    """The last logged value of ``metric`` in a run folder (None if never logged)."""
    if folder is None:
        return None
    series = _series(RunFolder(folder).read_metrics(), metric)
    return series[-1][0] if series else None


def sweep_summary(outcomes: Sequence[JobOutcome], metric: str = SUMMARY_METRICS[0]) -> list[str]:
    """One table (job, final metric, status, folder) and the rf2-figures command to run
    next, on the jobs' common folder."""
    if not outcomes:
        return []
    done = sum(o.status == "done" for o in outcomes)
    # Overrides every job shares say nothing about which job is which.
    shared = set.intersection(*(set(o.overrides) for o in outcomes))
    lines = [f"rf2: sweep finished: {done} of {len(outcomes)} job(s) done",
             f"  {'job':>4}  {'final ' + metric:>16}  {'status':<12} {'folder':<24} overrides"]
    for o in sorted(outcomes, key=lambda o: (int(o.job) if o.job.isdigit() else 1 << 30, o.job)):
        own = " ".join(x for x in o.overrides if x not in shared)
        folder = _shown(o.folder) if o.folder is not None else "-"
        lines.append(f"  {o.job:>4}  {_fmt(final_value(o.folder, metric)):>16}  {o.status:<12} "
                     f"{folder:<24} {own}".rstrip())
    folders = [o.folder for o in outcomes if o.folder is not None]
    if folders:
        common = Path(_common_parent(folders))
        lines.append(f"  next: rf2-figures {shlex.quote(str(common))}")
    return lines


def _common_parent(folders: Sequence[Path]) -> str:
    parts = [p.resolve().parts for p in folders]
    common: list[str] = []
    for group in zip(*parts, strict=False):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    base = Path(*common) if common else Path("/")
    if len(folders) == 1:
        base = folders[0].resolve().parent
    try:
        return str(base.relative_to(Path.cwd()))
    except ValueError:
        return str(base)
