"""The beyond-RF² study's tables (issue 20, ``+experiment=beyond_rf2``): per arm x population.

An *arm* is one way of training (``conf/arm/``): synchronous FedAvg (``sync``, the
reference), asynchronous FedBuff (``fedbuff``) and synchronous FedAvg with client-level DP
at a target ε (``dp ε=8``, ``dp ε=1``). Its label is derived from each run's config
(``strategy.name``, ``privacy.name``, ``privacy.target_epsilon``), so runs made without the
``arm`` group are labelled the same way.

Per run, at its last row (the study evaluates it on all test users):

- the overall metric (Recall@20) and NDCG@20;
- RF²'s D_t per tier against ``sync`` of the same population and seed, and MDAC
  (:func:`rf2.analysis.results.fairness_gap_table`, the one implementation);
- the per-user distribution over all evaluated users (``dist/<metric>/...``: std,
  bottom-10% and top-10% means, Gini, share of users with no hit) and participation
  fairness (Gini of per-user completed trainings and selections);
- who the model learned from: each tier's share of the completed trainings over the run
  and, for FedBuff, the arrival-weighted mean staleness of the tier's updates;
- the simulated time to a target: the ``sim_time_s`` of the first evaluated row whose
  metric reaches ``target`` (default ``target_fraction`` x the ``sync`` run's last value,
  same population and seed). Synchronous rounds and FedBuff steps advance the same
  simulated clock (``rf2.hetero.clock``), so the times compare like with like; a run that
  never reaches the target has NaN.

The summary averages each (arm, population) over its seeds and says how many there were
(``n_seeds``; for the time to target, ``n_reached`` of them reached it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rf2.analysis.results import (
    MATCH_COLUMNS,
    ResultsError,
    fairness_gap_table,
    load,
    order_tiers,
)

__all__ = ["ARM_COLUMNS", "REFERENCE_ARM", "BeyondTables", "arm_label", "beyond_tables",
           "beyond_markdown", "load_arms", "time_to_target", "with_arm"]

REFERENCE_ARM = "sync"
ARM_ORDER = ("sync", "fedbuff")
# The config paths an arm's label is made of (extra columns of results.load).
ARM_COLUMNS = {"privacy": "privacy.name", "target_epsilon": "privacy.target_epsilon",
               "noise_multiplier": "privacy.noise_multiplier"}
# Distribution statistics of the metric over all evaluated users, and participation.
DIST_STATS = ("std", "bottom10", "top10", "gini", "no_hit")
PARTICIPATION = ("trainings", "selections")


def arm_label(strategy: str | None, privacy: str | None = None,
              target_epsilon: float | None = None, noise_multiplier: float | None = None) -> str:
    """``sync`` (FedAvg without DP), ``fedbuff``, ``dp ε=8`` (FedAvg + DP at target ε 8),
    ``dp z=1`` (DP with a fixed noise multiplier); another strategy keeps its name."""
    base = REFERENCE_ARM if strategy in (None, "fedavg") else str(strategy)
    if privacy != "dp":
        return base
    if target_epsilon is not None and not _isnan(target_epsilon):
        dp = f"dp ε={float(target_epsilon):g}"
    else:
        dp = f"dp z={float(noise_multiplier if noise_multiplier is not None else math.nan):g}"
    return dp if base == REFERENCE_ARM else f"{base} + {dp}"


def _isnan(x: object) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _arm_order(arms: Sequence[str]) -> list[str]:
    """sync, fedbuff, then DP arms by decreasing ε (weaker privacy first), then the rest."""
    def key(a: str) -> tuple[int, float, str]:
        if a in ARM_ORDER:
            return (ARM_ORDER.index(a), 0.0, a)
        if a.startswith("dp ε="):
            return (len(ARM_ORDER), -float(a[5:]), a)
        return (len(ARM_ORDER) + 1, 0.0, a)
    return sorted(set(arms), key=key)


def load_arms(path: str | object) -> pd.DataFrame:
    """:func:`rf2.analysis.results.load` of a folder, with the ``arm`` column added."""
    return with_arm(load(path, ARM_COLUMNS))  # type: ignore[arg-type]


def with_arm(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with an ``arm`` column (needs ``strategy``; ``privacy``,
    ``target_epsilon``, ``noise_multiplier`` where present: see :func:`load_arms`)."""
    if "arm" in frame:
        return frame
    if "strategy" not in frame:
        raise ResultsError("expected a frame of rf2.analysis.results.load() (no 'strategy' column)")
    cols = ["strategy", *ARM_COLUMNS]
    keys = pd.DataFrame({c: frame[c] if c in frame else None for c in cols},
                        index=frame.index).astype(object)
    # One label per distinct config (a long frame repeats it on every metric row).
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(keys.where(keys.notna(), "∅")))
    labels = [arm_label(*[None if v == "∅" else v for v in u]) for u in uniques]
    return frame.assign(arm=np.asarray(labels, dtype=object)[codes])


