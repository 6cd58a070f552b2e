"""Figures from run folders: per-tier curves, RF²'s fairness-gap bars, participation,
per-user CDFs and the pass study.

Console script ``rf2-figures MULTIRUN_DIR [--out DIR] [--metric recall@20]`` (also
``python -m rf2.analysis.figures``). The plot functions take a :func:`rf2.analysis.results.load` frame and
return a matplotlib ``Figure`` built with the object API (no pyplot), so a notebook can
call them under any backend without global figure state; ``main`` renders with Agg.
No torch, no Flower: this runs on a laptop with pandas and matplotlib.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rf2.analysis.beyond import ARM_COLUMNS, beyond_markdown, beyond_tables, with_arm
from rf2.analysis.results import (
    ALL_USERS,
    MATCH_COLUMNS,
    FairnessTables,
    PassStudyTables,
    ResultsError,
    fairness_gap_table,
    load,
    order_tiers,
    pass_study_tables,
    tier_metric,
    user_cdf,
)
from rf2.core.errors import UserInputError

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

__all__ = ["main", "plot_fairness_gap", "plot_participation", "plot_pass_study",
           "plot_tier_curves", "plot_user_cdf"]

STYLE: dict[RcKeyType, Any] = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 13, "axes.grid": True,
    "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
}
POPULATION_ORDER = ("independent", "rf2-sorted", "activity", "popularity-dirichlet")
_TIER_COLORS = {"low": "#d62728", "mid": "#ff7f0e", "high": "#2ca02c"}


def _colors(tiers: Sequence[str]) -> dict[str, str]:
    """Stable colours: low/mid/high always red/orange/green, others from tab10."""
    # Spare colours skip the three reserved ones (compared as hex: tab10 holds RGB tuples),
    # so a tier named e.g. "b" never looks like mid; cycle past ten tiers rather than fail.
    reserved = set(_TIER_COLORS.values())
    spare = itertools.cycle([h for h in map(matplotlib.colors.to_hex,
                                            matplotlib.color_sequences["tab10"])
                             if h not in reserved])
    return {t: _TIER_COLORS.get(t) or next(spare) for t in tiers}


def _ordered(values: Iterable[object], first: Sequence[str]) -> list[str]:
    present = {str(v) for v in values}
    return [v for v in first if v in present] + sorted(present - set(first))


def _with_variant(df: pd.DataFrame, reference: str = "none") -> tuple[pd.DataFrame, list[str]]:
    """Add ``variant``: the optimization, plus any context column the sweep varies
    (e.g. "exclude_low [strategy=fedprox]"), so different strategies never share a bar.
    A run without a value there (a custom strategy has no server_optimizer) shows none."""
    varying = [c for c in MATCH_COLUMNS if c in df and df[c].nunique(dropna=False) > 1]
    label = df["optimization"].map(str)
    if "arm" in df and df["arm"].nunique() > 1:  # beyond_rf2: the arm says strategy + privacy
        varying = [c for c in varying if c != "strategy"]
        label = (df["arm"].map(str) if df["optimization"].nunique() == 1
                 else df["arm"].map(str) + " · " + label)
    for c in varying:
        label = label + df[c].map(lambda v, c=c: "" if pd.isna(v) else f" [{c}={v}]")
    df = df.assign(variant=label.to_numpy())
    order = _ordered(df["variant"].unique(), [])
    return df, sorted(order, key=lambda v: (not v.startswith(reference + " ") and v != reference))


def _grid(rows: int, cols: int, width: float = 4.4, height: float = 3.2) -> Figure:
    # Constrained layout keeps titles, tick labels and the (outside) legend clear of
    # each other; the legend goes below the panels, never over data or the title.
    return Figure(figsize=(max(width * cols + 0.6, 5.0), height * rows + 1.2),
                  layout="constrained")


def _seeds(df: pd.DataFrame) -> int:
    """How many seeds the figure averages over (1 for a single run)."""
    return int(df["seed"].nunique()) if "seed" in df and df["seed"].notna().any() else 1


def _over_seeds(n: int) -> str:
    """What a figure's lines or bars are, said honestly: one seed has no spread."""
    return "one seed" if n == 1 else f"mean ± std over {n} seeds"


