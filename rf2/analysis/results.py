"""Read run folders into tidy pandas frames, and RF²'s fairness-gap tables from them.

A run folder holds ``config.yaml`` (the resolved RunConfig), ``metrics.jsonl`` (one flat
JSON object per round; round 0 = before training), ``population.json``, checkpoints and
the model. A Hydra multirun folder holds run folders at any depth (sweeps of sweeps), so
runs are found by their two files, not by Hydra's numbering. This module imports neither
torch nor Flower: a notebook on a laptop with pandas can analyse a cluster's sweep.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from rf2.core.errors import UserInputError
from rf2.eval.fairness import mdac as mdac_of
from rf2.eval.fairness import relative_change
from rf2.runs.what_ran import PARTS, config_value, part_used, server_optimizer_used

__all__ = ["ALL_USERS", "CONFIG_COLUMNS", "FairnessTables", "PassStudyTables", "ResultsError",
           "ResultsWarning", "distributions", "fairness_gap_table", "find_runs", "load",
           "load_population", "load_wide", "order_tiers", "pass_study_tables", "tier_metric",
           "to_parquet", "user_cdf"]

# Column -> dotted path in config.yaml: the axes a sweep usually varies. strategy,
# server_optimizer, model, dataset and population name what ran (rf2.runs.what_ran): a
# plug-in by its ``_target_``, and a custom strategy has no server_optimizer (None).
CONFIG_COLUMNS: dict[str, str] = {
    "mode": "mode", "strategy": "strategy.name", "server_optimizer": "strategy.server_optimizer",
    "optimization": "optimization.name", "population": "population.mode",
    "devices": "devices.profile", "dataset": "dataset.name", "model": "model.name",
    "seed": "seed", "num_rounds": "num_rounds", "clients_per_round": "clients_per_round",
    "leak_test": "population.leak_test", "protocol": "dataset.protocol",
}
# Derived column ``tiering``: population.mode (or the tiering's ``_target_``), with
# "-leaky" when the map used test clicks (population.leak_test), so leaky and leak-free
# maps of one mode stay apart.
LEAKY_SUFFIX = "-leaky"
# Besides seed and population, what must be equal for a run to be another's reference.
MATCH_COLUMNS = ("strategy", "server_optimizer", "devices", "dataset", "model")
_TIER_KEY = re.compile(r"^tier/([^/]+)/(.+)$")
PathLike = str | os.PathLike[str]
# Extra config columns: dotted paths ("population.alpha") or {column: dotted path}.
ConfigColumns = Sequence[str] | Mapping[str, str] | None


class ResultsError(UserInputError):
    """A path holds no run folder, or a run folder or results frame is unusable."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"results error: {problem}")


class ResultsWarning(UserWarning):
    """Something was skipped while reading results (e.g. a torn last line)."""


def _warn(message: str) -> None:
    warnings.warn(message, ResultsWarning, stacklevel=3)


