"""Figures from run folders: per-tier curves, RF²'s fairness-gap bars, participation.

Console script ``rf2-figures MULTIRUN_DIR [--out DIR] [--metric recall@20]`` (also
``python -m rf2.analysis.figures``). The plot functions take a :func:`rf2.analysis.results.load` frame and
return a matplotlib ``Figure`` built with the object API (no pyplot), so a notebook can
call them under any backend without global figure state; ``main`` renders with Agg.
No torch, no Flower: this runs on a laptop with pandas and matplotlib.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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

__all__ = ["main", "plot_fairness_gap", "plot_participation", "plot_pass_study",
           "plot_tier_curves", "plot_user_cdf"]

STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 13, "axes.grid": True,
    "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
}
POPULATION_ORDER = ("independent", "rf2-sorted", "activity", "popularity-dirichlet")
_TIER_COLORS = {"low": "#d62728", "mid": "#ff7f0e", "high": "#2ca02c"}


def _colors(tiers: Sequence[str]) -> dict[str, str]:
    """Stable colours: low/mid/high always red/orange/green, others from tab10."""
    spare = iter(c for c in matplotlib.colormaps["tab10"].colors if c not in _TIER_COLORS)
    return {t: _TIER_COLORS.get(t) or matplotlib.colors.to_hex(next(spare)) for t in tiers}


def _ordered(values: Sequence[object], first: Sequence[str]) -> list[str]:
    present = {str(v) for v in values}
    return [v for v in first if v in present] + sorted(present - set(first))


def _with_variant(df: pd.DataFrame, reference: str = "none") -> tuple[pd.DataFrame, list[str]]:
    """Add ``variant``: the optimization, plus any context column the sweep varies
    (e.g. "exclude_low [strategy=fedprox]"), so different strategies never share a bar."""
    varying = [c for c in MATCH_COLUMNS if c in df and df[c].nunique(dropna=False) > 1]
    label = df["optimization"].astype(str)
    for c in varying:
        label = label + f" [{c}=" + df[c].astype(str) + "]"
    df = df.assign(variant=label.to_numpy())
    order = _ordered(df["variant"].unique(), [])
    return df, sorted(order, key=lambda v: (not v.startswith(reference + " ") and v != reference))


def _grid(rows: int, cols: int, width: float = 4.4, height: float = 3.2) -> Figure:
    return Figure(figsize=(width * cols + 1.6, height * rows + 0.6), layout="constrained")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text.replace("@", "_at_")).strip("_")


def plot_tier_curves(df: pd.DataFrame, metric: str = "recall@20") -> Figure:
    """``tier/<tier>/<metric>`` over rounds: mean over seeds with a ±1 std band.

    One panel per optimization (rows) x population (columns); the dashed line is the
    all-users metric, so a tier's gap to the average is visible at a glance.
    """
    t = tier_metric(df, metric)
    if t.empty:
        raise ResultsError(f"no tier/<tier>/{metric} values to plot")
    t, variants = _with_variant(t)
    overall, _ = _with_variant(df[df["metric"] == metric])
    pops = _ordered(t["population"].unique(), POPULATION_ORDER)
    tiers = order_tiers(list(t["tier"].unique()))
    colors = _colors(tiers)
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
                    ax.fill_between(s.index, s["mean"] - s["std"].fillna(0),
                                    s["mean"] + s["std"].fillna(0), color=colors[tier], alpha=0.2)
                o = overall[(overall["variant"] == variant) & (overall["population"] == pop)]
                o = o.groupby("round")["value"].mean()
                if not o.empty:
                    ax.plot(o.index, o.to_numpy(), "k--", lw=1.2, label="all users")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if i == len(variants) - 1:
                    ax.set_xlabel("round")
                if j == 0:
                    ax.set_ylabel(metric)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        for ax in axes.flat:  # the first panel may lack a tier
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside right upper", title="tier")
        fig.suptitle(f"Per-tier {metric} (mean ± std over seeds)")
    return fig


def _mdac_label(pop: str, mdac: pd.DataFrame) -> str:
    """Tick label of a population group: its name and MDAC (mean ± std over seeds)."""
    name = pop.replace("-", "-\n")
    if pop not in mdac.index:
        return name
    mean, std = mdac.loc[pop, "mdac_mean"], mdac.loc[pop, "mdac_std"]
    return f"{name}\nMDAC {mean:.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else "")


def plot_fairness_gap(df: pd.DataFrame, metric: str = "recall@20", round: int | None = None,
                      reference_optimization: str = "none",
                      realistic: str = "popularity-dirichlet", independent: str = "independent",
                      tables: FairnessTables | None = None) -> Figure:
    """RF²'s figure: per-tier D_t of each optimization under each population.

    Bars are seed means with seed-std error bars; each population group is annotated with
    its MDAC (the spread of its bars), each panel with MDAC(realistic)/MDAC(independent).
    Raises :class:`ResultsError` when there is no reference run.
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
    ncols = min(len(variants), 3)
    nrows = -(-len(variants) // ncols)
    width = 0.8 / max(len(tiers), 1)
    with matplotlib.rc_context(STYLE):
        fig = _grid(nrows, ncols, width=max(2.4 + 1.6 * len(pops), 6.0 / ncols), height=3.8)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for ax in axes.flat[len(variants):]:
            ax.set_visible(False)
        for ax, variant in zip(axes.flat, variants, strict=False):
            rows = summary[summary["variant"] == variant]
            for k, tier in enumerate(tiers):
                sel = rows[rows["tier"] == tier].set_index("population").reindex(pops)
                x = np.arange(len(pops)) + (k - (len(tiers) - 1) / 2) * width
                ax.bar(x, sel["d_mean"], width, yerr=sel["d_std"].to_numpy(), capsize=3,
                       color=colors[tier], label=tier)
            ax.axhline(0, color="black", lw=0.8)
            m = mdac[mdac["variant"] == variant].set_index("population")
            ax.set_xticks(np.arange(len(pops)), [_mdac_label(p, m) for p in pops])
            r = ratio[ratio["variant"] == variant]["ratio"]
            ratio_text = f"{r.iloc[0]:.3g}x" if len(r) and np.isfinite(r.iloc[0]) else "n/a"
            ax.set_title(f"{variant}\nMDAC realistic/independent = {ratio_text}")
        for ax in axes[:, 0]:
            ax.set_ylabel(f"D_t = relative change of {metric}")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", title="tier")
        fig.suptitle(f"Per-tier change vs {reference_optimization!r} (mean ± std over seeds)")
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
    with matplotlib.rc_context(STYLE):
        fig = _grid(len(panels), len(pops), width=1.2 + 1.1 * len(variants), height=3.4)
        axes = fig.subplots(len(panels), len(pops), squeeze=False, sharey="row")
        for i, (column, ylabel) in enumerate(panels):
            for j, pop in enumerate(pops):
                ax = axes[i, j]
                stats = per_run[per_run["population"] == pop].groupby(["variant", "tier"])[
                    column].agg(["mean", "std"]).reset_index()
                for k, tier in enumerate(tiers):
                    s = stats[stats["tier"] == tier].set_index("variant").reindex(variants)
                    x = np.arange(len(variants)) + (k - (len(tiers) - 1) / 2) * width
                    ax.bar(x, s["mean"], width, yerr=s["std"].to_numpy(), capsize=3,
                           color=colors[tier], label=tier)
                ax.set_xticks(np.arange(len(variants)), variants, rotation=20, ha="right")
                ax.set_title(pop if i == 0 else "")
                if j == 0:
                    ax.set_ylabel(ylabel)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", title="tier")
        fig.suptitle("Participation by tier (all rounds, mean ± std over seeds)")
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
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", title="tier")
        fig.suptitle(f"CDF of per-user {metric} by tier (last evaluation, mean over seeds)")
    return fig


def plot_pass_study(tables: PassStudyTables, metric: str = "rated_auc") -> Figure:
    """RF²'s comparison after whole passes (``rf2_reproduce_ml100k``).

    Top row, one panel per optimization: MDAC of each tiering at each pass (bars = seed
    mean, error bars = seed std, dots = single seeds). Bottom row: MDAC(realistic) /
    MDAC(independent) per pass (of the seed means), one bar per realistic tiering side
    by side (e.g. the leaky and the leak-free rf2-dirichlet map); error bars = std of the
    per-seed quotients.
    """
    m, ratio = tables.mdac, tables.ratio
    opts = [o for o in _ordered(m["optimization"].unique(), ()) if o != "none"]
    tierings = _ordered(m["tiering"].unique(), ("rf2-random",))
    passes = sorted(m["pass"].unique())
    reals = _ordered(ratio["realistic"].unique(), ())
    spare = iter(matplotlib.colormaps["tab10"].colors)
    color = {t: matplotlib.colors.to_hex(next(spare)) for t in [*tierings, *reals]}
    with matplotlib.rc_context(STYLE):
        fig = _grid(2, len(opts), width=1.6 + 1.3 * len(passes), height=3.4)
        axes = fig.subplots(2, len(opts), squeeze=False, sharey="row")
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
            ax = axes[1, j]
            width = 0.8 / max(len(reals), 1)
            for k, real in enumerate(reals):
                x0 = np.arange(len(passes)) + (k - (len(reals) - 1) / 2) * width
                r = ratio[(ratio["optimization"] == opt) & (ratio["realistic"] == real)]
                r = r.set_index("pass").reindex(passes)
                ax.bar(x0, r["ratio"].to_numpy(dtype=float), width, color=color[real],
                       yerr=r["ratio_seed_std"].fillna(0).to_numpy(dtype=float), capsize=3,
                       label=real)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(passes)), [f"pass {p}" for p in passes])
            ax.set_title(f"{opt}: MDAC realistic / random")
        axes[0, 0].set_ylabel("MDAC (seed mean ± std)")
        axes[1, 0].set_ylabel("ratio (of seed means)")
        axes[0, 0].legend(title="tiering", fontsize=8)
        axes[1, 0].legend(title="realistic", fontsize=8)
        fig.suptitle(f"RF² after whole passes: MDAC of {metric} by tiering")
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
    parser.add_argument("--formats", default="png,pdf", help="file types (default png,pdf)")
    parser.add_argument("--passes", help="RF²'s pass study: compare at these passes, e.g. 1,2,10 "
                        "(tierings from the 'tiering' column; --independent defaults to "
                        "rf2-random, every other tiering is a realistic one)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")
    try:
        df = load(args.multirun_dir)
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
    tables: FairnessTables | None = None
    try:
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