def time_to_target(sim_time_s: Sequence[float], values: Sequence[float], target: float
                   ) -> tuple[float, int]:
    """(simulated time, index) of the first point whose value is >= ``target``, in the
    order given (rounds ascending); (NaN, -1) if none does or the target is NaN. NaN
    values (rows that did not evaluate) never count."""
    t = np.asarray(sim_time_s, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if math.isnan(target):
        return math.nan, -1
    hit = np.flatnonzero(np.nan_to_num(v, nan=-np.inf) >= target)
    if hit.size == 0:
        return math.nan, -1
    return float(t[hit[0]]), int(hit[0])


@dataclass(frozen=True)
class BeyondTables:
    """The study's tables (see the module docstring).

    - ``per_run``: one row per run: ``arm``, ``population``, ``seed``, ``run``, ``round``
      (its last), the metric, ``ndcg@20``, ``mdac``, ``d/<tier>`` (D_t),
      ``dist/<stat>`` (DIST_STATS of the metric over all evaluated users),
      ``participation/<what>`` (Gini), ``share/<tier>`` and ``staleness/<tier>``
      (:func:`_tier_participation`), ``sim_time_s`` (at the end), ``target``,
      ``time_to_target_s``, ``round_to_target``, ``dp/epsilon`` (NaN without DP).
    - ``per_tier``: D_t per (run, tier), with the reference's values (fairness_gap_table).
    - ``summary``: per (arm, population): the mean over seeds of every numeric column of
      ``per_run``, ``<metric>_std`` and ``mdac_std`` (ddof 1; NaN with one seed),
      ``n_seeds``, and ``n_reached`` (seeds that reached the target; the mean time is
      over those).
    - ``curves``: per (run, evaluated round): ``arm``, ``population``, ``seed``, ``round``,
      ``sim_time_s``, ``value`` (for the figure).
    """

    metric: str
    target_fraction: float | None
    target: float | None
    tiers: list[str]
    per_run: pd.DataFrame
    per_tier: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame


def _wide(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """(run, round) x metric values for the given metric keys."""
    rows = frame[frame["metric"].isin(list(keys))]
    return rows.pivot_table(index=["run", "round"], columns="metric", values="value",
                            aggfunc="first").reset_index()


def beyond_tables(df: pd.DataFrame | str | object, metric: str = "recall@20",
                  target_fraction: float | None = 0.8, target: float | None = None,
                  reference: str = REFERENCE_ARM) -> BeyondTables:
    """The study's tables from a :func:`load_arms` frame (or a path to load).

    ``target``: an absolute value of ``metric`` for the time to target; otherwise
    ``target_fraction`` x the reference arm's last value of the same population and seed
    (and model, dataset, devices). Both None: no time to target (NaN).
    """
    frame = with_arm(df if isinstance(df, pd.DataFrame) else load_arms(df))
    if target is None and target_fraction is not None and not target_fraction > 0:
        raise ResultsError(f"target_fraction={target_fraction!r}: expected a number > 0")
    arms = frame["arm"].unique()
    if reference not in set(arms):
        raise ResultsError(f"no run of the reference arm {reference!r} (found: "
                           f"{', '.join(_arm_order(list(arms)))}); D_t compares every arm with it")
    match_on = [c for c in MATCH_COLUMNS if c != "strategy"]
    # D_t and MDAC: RF²'s definition, the one implementation, with the arm as the
    # "optimization" compared against the reference arm.
    as_opt = frame.assign(optimization=frame["arm"])
    gap = fairness_gap_table(as_opt, metric, reference_optimization=reference,
                             match_on=match_on) if len(set(arms)) > 1 else None
    context = [c for c in match_on if c in frame.columns and c not in ("population", "seed")]
    run_cols = ["run", "arm", "population", "seed", *context]
    runs = frame[run_cols].drop_duplicates("run")
    last = frame.groupby("run")["round"].transform("max")
    end = _wide(frame[frame["round"] == last], [
        metric, "ndcg@20", "sim_time_s", "dp/epsilon",
        *(f"dist/{metric}/{s}" for s in DIST_STATS),
        *(f"dist/{p}/gini" for p in PARTICIPATION)])
    per_run = runs.merge(end, on="run", how="left")
    rename = {f"dist/{metric}/{s}": f"dist/{s}" for s in DIST_STATS}
    rename.update({f"dist/{p}/gini": f"participation/{p}" for p in PARTICIPATION})
    per_run = per_run.rename(columns=rename)
    for col in [metric, "ndcg@20", "sim_time_s", "dp/epsilon", *rename.values()]:
        if col not in per_run:
            per_run[col] = math.nan
    tiers: list[str] = []
    if gap is not None:
        tiers = order_tiers([str(t) for t in gap.per_tier["tier"].unique()])
        d = gap.per_tier.pivot_table(index="run", columns="tier", values="d",
                                     observed=True).reset_index()
        d.columns = ["run", *(f"d/{t}" for t in d.columns[1:])]
        per_run = per_run.merge(d, on="run", how="left").merge(
            gap.mdac[["run", "mdac"]], on="run", how="left")
        per_tier = gap.per_tier.rename(columns={"optimization": "arm"})
    else:
        per_tier = pd.DataFrame(columns=["arm", "population", "seed", "tier", "run", "d"])
    per_run = per_run.merge(_tier_participation(frame, tiers), on="run", how="left")
    is_ref = per_run["arm"] == reference
    # The reference against itself: D_t = 0 and MDAC = 0 by definition.
    for col in [*(f"d/{t}" for t in tiers), "mdac"]:
        if col not in per_run:
            per_run[col] = math.nan
        per_run.loc[is_ref, col] = 0.0
    # Curves and the time to target.
    curve_rows = _wide(frame, [metric, "sim_time_s"])
    curve_rows = curve_rows.dropna(subset=[metric]).sort_values(["run", "round"])
    curves = curve_rows.merge(runs, on="run").rename(columns={metric: "value"})
    keys = [*context, "population", "seed"]
    if target is not None:
        per_run["target"] = float(target)
    elif target_fraction is not None:
        ref_end = per_run.loc[is_ref, [*keys, metric]].groupby(keys, dropna=False)[metric].mean()
        per_run = per_run.merge((target_fraction * ref_end).rename("target").reset_index(),
                                on=keys, how="left")
    else:
        per_run["target"] = math.nan
    reach = []
    for run, goal in zip(per_run["run"], per_run["target"], strict=True):
        c = curves[curves["run"] == run]
        t, i = time_to_target(c.get("sim_time_s", pd.Series(math.nan, index=c.index)),
                              c["value"], float(goal))
        reach.append((t, int(c["round"].iloc[i]) if i >= 0 else -1))
    per_run["time_to_target_s"] = [t for t, _ in reach]
    per_run["round_to_target"] = [r if r >= 0 else math.nan for _, r in reach]
    order = {a: i for i, a in enumerate(_arm_order(list(per_run["arm"])))}
    per_run = per_run.sort_values(["population", "arm", "seed"], key=lambda s: s.map(order)
                                  if s.name == "arm" else s).reset_index(drop=True)
    summary = _summary(per_run, [*context, "arm", "population"], metric)
    summary = summary.sort_values(["population", "arm"], key=lambda s: s.map(order)
                                  if s.name == "arm" else s).reset_index(drop=True)
    return BeyondTables(metric, None if target is not None else target_fraction, target, tiers,
                        per_run, per_tier.reset_index(drop=True), summary,
                        curves[["run", "arm", "population", "seed", "round", "sim_time_s",
                                "value"]].reset_index(drop=True))


def _tier_participation(frame: pd.DataFrame, tiers: Sequence[str]) -> pd.DataFrame:
    """Per run and tier, over all rounds: ``share/<tier>``, the tier's share of the completed
    trainings (``tier/<t>/completed``), and ``staleness/<tier>``, the arrival-weighted mean
    staleness of its updates (FedBuff's ``tier/<t>/staleness_mean``; NaN for a synchronous
    run, whose updates are never stale)."""
    out = pd.DataFrame({"run": frame["run"].unique()})
    if not tiers:
        return out
    keys = [f"tier/{t}/{k}" for t in tiers for k in ("completed", "arrivals", "staleness_mean")]
    w = _wide(frame, keys).set_index(["run", "round"])
    for k in keys:
        if k not in w:
            w[k] = math.nan
    done = w[[f"tier/{t}/completed" for t in tiers]].groupby("run").sum()
    total = done.sum(axis=1).replace(0, math.nan)
    cols: dict[str, pd.Series] = {}
    for t in tiers:
        cols[f"share/{t}"] = done[f"tier/{t}/completed"] / total
        arrivals = w[f"tier/{t}/arrivals"]
        weighted = (w[f"tier/{t}/staleness_mean"] * arrivals).groupby("run").sum(min_count=1)
        cols[f"staleness/{t}"] = weighted / arrivals.groupby("run").sum(min_count=1).replace(
            0, math.nan)
    return out.merge(pd.DataFrame(cols).reset_index(), on="run", how="left")


def _summary(per_run: pd.DataFrame, group: list[str], metric: str) -> pd.DataFrame:
    numeric = [c for c in per_run.columns if c not in (*group, "run", "seed")
               and pd.api.types.is_numeric_dtype(per_run[c])]
    g = per_run.groupby(group, dropna=False, sort=False)
    out = g[numeric].mean()
    out[f"{metric}_std"] = g[metric].std()
    out["mdac_std"] = g["mdac"].std()
    out["n_seeds"] = g["run"].count()
    out["n_reached"] = g["time_to_target_s"].count()
    return out.reset_index()


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}%"


def _time(x: float, reached: int, seeds: int) -> str:
    if reached == 0:
        return f"not reached (0/{seeds})"
    return f"{x:,.0f} s" + ("" if reached == seeds else f" ({reached}/{seeds} seeds)")


def beyond_markdown(tables: BeyondTables) -> str:
    """Two markdown tables (utility, fairness and time; the per-user distribution) with a
    header saying what was compared, written by ``rf2-figures`` as ``beyond_rf2.md``."""
    s, m, tiers = tables.summary, tables.metric, tables.tiers
    rounds = sorted({int(r) for r in tables.per_run["round"]})
    seeds = sorted({int(x) for x in s["n_seeds"]})
    target = (f"{tables.target:g}" if tables.target is not None else
              f"{tables.target_fraction:g} x the sync arm's final {m} (same population and seed)"
              if tables.target_fraction is not None else "none")
    lines = [
        f"Compared at each run's last row (round {', '.join(map(str, rounds))}); mean over "
        f"seeds ({' or '.join(map(str, seeds))} per cell, column 'seeds'). D_t = relative "
        f"change of a tier's {m} against the sync run of the same population and seed; "
        f"MDAC = max - min over tiers. Target for the simulated time: {target}.",
        "",
        "| arm | population | seeds | " + m + " | ndcg@20 | "
        + " | ".join(f"D_{t}" for t in tiers) + " | MDAC | sim. time to target | sim. time at end | ε |",
        "|---|---|---|---|---|" + "---|" * len(tiers) + "---|---|---|---|",
    ]
    for _, r in s.iterrows():
        n = int(r["n_seeds"])
        spread = "" if n < 2 or math.isnan(r[f"{m}_std"]) else f" ± {r[f'{m}_std']:.4f}"
        mdac_spread = "" if n < 2 or math.isnan(r["mdac_std"]) else f" ± {r['mdac_std']:.3f}"
        lines.append(
            f"| {r['arm']} | {r['population']} | {n} | {_fmt(r[m])}{spread} | "
            f"{_fmt(r['ndcg@20'])} | " + " | ".join(_pct(r.get(f'd/{t}', math.nan)) for t in tiers)
            + f" | {_fmt(r['mdac'], 3)}{mdac_spread} | "
            f"{_time(r['time_to_target_s'], int(r['n_reached']), n)} | "
            f"{r['sim_time_s']:,.0f} s | {_fmt(r['dp/epsilon'], 2)} |")
    lines += [
        "",
        f"Per-user {m} over all evaluated users (mean over seeds): std, mean of the bottom "
        "and top 10% of users, Gini, share of users with no hit; participation Gini of "
        "per-user completed trainings (selections in brackets).",
        "",
        "| arm | population | std | bottom 10% | top 10% | Gini | no hit | participation Gini |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in s.iterrows():
        lines.append(
            f"| {r['arm']} | {r['population']} | {_fmt(r['dist/std'])} | "
            f"{_fmt(r['dist/bottom10'])} | {_fmt(r['dist/top10'])} | {_fmt(r['dist/gini'], 3)} | "
            f"{_fmt(r['dist/no_hit'], 3)} | {_fmt(r['participation/trainings'], 3)} "
            f"({_fmt(r['participation/selections'], 3)}) |")
    if tiers:
        lines += [
            "",
            "Who the model learned from: each tier's share of the completed trainings over "
            "the run, and (FedBuff) the mean staleness of its updates in server steps.",
            "",
            "| arm | population | " + " | ".join(f"share {t}" for t in tiers) + " | "
            + " | ".join(f"staleness {t}" for t in tiers) + " |",
            "|---|---|" + "---|" * (2 * len(tiers)),
        ]
        for _, r in s.iterrows():
            lines.append(
                f"| {r['arm']} | {r['population']} | "
                + " | ".join(_fmt(r.get(f"share/{t}", math.nan), 3) for t in tiers) + " | "
                + " | ".join(_fmt(r.get(f"staleness/{t}", math.nan), 2) for t in tiers) + " |")
    return "\n".join(lines) + "\n"