def _natural(text: str) -> tuple[tuple[int, Any], ...]:
    """Sort key putting run "2" before "10" (Hydra numbers its job folders)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p)


def find_runs(path: PathLike) -> list[Path]:
    """Run folders (``metrics.jsonl`` + ``config.yaml``) at or below ``path``, sorted.

    Hidden folders (Hydra's ``.hydra``) and ``checkpoints`` are not searched, nor is the
    inside of a run folder.
    """
    root = Path(path)
    if not root.is_dir():
        raise ResultsError(f"{root}: no such folder")
    runs, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # symlinked runs too
        real, is_run = os.path.realpath(dirpath), {"metrics.jsonl", "config.yaml"} <= set(filenames)
        if is_run and real not in seen:
            runs.append(Path(dirpath))
        stop = is_run or real in seen  # also guards against symlink loops
        dirnames[:] = [] if stop else [d for d in dirnames if d[0] != "." and d != "checkpoints"]
        seen.add(real)
    if not runs:
        raise ResultsError(f"{root}: no run folder (one holding metrics.jsonl and config.yaml) "
                           "in it or below it")
    return sorted(runs, key=lambda r: _natural(r.relative_to(root).as_posix()))


# Old key -> today's, for run folders written before the rename: rows carried the users
# evaluated twice (``users_evaluated`` and ``eval_users``), groups as .../users_evaluated.
_RENAMED = re.compile(r"^(.*/)?users_evaluated$")


def _current_keys(record: dict[str, Any]) -> dict[str, Any]:
    """A row with old keys read under today's names (today's name wins when both exist)."""
    old = [k for k in record if _RENAMED.match(k)]
    for key in old:
        value = record.pop(key)
        record.setdefault(_RENAMED.sub(r"\1eval_users", key), value)
    return record


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a torn last line is skipped with a warning. Should a round
    appear twice (a resume), its last row wins: it belongs to the trajectory that went on.
    Keys renamed since a row was written read under today's name (:data:`_RENAMED`)."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    by_round: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise ResultsError(f"{path}:{i + 1}: not a JSON object") from None
            _warn(f"{path}:{i + 1}: skipping a torn last line (crash mid-write?)")
            break
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise ResultsError(f"{path}:{i + 1}: expected a JSON object with an integer 'round'")
        by_round[record["round"]] = _current_keys(record)
    return [by_round[r] for r in sorted(by_round)]


def _numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's metric values as floats (null -> NaN); other kinds are not metrics."""
    return {k: (math.nan if v is None else float(v)) for k, v in record.items()
            if k != "round" and (v is None or isinstance(v, (int, float)))}


def _config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """Value at a dotted path (None if absent); lists/dicts as JSON text, keeping columns
    scalar and parquet-friendly."""
    node = config_value(config, dotted)
    return json.dumps(node, sort_keys=True) if isinstance(node, (list, dict)) else node


def _column_value(config: Mapping[str, Any], column: str, dotted: str) -> Any:
    """A config column's value; the columns naming what ran read it as rf2.runs.what_ran
    does (unless the caller mapped the column to another path)."""
    if dotted == CONFIG_COLUMNS.get(column):
        if column in PARTS:
            return part_used(config, column)
        if column == "server_optimizer":
            return server_optimizer_used(config)
    return _config_value(config, dotted)


def _columns(config_columns: ConfigColumns) -> dict[str, str]:
    extra = (dict(config_columns) if isinstance(config_columns, Mapping)
             else {c: c for c in config_columns or ()})
    return {**CONFIG_COLUMNS, **extra}


def _runs(path: PathLike, columns: Mapping[str, str]) -> list[tuple[str, Path, dict[str, Any]]]:
    """(run id, folder, config column values) per run; run id = path relative to ``path``."""
    root = Path(path)
    out = []
    for run in find_runs(root):
        try:
            config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ResultsError(f"{run / 'config.yaml'}: not valid YAML ({exc})") from None
        if not isinstance(config, dict):
            raise ResultsError(f"{run / 'config.yaml'}: expected a mapping")
        values = {col: _column_value(config, col, dotted) for col, dotted in columns.items()}
        mode = part_used(config, "population")
        leaky = bool(_config_value(config, "population.leak_test"))
        values["tiering"] = None if mode is None else f"{mode}{LEAKY_SUFFIX if leaky else ''}"
        out.append((run.relative_to(root).as_posix(), run, values))
    return out


def load(path: PathLike, config_columns: ConfigColumns = None) -> pd.DataFrame:
    """One run or a (nested) multirun folder as a tidy frame, one row per (run, round, metric).

    Columns: ``run`` (folder relative to ``path``; "." for a single run), ``round``,
    ``metric``, ``value`` (float; NaN where the run logged null/NaN), then the config
    columns of :data:`CONFIG_COLUMNS` plus ``config_columns`` (dotted config paths, or a
    mapping column -> dotted path). A metric a round did not log has no row.
    """
    frames = []
    for run_id, run, values in _runs(path, _columns(config_columns)):
        rows = [(rec["round"], key, value) for rec in _read_records(run / "metrics.jsonl")
                for key, value in _numeric(rec).items()]
        frame = pd.DataFrame(rows, columns=["round", "metric", "value"])
        frame.insert(0, "run", run_id)
        frames.append(frame.assign(**values))
    return pd.concat(frames, ignore_index=True).astype({"round": "int64", "value": "float64"})