def _finish(fig: Figure, title: str, handles: Sequence[Artist], labels: Sequence[str],
            legend_title: str) -> None:
    """The legend below the panels (outside the data) and a title wrapped to the width."""
    if handles:
        # As many entries per row as fit the width (~0.6 em per character + the swatch).
        entry_pt = max(len(lab) for lab in labels) * 0.6 * STYLE["legend.fontsize"] + 40
        ncols = max(1, min(len(labels), int(fig.get_figwidth() * 72 * 0.95 // entry_pt)))
        fig.legend(handles, labels, loc="outside lower center", title=legend_title or None,
                   ncols=ncols)
    # ~0.6 em per character at the title's size: wrap rather than run off the canvas.
    width_pt = fig.get_figwidth() * 72
    chars = max(20, int(width_pt / (0.62 * STYLE["figure.titlesize"])))
    fig.suptitle(textwrap.fill(title, chars))


def _legend_entries(axes: Iterable[Axes]) -> tuple[list[Artist], list[str]]:
    """Each label once, in first-seen order, across all panels (a panel may lack a tier)."""
    handles: list[Artist] = []
    labels: list[str] = []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


def _balanced_columns(panels: int, most: int = 3) -> int:
    """Columns for ``panels`` panels leaving the fewest empty slots (ties: more columns)."""
    if panels <= most:
        return panels
    return min(range(2, most + 1), key=lambda c: (-(-panels // c) * c - panels, -c))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text.replace("@", "_at_")).strip("_")


def plot_tier_curves(df: pd.DataFrame, metric: str = "recall@20") -> Figure:
    """``tier/<tier>/<metric>`` over rounds: mean over seeds with a ±1 std band (no band
    for a single seed).

    One panel per optimization (rows) x population (columns); the dashed line is the
    all-users metric, so a tier's gap to the average is visible at a glance, and the
    dotted grey line the popularity baseline (round 0's ``popularity/<metric>``). With a
    single tier the tier line is the all-users line, so only the latter is drawn.
    """
    t = tier_metric(df, metric)
    if t.empty:
        raise ResultsError(f"no tier/<tier>/{metric} values to plot")
    t, variants = _with_variant(t)
    overall, _ = _with_variant(df[df["metric"] == metric])
    baseline, _ = _with_variant(df[df["metric"] == f"popularity/{metric}"])
    pops = _ordered(t["population"].unique(), POPULATION_ORDER)
    tiers = order_tiers(list(t["tier"].unique()))
    if len(tiers) == 1 and not overall.empty:
        tiers = []  # one tier = all users: drawing both would be the same line twice
    colors = _colors(tiers)
    seeds = _seeds(t)
    with matplotlib.rc_context(STYLE):
        fig = _grid(len(variants), len(pops))
        axes = np.atleast_2d(fig.subplots(len(variants), len(pops), sharex=True, sharey=True,
                                          squeeze=False))
        for i, variant in enumerate(variants):
            for j, pop in enumerate(pops):
                ax = axes[i, j]
                ax.set_title(f"{variant} · {pop}")
                panel = t[(t["variant"] == variant) & (t["population"] == pop)]
                if panel.empty:
                    ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
                for tier in tiers:
                    s = panel[panel["tier"] == tier].groupby("round")["value"].agg(["mean", "std"])
                    if s.empty:
                        continue
                    ax.plot(s.index, s["mean"], color=colors[tier], lw=2, label=tier)
                    if seeds > 1:
                        ax.fill_between(s.index, s["mean"] - s["std"].fillna(0),
                                        s["mean"] + s["std"].fillna(0), color=colors[tier],
                                        alpha=0.2)
                sel = overall[(overall["variant"] == variant) & (overall["population"] == pop)]
                o = sel.groupby("round")["value"].mean()
                if not o.empty:
                    ax.plot(o.index, o.to_numpy(), "k--" if tiers else "k-", lw=1.2 if tiers else 2,
                            label="all users")
                b = baseline[(baseline["variant"] == variant) & (baseline["population"] == pop)]
                if not b.empty and not o.empty:
                    ax.axhline(float(b["value"].mean()), color="0.45", ls=":", lw=1.5,
                               label="popularity baseline")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if i == len(variants) - 1:
                    ax.set_xlabel("round")
                if j == 0:
                    ax.set_ylabel(metric)
        handles, labels = _legend_entries(axes.flat)
        what = "Per-tier " if tiers else ""
        _finish(fig, f"{what}{metric} by round ({_over_seeds(seeds)})", handles, labels,
                "tier" if tiers else "")
    return fig


MIN_SEEDS_FOR_RATIO = 3  # below this a ratio's seed spread means nothing: not shown
_POPULATION_COLORS = ("#7f7f7f", "#9467bd", "#17becf", "#8c564b")


def _ratio_text(row: pd.DataFrame) -> str:
    """A panel's MDAC(realistic)/MDAC(independent), with its per-seed spread, or why not."""
    if row.empty:
        return "no realistic/independent ratio"
    r = row.iloc[0]
    n = int(r.get("n_seeds", 0))
    if n == 0:  # no seed has both populations
        return "no realistic/independent ratio"
    if n < MIN_SEEDS_FOR_RATIO or not np.isfinite(r["ratio"]):
        return f"MDAC ratio not shown: {n} seed(s), needs {MIN_SEEDS_FOR_RATIO}"
    return (f"MDAC realistic/independent {r['ratio']:.3g}x\n"
            f"(per seed {r['ratio_seed_mean']:.3g} ± {r['ratio_seed_std']:.3g}, n = {n})")


def plot_fairness_gap(df: pd.DataFrame, metric: str = "recall@20", round: int | None = None,
                      reference_optimization: str = "none",
                      realistic: str = "popularity-dirichlet", independent: str = "independent",
                      tables: FairnessTables | None = None) -> Figure:
    """RF²'s figure: per-tier D_t of each optimization under each population.

    One panel per optimization: bars are seed means of each tier's D_t with seed-std
    error bars, grouped by population; the panel title gives MDAC(realistic) /
    MDAC(independent) with its per-seed spread, or says why it is not shown (fewer than
    ``MIN_SEEDS_FOR_RATIO`` seeds). A last panel draws MDAC itself (the spread of each
    group's bars) per optimization and population. Raises :class:`ResultsError` when
    there is no reference run.
    """
    if tables is None:
        tables = fairness_gap_table(df, metric, round, reference_optimization, realistic,
                                    independent)
    summary, variants = _with_variant(tables.per_tier_summary, reference_optimization)
    mdac, _ = _with_variant(tables.mdac_summary, reference_optimization)
    ratio, _ = _with_variant(tables.ratio, reference_optimization)
    pops = _ordered(summary["population"].unique(), (independent, realistic))
    tiers = order_tiers([str(x) for x in summary["tier"].unique()])
    colors = _colors(tiers)
    seeds = int(summary["n_seeds"].max()) if "n_seeds" in summary and len(summary) else 1
    panels = len(variants) + 1  # + the MDAC panel: no grid slot stays empty
    ncols = _balanced_columns(panels)
    nrows = -(-panels // ncols)
    width = 0.8 / max(len(tiers), 1)
    with matplotlib.rc_context(STYLE):
        fig = _grid(nrows, ncols, width=max(2.6 + 1.5 * len(pops), 4.4), height=3.6)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[panels:]:
            fig.delaxes(ax)
        for ax, variant in zip(axes.flat, variants, strict=False):
            if ax is not axes.flat[0]:
                ax.sharey(axes.flat[0])  # D_t on one scale: panels compare at a glance
            rows = summary[summary["variant"] == variant]
            for k, tier in enumerate(tiers):
                sel = rows[rows["tier"] == tier].set_index("population").reindex(pops)
                x = np.arange(len(pops)) + (k - (len(tiers) - 1) / 2) * width
                err = sel["d_std"].to_numpy() if seeds > 1 else None
                ax.bar(x, sel["d_mean"], width, yerr=err, capsize=3, color=colors[tier],
                       label=tier)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(pops)), [p.replace("-", "-\n") for p in pops])
            ax.set_title(f"{variant}\n{_ratio_text(ratio[ratio['variant'] == variant])}",
                         fontsize=STYLE["axes.titlesize"] - 1)
            ax.set_ylabel(f"D_t of {metric}")
        ax = axes.flat[len(variants)]
        opts = [v for v in variants if v in set(mdac["variant"])]
        bar = 0.8 / max(len(pops), 1)
        for k, pop in enumerate(pops):  # horizontal bars: optimization names stay level
            m = mdac[mdac["population"] == pop].set_index("variant").reindex(opts)
            y = np.arange(len(opts)) - (k - (len(pops) - 1) / 2) * bar
            err = m["mdac_std"].to_numpy() if seeds > 1 else None
            ax.barh(y, m["mdac_mean"], bar, xerr=err, capsize=3,
                    color=_POPULATION_COLORS[k % len(_POPULATION_COLORS)],
                    label=f"MDAC, {pop}")
        ax.set_yticks(np.arange(len(opts)), opts)
        ax.invert_yaxis()  # the panels' order, top to bottom
        ax.set_title("MDAC = max − min over tiers of D_t", fontsize=STYLE["axes.titlesize"] - 1)
        ax.set_xlabel("MDAC")
        handles, labels = _legend_entries(axes.flat[:panels])
        _finish(fig, f"Per-tier relative change (D_t) of {metric} against "
                f"{reference_optimization!r}, same seed and population ({_over_seeds(seeds)})",
                handles, labels, "")
    return fig


def plot_participation(df: pd.DataFrame) -> Figure:
    """Share of completed clients per tier (top) and completed/selected per tier (bottom).

    Summed over all rounds of a run, then mean ± std over seeds: shows whom an
    optimization (or the clock's deadline) leaves out of training.
    """
    done = tier_metric(df, "completed")
    if done.empty:
        raise ResultsError("no tier/<tier>/completed values to plot participation")
    keys = ["run", "variant", "population", "tier"]
    done, variants = _with_variant(done)
    per_run = done.groupby(keys)["value"].sum().rename("completed").reset_index()
    per_run["share"] = per_run["completed"] / per_run.groupby("run")["completed"].transform("sum")
    sel, _ = _with_variant(tier_metric(df, "selected"))
    panels = [("share", "share of completed clients")]
    if not sel.empty:
        sel_sum = sel.groupby(keys)["value"].sum().rename("selected").reset_index()
        per_run = per_run.merge(sel_sum, on=keys, how="left")
        per_run["rate"] = per_run["completed"] / per_run["selected"].where(per_run["selected"] > 0)
        panels.append(("rate", "completed / selected"))
    pops = _ordered(per_run["population"].unique(), POPULATION_ORDER)
    tiers = order_tiers(list(per_run["tier"].unique()))
    colors = _colors(tiers)
    width = 0.8 / len(tiers)
    seeds = _seeds(done)
    with matplotlib.rc_context(STYLE):
        fig = _grid(len(panels), len(pops), width=2.0 + 1.1 * len(variants), height=3.4)
        axes = fig.subplots(len(panels), len(pops), squeeze=False, sharey="row")
        for i, (column, ylabel) in enumerate(panels):
            for j, pop in enumerate(pops):
                ax = axes[i, j]
                stats = per_run[per_run["population"] == pop].groupby(["variant", "tier"])[
                    column].agg(["mean", "std"]).reset_index()
                for k, tier in enumerate(tiers):
                    s = stats[stats["tier"] == tier].set_index("variant").reindex(variants)
                    x = np.arange(len(variants)) + (k - (len(tiers) - 1) / 2) * width
                    ax.bar(x, s["mean"], width, yerr=s["std"].to_numpy() if seeds > 1 else None,
                           capsize=3, color=colors[tier], label=tier)
                ax.set_xticks(np.arange(len(variants)), variants, rotation=20, ha="right")
                ax.set_title(pop if i == 0 else "")
                if j == 0:
                    ax.set_ylabel(ylabel)
        handles, labels = _legend_entries(axes.flat)
        _finish(fig, f"Participation by tier, all rounds ({_over_seeds(seeds)})", handles,
                labels, "tier")
    return fig


def plot_user_cdf(df: pd.DataFrame, metric: str = "recall@20", round: int | None = None
                  ) -> Figure:
    """Per-tier CDF of a per-user metric (default Recall@20) at each run's last evaluation
    (or ``round``): one panel per (variant, population), one step line per tier plus all
    users (black), averaged over seeds (the mean of CDFs is the CDF of the pooled seeds).

    The height at x = 0 is the share of users with no hit; a tier whose line stays above
    another's has more poorly served users at every level.
    """
    cdf = user_cdf(df, metric, round)
    cdf, variants = _with_variant(cdf)
    pops = _ordered(cdf["population"].unique(), POPULATION_ORDER)
    tiers = order_tiers([t for t in cdf["tier"].unique() if t != ALL_USERS])
    colors = {**_colors(tiers), ALL_USERS: "#000000"}
    with matplotlib.rc_context(STYLE):
        fig = _grid(len(variants), len(pops), width=4.0, height=3.0)
        axes = fig.subplots(len(variants), len(pops), squeeze=False, sharex=True, sharey=True)
        for i, variant in enumerate(variants):
            for j, pop in enumerate(pops):
                ax = axes[i, j]
                part = cdf[(cdf["variant"] == variant) & (cdf["population"] == pop)]
                mean = part.groupby(["tier", "x"])["share"].mean().reset_index()
                for tier in [*tiers, ALL_USERS]:
                    line = mean[mean["tier"] == tier]
                    if not line.empty:
                        ax.step(line["x"], line["share"], where="post", color=colors[tier],
                                label=tier, linewidth=2.0 if tier == ALL_USERS else 1.4,
                                linestyle="--" if tier == ALL_USERS else "-")
                ax.set_ylim(0, 1.02)
                ax.set_title(f"{variant}\n{pop}", fontsize=10)
                if i == len(variants) - 1:
                    ax.set_xlabel(f"per-user {metric}")
                if j == 0:
                    ax.set_ylabel("share of users <= x")
        handles, labels = _legend_entries(axes.flat)
        seeds = _seeds(cdf)
        what = "one seed" if seeds == 1 else f"mean over {seeds} seeds"
        _finish(fig, f"CDF of per-user {metric} by tier (last evaluation, {what})", handles,
                labels, "tier")
    return fig


def plot_pass_study(tables: PassStudyTables, metric: str = "rated_auc") -> Figure:
    """RF²'s comparison after whole passes (``rf2_reproduce_ml100k``).

    Top row, one panel per optimization: MDAC of each tiering at each pass (bars = seed
    mean, error bars = seed std, dots = single seeds). Bottom row: MDAC(realistic) /
    MDAC(independent) per pass (of the seed means), one bar per realistic tiering side
    by side (e.g. the leaky and the leak-free rf2-dirichlet map); error bars = std of the
    per-seed quotients. Ratios from fewer than ``MIN_SEEDS_FOR_RATIO`` seeds are not
    drawn (their spread means nothing); without any, the figure has the top row only.
    """
    m, ratio = tables.mdac, tables.ratio
    opts = [o for o in _ordered(m["optimization"].unique(), ()) if o != "none"]
    tierings = _ordered(m["tiering"].unique(), ("rf2-random",))
    passes = sorted(m["pass"].unique())
    reals = _ordered(ratio["realistic"].unique(), ())
    spare = iter(matplotlib.color_sequences["tab10"])
    color = {t: matplotlib.colors.to_hex(next(spare)) for t in dict.fromkeys([*tierings, *reals])}
    ratio = ratio[ratio["n_seeds"] >= MIN_SEEDS_FOR_RATIO]
    seeds = int(m["seed"].nunique()) if "seed" in m else 1
    rows = 2 if len(ratio) else 1
    with matplotlib.rc_context(STYLE):
        fig = _grid(rows, len(opts), width=1.6 + 1.3 * len(passes), height=3.4)
        axes = fig.subplots(rows, len(opts), squeeze=False, sharey="row")
        for j, opt in enumerate(opts):
            ax = axes[0, j]
            width = 0.8 / max(len(tierings), 1)
            for k, tiering in enumerate(tierings):
                x0 = np.arange(len(passes)) + (k - (len(tierings) - 1) / 2) * width
                for i, p in enumerate(passes):
                    v = m[(m["optimization"] == opt) & (m["tiering"] == tiering)
                          & (m["pass"] == p)]["mdac"].to_numpy(dtype=float)
                    if v.size == 0:
                        continue
                    ax.bar(x0[i], np.nanmean(v), width, color=color[tiering],
                           yerr=np.nanstd(v, ddof=1) if v.size > 1 else 0, capsize=3,
                           label=tiering if i == 0 else None)
                    ax.plot(np.full(v.size, x0[i]), v, "k.", ms=3)
            ax.set_xticks(np.arange(len(passes)), [f"pass {p}" for p in passes])
            ax.set_title(f"{opt}: MDAC of {metric}")
            if rows == 1:
                continue
            ax = axes[1, j]
            width = 0.8 / max(len(reals), 1)
            for k, real in enumerate(reals):
                x0 = np.arange(len(passes)) + (k - (len(reals) - 1) / 2) * width
                r = ratio[(ratio["optimization"] == opt) & (ratio["realistic"] == real)]
                r = r.set_index("pass").reindex(passes)
                ax.bar(x0, r["ratio"].to_numpy(dtype=float), width, color=color[real],
                       yerr=r["ratio_seed_std"].fillna(0).to_numpy(dtype=float), capsize=3,
                       label=None if real in tierings else real)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(passes)), [f"pass {p}" for p in passes])
            ax.set_title(f"{opt}: MDAC realistic / random")
        axes[0, 0].set_ylabel("MDAC (seed mean ± std)")
        if rows == 2:
            axes[1, 0].set_ylabel("realistic / random MDAC")
        handles, labels = _legend_entries(axes.flat)
        note = "" if rows == 2 else (f"; ratios need {MIN_SEEDS_FOR_RATIO} seeds, "
                                     "not drawn")
        _finish(fig, f"RF² after whole passes: MDAC of {metric} by tiering "
                f"({_over_seeds(seeds)}{note})", handles, labels, "tiering")
    return fig


def _print_tables(tables: FairnessTables, metric: str) -> None:
    def show(f: pd.DataFrame) -> pd.DataFrame:  # context columns only where they vary
        return f[[c for c in f if c not in MATCH_COLUMNS or f[c].nunique(dropna=False) > 1]]

    fmt = "{:.4g}".format
    print(f"MDAC of {metric} (max tier gap of relative change; 0 = fair), mean over seeds:")
    print(show(tables.mdac_summary).to_string(index=False, float_format=fmt))
    print("\nMDAC(realistic) / MDAC(independent):")
    print(show(tables.ratio).to_string(index=False, float_format=fmt))


def main(argv: Sequence[str] | None = None) -> int:
    """Write tier curves, the fairness-gap figure and participation (PNG and PDF by default),
    the MDAC tables as CSV, and print the MDAC table. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="rf2-figures", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path, help="a multirun folder (or one run folder)")
    parser.add_argument("--out", type=Path, help="output folder (default: MULTIRUN_DIR/figures)")
    parser.add_argument("--metric", default="recall@20", help="metric key (default recall@20)")
    parser.add_argument("--reference", default="none",
                        help="optimization D_t is measured against (default none)")
    parser.add_argument("--round", type=int, help="round to compare (default: each run's last)")
    parser.add_argument("--independent", default="independent",
                        help="population of the MDAC ratio's denominator (default independent)")
    parser.add_argument("--realistic", default="popularity-dirichlet",
                        help="population of its numerator (default popularity-dirichlet)")
    parser.add_argument("--target-fraction", type=float, default=0.8,
                        help="runs of several arms (beyond_rf2): simulated time to this "
                        "fraction of the sync arm's final metric (default 0.8)")
    parser.add_argument("--formats", default="png,pdf", help="file types (default png,pdf)")
    parser.add_argument("--passes", help="RF²'s pass study: compare at these passes, e.g. 1,2,10 "
                        "(tierings from the 'tiering' column; --independent defaults to "
                        "rf2-random, every other tiering is a realistic one)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")
    try:
        df = with_arm(load(args.multirun_dir, ARM_COLUMNS))
    except UserInputError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    known = set(df["metric"].unique())
    if args.metric not in known and not any(m.endswith("/" + args.metric) for m in known):
        overall = sorted(m for m in known if "/" not in m)
        print(f"rf2-figures: --metric {args.metric!r} is not logged in {args.multirun_dir}; "
              f"known: {', '.join(overall)}", file=sys.stderr)
        return 2
    out = args.out or args.multirun_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    slug = _slug(args.metric)
    if args.passes:
        return _pass_study(df, args, out, slug)
    several_arms = df["arm"].nunique() > 1
    if several_arms:
        _beyond(df, args, out)
    tables: FairnessTables | None = None
    try:
        if several_arms:  # D_t of each arm is in beyond_rf2.md; "none" runs differ by arm
            raise ResultsError("runs of several arms: see beyond_rf2.md")
        tables = fairness_gap_table(df, args.metric, args.round, args.reference,
                                    args.realistic, args.independent)
        _print_tables(tables, args.metric)
        tables.mdac_summary.to_csv(out / f"mdac_{slug}.csv", index=False)
        tables.ratio.to_csv(out / f"mdac_ratio_{slug}.csv", index=False)
        tables.per_tier.to_csv(out / f"relative_change_{slug}.csv", index=False)
    except ResultsError as exc:
        print(f"no fairness-gap figure or MDAC table: {exc}")
    jobs = {
        f"tier_curves_{slug}": lambda: plot_tier_curves(df, args.metric),
        f"fairness_gap_{slug}": lambda: plot_fairness_gap(
            df, args.metric, args.round, args.reference, args.realistic, args.independent,
            tables=tables),
        "participation": lambda: plot_participation(df),
        "user_cdf_recall_at_20": lambda: plot_user_cdf(df, "recall@20", args.round),
    }
    written = 0
    for name, make in jobs.items():
        if name.startswith("fairness_gap") and tables is None:
            continue
        try:
            fig = make()
        except ResultsError as exc:
            print(f"skipped {name}: {exc}")
            continue
        for i, ext in enumerate(args.formats.split(",")):
            fig.savefig(out / f"{name}.{ext}", dpi=150)
            if i == 0:  # the layout is computed once, for every format
                fig.set_layout_engine("none")
        written += 1
    print(f"wrote {written} figure(s) as {args.formats} to {out}")
    return 0 if written else 1


def _beyond(df: pd.DataFrame, args: argparse.Namespace, out: Path) -> None:
    """Runs of several arms (``+experiment=beyond_rf2``): beyond_rf2.md, CSVs, the figure."""
    from rf2.analysis.beyond_figure import plot_beyond_rf2

    try:
        tables = beyond_tables(df, args.metric, args.target_fraction)
    except ResultsError as exc:
        print(f"no beyond-RF² table: {exc}")
        return
    text = beyond_markdown(tables)
    (out / "beyond_rf2.md").write_text(text, encoding="utf-8")
    tables.per_run.to_csv(out / "beyond_rf2_runs.csv", index=False)
    tables.summary.to_csv(out / "beyond_rf2_summary.csv", index=False)
    print(text)
    fig = plot_beyond_rf2(tables)
    for i, ext in enumerate(args.formats.split(",")):
        fig.savefig(out / f"beyond_rf2.{ext}", dpi=150)
        if i == 0:
            fig.set_layout_engine("none")
    print(f"wrote beyond_rf2.md and beyond_rf2 as {args.formats} to {out}")


def _pass_study(df: pd.DataFrame, args: argparse.Namespace, out: Path, slug: str) -> int:
    """``--passes``: RF²'s comparison after whole passes, tables + one figure."""
    try:
        passes = [int(p) for p in args.passes.split(",")]
    except ValueError:
        print(f"--passes {args.passes!r}: expected integers like 1,2,10", file=sys.stderr)
        return 2
    independent = "rf2-random" if args.independent == "independent" else args.independent
    try:
        tables = pass_study_tables(df, args.metric, passes, independent,
                                   reference_optimization=args.reference)
    except ResultsError as exc:
        print(exc, file=sys.stderr)
        return 1
    def show(f: pd.DataFrame) -> pd.DataFrame:  # context columns only where they vary
        return f[[c for c in f if c not in MATCH_COLUMNS or f[c].nunique(dropna=False) > 1]]

    fmt = "{:.4g}".format
    print(f"MDAC of {args.metric} by pass and tiering (mean ± std over seeds):")
    print(show(tables.mdac_summary).to_string(index=False, float_format=fmt))
    print(f"\nMDAC(realistic) / MDAC({independent}) by pass:")
    print(show(tables.ratio).to_string(index=False, float_format=fmt))
    tables.mdac.to_csv(out / f"pass_mdac_runs_{slug}.csv", index=False)
    tables.mdac_summary.to_csv(out / f"pass_mdac_{slug}.csv", index=False)
    tables.ratio.to_csv(out / f"pass_mdac_ratio_{slug}.csv", index=False)
    fig = plot_pass_study(tables, args.metric)
    for i, ext in enumerate(args.formats.split(",")):
        fig.savefig(out / f"pass_study_{slug}.{ext}", dpi=150)
        if i == 0:
            fig.set_layout_engine("none")
    print(f"wrote pass_study_{slug} as {args.formats} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
