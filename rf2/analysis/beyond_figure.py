"""The beyond-RF² study's figure (``rf2-figures`` writes it as ``beyond_rf2``).

One column per population. Top: the overall metric against *simulated* time, one line per
arm (mean over seeds of the value and of the time at each evaluated round), with the
target of the time-to-target column as a dotted line: how fast each arm gets there on
the same clock. Bottom: D_t per tier and arm against ``sync`` (bars: mean over seeds,
whiskers: ± std when there are several seeds), MDAC in the legend label.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from rf2.analysis.beyond import REFERENCE_ARM, BeyondTables, _arm_order
from rf2.analysis.figures import (
    POPULATION_ORDER,
    STYLE,
    _colors,
    _finish,
    _grid,
    _legend_entries,
    _ordered,
    _over_seeds,
)

__all__ = ["plot_beyond_rf2"]

_ARM_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def plot_beyond_rf2(tables: BeyondTables) -> Figure:
    """Curves against simulated time (top) and D_t per tier (bottom), per population."""
    s, c, m = tables.summary, tables.curves, tables.metric
    pops = _ordered(list(s["population"].unique()), POPULATION_ORDER)
    arms = _arm_order(list(s["arm"]))
    arm_color = {a: _ARM_COLORS[i % len(_ARM_COLORS)] for i, a in enumerate(arms)}
    seeds = int(s["n_seeds"].max()) if len(s) else 1
    tiers = tables.tiers
    tier_color = _colors(tiers)
    compared = [a for a in arms if a != REFERENCE_ARM]
    with matplotlib.rc_context(STYLE):
        fig = _grid(2, len(pops), width=5.0, height=3.4)
        axes = fig.subplots(2, len(pops), squeeze=False)
        for j, pop in enumerate(pops):
            ax = axes[0, j]
            for arm in arms:
                part = c[(c["arm"] == arm) & (c["population"] == pop)]
                mean = part.groupby("round")[["sim_time_s", "value"]].mean()
                mean = mean[mean["sim_time_s"] > 0]  # round 0 has no place on a log axis
                if not mean.empty:
                    ax.plot(mean["sim_time_s"], mean["value"], marker="o", ms=3, lw=1.8,
                            color=arm_color[arm], label=arm)
            goal = s.loc[s["population"] == pop, "target"].mean()
            if np.isfinite(goal):
                ax.axhline(goal, color="0.4", ls=":", lw=1.4, label="target")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: no label clutter
            ax.set_xlabel("simulated time (s)")
            ax.set_ylabel(m)
            ax.set_title(pop)
            ax = axes[1, j]
            width = 0.8 / max(1, len(tiers))
            x = np.arange(len(compared))
            for k, tier in enumerate(tiers):
                rows = [s[(s["arm"] == a) & (s["population"] == pop)] for a in compared]
                d = [float(r[f"d/{tier}"].iloc[0]) if len(r) else np.nan for r in rows]
                tier_runs = tables.per_run[tables.per_run["population"] == pop]
                err = [float(tier_runs.loc[tier_runs["arm"] == a, f"d/{tier}"].std())
                       if seeds > 1 else 0.0 for a in compared]
                ax.bar(x + (k - (len(tiers) - 1) / 2) * width, d, width,
                       yerr=np.nan_to_num(err) if seeds > 1 else None, capsize=2,
                       color=tier_color[tier], label=tier)
            ax.axhline(0, color="k", lw=0.8)
            labels = []
            for a in compared:
                r = s[(s["arm"] == a) & (s["population"] == pop)]
                labels.append(f"{a}\nMDAC {float(r['mdac'].iloc[0]):.3f}" if len(r) else a)
            ax.set_xticks(x, labels)
            ax.set_ylabel(f"D_t of {m} vs {REFERENCE_ARM}")
        handles, labels = _legend_entries(axes.flat)
        _finish(fig, f"Beyond RF²: {m} against simulated time, and D_t per tier "
                f"({_over_seeds(seeds)})", handles, labels, "")
    return fig