def load_wide(path: PathLike, config_columns: ConfigColumns = None) -> pd.DataFrame:
    """One row per (run, round): ``run``, ``round``, config columns, then one column per metric."""
    frames = []
    for run_id, run, values in _runs(path, _columns(config_columns)):
        records = _read_records(run / "metrics.jsonl")
        metrics = pd.DataFrame([_numeric(r) for r in records], dtype="float64")
        head = pd.DataFrame({"run": run_id, "round": [r["round"] for r in records], **values})
        frames.append(pd.concat([head, metrics], axis=1))
    return pd.concat(frames, ignore_index=True).astype({"round": "int64"})


def _position(df: pd.DataFrame, column: str) -> int:
    """Index of ``column`` among ``df``'s (unique) columns."""
    at = df.columns.get_loc(column)
    assert isinstance(at, int)  # a slice or mask only for a repeated name
    return at


def _population_table(data: Any, where: Path) -> pd.DataFrame:
    """population.json as rows. rf2 writes ``{"tiers": {name: {users, share, ...}},
    "num_users": ..., "jaccard_top50": {"low|mid": ...}, ...}``: one row per tier (column
    ``tier``), scalars repeated on every row, flat mappings as ``key.sub`` columns. A list
    of records, or any other mapping of name -> record, is read the same way."""
    if isinstance(data, list):
        return pd.DataFrame(data)
    if not isinstance(data, dict):
        raise ResultsError(f"{where}: expected a JSON list or object")
    tables = [k for k, v in data.items() if isinstance(v, (dict, list)) and v
              and all(isinstance(r, dict) for r in (v.values() if isinstance(v, dict) else v))]
    key = "tiers" if "tiers" in tables else (tables[0] if tables else None)
    rest = {k: v for k, v in data.items() if k != key}
    extra = pd.json_normalize(rest).iloc[0].to_dict() if rest else {}
    if key is None:
        return pd.DataFrame([extra])
    rows = data[key]
    if isinstance(rows, dict):
        name = key[:-1] if key.endswith("s") else key
        rows = [{name: n, **r} for n, r in rows.items()]
    table = pd.json_normalize(rows)
    # str(): pandas types the keys as Hashable; from a JSON object they are strings already.
    return table.assign(**{str(k): v for k, v in extra.items() if k not in table})


def load_population(path: PathLike, config_columns: ConfigColumns = None) -> pd.DataFrame:
    """population.json of every run (one row per tier) with ``run`` and config columns."""
    frames = []
    for run_id, run, values in _runs(path, _columns(config_columns)):
        file = run / "population.json"
        if file.is_file():
            table = _population_table(json.loads(file.read_text(encoding="utf-8")), file)
            table.insert(0, "run", run_id)
            frames.append(table.assign(**{k: v for k, v in values.items() if k not in table}))
    if not frames:
        raise ResultsError(f"{path}: no run folder holds a population.json")
    return pd.concat(frames, ignore_index=True)


def to_parquet(df: pd.DataFrame, path: PathLike) -> Path:
    """Write ``df`` as Parquet (no index), creating parent folders; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False)
    return out


def order_tiers(names: Sequence[str]) -> list[str]:
    """Tiers in a reading order: low, mid, high first, then the rest naturally sorted."""
    known = ["low", "mid", "high"]
    rest = sorted((n for n in set(names) if n not in known), key=_natural)
    return [n for n in known if n in set(names)] + rest


def tier_metric(df: pd.DataFrame, metric: str = "recall@20") -> pd.DataFrame:
    """Rows of ``tier/<tier>/<metric>`` from a :func:`load` frame, with a ``tier`` column."""
    if "metric" not in df:
        raise ResultsError("expected the long frame of rf2.analysis.results.load() (no 'metric' column)")
    parts = df["metric"].str.extract(_TIER_KEY)
    mask = (parts[1] == metric).to_numpy()
    rows = df[mask].drop(columns="metric")
    rows.insert(_position(rows, "round") + 1, "tier", parts[0].to_numpy()[mask])
    return rows.reset_index(drop=True)


@dataclass(frozen=True)
class FairnessTables:
    """RF²'s fairness gap of every optimization against the reference (see fairness_gap_table).

    - ``per_tier``: one row per (run, tier): context columns, ``optimization``,
      ``population``, ``seed``, ``tier``, ``run``, ``round``, ``value``, ``reference_run``,
      ``reference_round``, ``reference_value``, ``d`` (= D_t).
    - ``mdac``: one row per run: context, ``optimization``, ``population``, ``seed``,
      ``run``, ``mdac``, ``n_tiers``.
    - ``per_tier_summary``: per (context, optimization, population, tier): ``d_mean``,
      ``d_std``, ``n_seeds``.
    - ``mdac_summary``: per (context, optimization, population): ``mdac_mean``, ``mdac_std``,
      ``n_seeds``.
    - ``ratio``: per (context, optimization): ``mdac_independent``, ``mdac_realistic``
      (means over seeds), ``ratio`` (= their quotient, RF²'s headline),
      ``ratio_seed_mean``, ``ratio_seed_std``, ``n_seeds`` (per-seed quotients).

    Context = the ``match_on`` columns present (strategy, server_optimizer, devices, dataset,
    model). Stds are sample stds (ddof=1): NaN with one seed.
    """

    per_tier: pd.DataFrame
    mdac: pd.DataFrame
    per_tier_summary: pd.DataFrame
    mdac_summary: pd.DataFrame
    ratio: pd.DataFrame


def _mdac(d: pd.Series) -> float:
    return mdac_of({str(i): float(v) for i, v in enumerate(d)}) if len(d) else math.nan


def _at_pass(frame: pd.DataFrame, t: pd.DataFrame, k: int) -> pd.DataFrame:
    """Rows of ``t`` at pass ``k``: per run, the first round with the metric logged whose
    ``pass`` (passes completed by the end of that round) is >= k. Runs that never got
    there are dropped with a warning."""
    passes = frame[frame["metric"] == "pass"][["run", "round", "value"]].rename(
        columns={"value": "pass"})
    if passes.empty:
        raise ResultsError("at='pass:k' needs the 'pass' key in metrics.jsonl rows "
                           "(runs made before pass logging have none)")
    t = t.merge(passes, on=["run", "round"], how="left")
    reached = t[t["pass"] >= k]
    first = reached.groupby("run")["round"].transform("min")
    out = reached[reached["round"] == first].drop(columns="pass")
    short = sorted(set(t["run"]) - set(out["run"]))
    if short:
        _warn(f"{len(short)} run(s) never logged the metric at or after pass {k} "
              f"(e.g. {short[0]}); left out")
    return out


def _select_rows(frame: pd.DataFrame, t: pd.DataFrame, round: int | None,
                 at: str | None) -> pd.DataFrame:
    """The rows to compare: ``at`` = "last", "round:N" or "pass:K"; else ``round``."""
    if at is not None:
        kind, _, num = at.partition(":")
        if at == "last":
            round = None
        elif kind in ("round", "pass") and num.isdigit():
            if kind == "pass":
                return _at_pass(frame, t, int(num))
            round = int(num)
        else:
            raise ResultsError(f"at={at!r}: expected 'last', 'round:N' or 'pass:K'")
    return t[t["round"] == (t.groupby("run")["round"].transform("max") if round is None
                            else round)]


def fairness_gap_table(df: pd.DataFrame | PathLike, metric: str = "recall@20",
                       round: int | None = None, reference_optimization: str = "none",
                       realistic: str = "popularity-dirichlet", independent: str = "independent",
                       match_on: Sequence[str] = MATCH_COLUMNS, at: str | None = None,
                       population_column: str = "population") -> FairnessTables:
    """D_t = (beta_t(opt) - beta_t(ref)) / beta_t(ref) per tier, MDAC = max_t D_t - min_t D_t.

    ``df`` is a :func:`load` frame (or a path to load). Which row of each run: ``at`` =
    ``"pass:K"`` compares runs after the same number of passes over their clients (RF²'s
    "global epochs"; with exclude-low a pass has fewer rounds): per run the first
    evaluated round whose ``pass`` key is >= K (``eval.at_pass_end=true`` evaluates
    exactly there); ``"round:N"`` or ``round=N`` the same round; ``"last"``/None each
    run's last logged round. The reference of a run is the run with ``optimization ==
    reference_optimization`` and the same seed, population and ``match_on`` columns (several
    such runs are averaged, with a warning). ``population_column`` names the column that
    tells populations apart (``"tiering"`` keeps leaky and leak-free rf2-dirichlet maps
    apart; the output column is still called ``population``). D_t and MDAC come from
    :mod:`rf2.eval.fairness`, the one implementation evaluation uses too. Relative
    changes, not raw gaps, because RF²'s claim is about how unevenly an optimization
    *moves* each tier.
    """
    frame = load(df) if not isinstance(df, pd.DataFrame) else df
    if population_column != "population":
        if population_column not in frame:
            raise ResultsError(f"no column {population_column!r} in the frame")
        frame = frame.assign(population=frame[population_column])
    t = tier_metric(frame, metric)
    if t.empty:
        raise ResultsError(f"no tier/<tier>/{metric} values in these runs")
    t = _select_rows(frame, t, round, at)
    context = [c for c in match_on if c in t.columns and c not in ("population", "seed")]
    keys = [*context, "population", "seed"]
    is_ref = t["optimization"] == reference_optimization
    if not is_ref.any():
        found = ", ".join(sorted(map(str, t["optimization"].unique())))
        raise ResultsError(f"no reference run with optimization={reference_optimization!r} "
                           f"(found: {found}); D_t and MDAC compare every run against one")
    ref = t[is_ref].groupby([*keys, "tier"], dropna=False).agg(
        reference_run=("run", lambda s: ",".join(sorted(s))),
        reference_round=("round", "max"), reference_value=("value", "mean")).reset_index()
    if ref["reference_run"].str.contains(",").any():
        _warn("several reference runs share seed, population and match_on columns; "
              "averaging them (pass match_on to tell them apart)")
    if is_ref.all():
        raise ResultsError(f"only reference runs (optimization={reference_optimization!r}): "
                           "no optimization to compare")
    per_tier = t[~is_ref].merge(ref, on=[*keys, "tier"], how="left")
    missing = sorted(per_tier.loc[per_tier["reference_run"].isna(), "run"].unique())
    if missing:
        _warn(f"no reference run for {', '.join(missing)}: D_t is NaN there")
    by_pass = at is not None and at.startswith("pass:")  # rounds differ there by design
    if not missing and not by_pass and (per_tier["round"] != per_tier["reference_round"]).any():
        _warn("some runs end at another round than their reference")
    per_tier["d"] = [relative_change(float(v), float(r)) for v, r in
                     zip(per_tier["value"], per_tier["reference_value"], strict=True)]
    tiers = order_tiers(list(per_tier["tier"].unique()))
    per_tier["tier"] = pd.Categorical(per_tier["tier"], categories=tiers, ordered=True)
    lead = [*context, "optimization", "population", "seed"]
    per_tier = per_tier.sort_values([*lead, "run", "tier"]).reset_index(drop=True)
    per_tier = per_tier[[*lead, "tier", "run", "round", "value", "reference_run",
                         "reference_round", "reference_value", "d"]]
    per_run = per_tier.groupby([*lead, "run"], dropna=False, observed=True)["d"]
    mdac = per_run.agg(mdac=_mdac, n_tiers="size").reset_index()
    group = [*context, "optimization", "population"]
    tier_summary = per_tier.groupby([*group, "tier"], dropna=False, observed=True)["d"].agg(
        d_mean="mean", d_std="std", n_seeds="count").reset_index()
    mdac_summary = mdac.groupby(group, dropna=False)["mdac"].agg(
        mdac_mean="mean", mdac_std="std", n_seeds="count").reset_index()
    return FairnessTables(per_tier, mdac, tier_summary, mdac_summary,
                          _ratio(mdac, [*context, "optimization"], realistic, independent))


def _ratio(mdac: pd.DataFrame, group: list[str], realistic: str, independent: str) -> pd.DataFrame:
    """MDAC(realistic) / MDAC(independent): of the seed means, and per seed."""
    real = mdac[mdac["population"] == realistic]
    ind = mdac[mdac["population"] == independent]
    means = real.groupby(group, dropna=False)["mdac"].mean().rename("mdac_realistic").to_frame()
    means = means.join(ind.groupby(group, dropna=False)["mdac"].mean().rename(
        "mdac_independent"), how="outer")
    paired = real.merge(ind, on=[*group, "seed"], suffixes=("_r", "_i"))
    with np.errstate(divide="ignore", invalid="ignore"):
        means["ratio"] = means["mdac_realistic"] / means["mdac_independent"]
        paired["ratio"] = paired["mdac_r"] / paired["mdac_i"]
    per_seed = paired.groupby(group, dropna=False)["ratio"].agg(
        ratio_seed_mean="mean", ratio_seed_std="std", n_seeds="count")
    out = means.join(per_seed, how="left").reset_index()
    out["n_seeds"] = out["n_seeds"].fillna(0).astype("int64")
    return out[[*group, "mdac_independent", "mdac_realistic", "ratio", "ratio_seed_mean",
                "ratio_seed_std", "n_seeds"]]


@dataclass(frozen=True)
class PassStudyTables:
    """RF²'s comparison after whole passes, for several realistic tierings at once.

    - ``mdac``: one row per (pass, optimization, tiering, seed, run): ``mdac``.
    - ``mdac_summary``: per (pass, optimization, tiering): ``mdac_mean``, ``mdac_std``,
      ``n_seeds``.
    - ``ratio``: per (pass, optimization, realistic tiering): ``mdac_independent``,
      ``mdac_realistic``, ``ratio`` (of the seed means), ``ratio_seed_mean``,
      ``ratio_seed_std``, ``n_seeds`` (per-seed quotients).
    """

    mdac: pd.DataFrame
    mdac_summary: pd.DataFrame
    ratio: pd.DataFrame


def pass_study_tables(df: pd.DataFrame | PathLike, metric: str = "rated_auc",
                      passes: Sequence[int] = (1, 2, 10), independent: str = "rf2-random",
                      realistic: Sequence[str] | None = None, population_column: str = "tiering",
                      reference_optimization: str = "none") -> PassStudyTables:
    """:func:`fairness_gap_table` at ``pass:K`` for every K and every realistic tiering.

    ``realistic`` None = every tiering except ``independent`` (e.g. the leaky and the
    leak-free rf2-dirichlet map side by side). Tierings come from ``population_column``.
    """
    frame = load(df) if not isinstance(df, pd.DataFrame) else df
    if population_column not in frame:
        raise ResultsError(f"no column {population_column!r} in the frame")
    found = sorted(str(v) for v in frame[population_column].dropna().unique())
    if independent not in found:
        raise ResultsError(f"no {independent!r} runs (tierings found: {', '.join(found)})")
    others = list(realistic) if realistic is not None else [t for t in found if t != independent]
    mdacs, summaries, ratios = [], [], []
    for k in passes:
        for real in others:
            tables = fairness_gap_table(frame, metric, at=f"pass:{k}", realistic=real,
                                        independent=independent,
                                        reference_optimization=reference_optimization,
                                        population_column=population_column)
            keep = tables.mdac["population"].isin([real] + ([independent] if real == others[0]
                                                           else []))
            mdacs.append(tables.mdac[keep].assign(**{"pass": k}))
            sk = tables.mdac_summary["population"].isin(
                [real] + ([independent] if real == others[0] else []))
            summaries.append(tables.mdac_summary[sk].assign(**{"pass": k}))
            ratios.append(tables.ratio.assign(**{"pass": k}).assign(realistic=real))

    def tidy(parts: list[pd.DataFrame]) -> pd.DataFrame:
        out = pd.concat(parts, ignore_index=True).rename(columns={"population": "tiering"})
        lead = [c for c in ("pass", "optimization", "tiering", "realistic") if c in out]
        return out[lead + [c for c in out if c not in lead]].sort_values(lead).reset_index(
            drop=True)

    return PassStudyTables(tidy(mdacs), tidy(summaries), tidy(ratios))


# Per-user distribution keys (rf2.eval.distribution): dist/tier/<t>/<metric>/<stat> and
# dist/<metric>/<stat>; a metric may itself hold a slash (index/recall@20).
_DIST_TIER_KEY = re.compile(r"^dist/tier/([^/]+)/(.+)/([^/]+)$")
_DIST_KEY = re.compile(r"^dist/(.+)/([^/]+)$")
ALL_USERS = "all users"  # the ``tier`` of statistics over all users (no tier's name)


def distributions(df: pd.DataFrame | PathLike, metric: str | None = None,
                  stat: str | None = None) -> pd.DataFrame:
    """The per-user distribution statistics of a :func:`load` frame (or a path), tidy.

    One row per (run, round, tier, metric, stat): ``tier`` is a tier name or ``"all"``
    (every evaluated user; :data:`ALL_USERS`); ``stat`` is ``std``, ``bottom10``, ``top10``, ``gini``,
    ``no_hit``, ``cdf_<x>`` (see :mod:`rf2.eval.distribution`); participation appears as
    metrics ``selections`` and ``trainings`` with stat ``gini``. ``metric``/``stat``
    filter. Config columns are kept. Empty when the runs logged none (``eval.distributions``
    false, or runs from before it).
    """
    frame = load(df) if not isinstance(df, pd.DataFrame) else df
    if "metric" not in frame:
        raise ResultsError("expected the long frame of rf2.analysis.results.load() (no 'metric' column)")
    rows = frame[frame["metric"].str.startswith("dist/")]
    keys = rows["metric"]
    tiered = keys.str.extract(_DIST_TIER_KEY)
    flat = keys.str.extract(_DIST_KEY)
    is_tier = tiered[0].notna().to_numpy()
    tier = np.where(is_tier, tiered[0], ALL_USERS)
    name = np.where(is_tier, tiered[1], flat[0])
    which = np.where(is_tier, tiered[2], flat[1])
    out = rows.drop(columns="metric").copy()
    at = _position(out, "round") + 1
    for i, (col, values) in enumerate((("tier", tier), ("metric", name), ("stat", which))):
        out.insert(at + i, col, values)
    if metric is not None:
        out = out[out["metric"] == metric]
    if stat is not None:
        out = out[out["stat"] == stat]
    return out.reset_index(drop=True)


def user_cdf(df: pd.DataFrame | PathLike, metric: str = "recall@20",
             round: int | None = None) -> pd.DataFrame:
    """The logged CDF of a per-user metric (``cdf_<x>`` stats; recall@20 by default): one
    row per (run, tier, x) with ``share`` = share of the tier's evaluated users whose
    value is <= x, at ``round`` (default: each run's last round that logged it)."""
    d = distributions(df, metric)
    d = d[d["stat"].str.startswith("cdf_")]
    if d.empty:
        raise ResultsError(f"no dist/.../{metric}/cdf_<x> values (logged for "
                           "rf2.eval.distribution.CDF_METRICS with eval.distributions=true)")
    last = d.groupby("run")["round"].transform("max")
    d = d[d["round"] == (last if round is None else round)]
    if d.empty:
        raise ResultsError(f"no run logged the CDF of {metric} at round {round}")
    d = d.assign(x=d["stat"].str.slice(4).astype("float64")).rename(columns={"value": "share"})
    return d.drop(columns=["stat"]).sort_values(["run", "tier", "x"]).reset_index(drop=True)
