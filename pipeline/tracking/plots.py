"""The front as a table and as plots (pure: records in, files out), logged on the parent run by the tracker."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.objectives import ObjectiveInfo
    from pipeline.search.records import TrialRecord


# -- table and plots (pure: records in, files out) ------------------------------------------
FRONT_COLUMNS = ["trial", "baseline", "knee", "feasible", "plan"]


def front_rows(records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"]) -> list[dict[str, Any]]:
    """One dict per front trial, ordered by the first objective (best first)."""
    rows = []
    on = [r for r in records if r.on_front]
    first = objectives[0]
    on.sort(key=lambda r: r.values[first.name], reverse=first.direction == "maximize")
    for r in on:
        row: dict[str, Any] = {"trial": r.number, "baseline": r.baseline or "", "knee": r.knee,
                               "feasible": r.feasible}
        for o in objectives:
            row[o.column] = r.values[o.name]
        row.update({k: r.metrics.get(k) for k in ("accuracy_drop", "latency_ms_p50", "effective_bits_per_weight",
                                                   "joules_per_inference")})
        row.update(plan=r.plan_summary, run_id=r.run_id or "")
        rows.append(row)
    return rows


def front_csv(records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"]) -> str:
    rows = front_rows(records, objectives)
    buf = io.StringIO()
    cols = FRONT_COLUMNS[:4] + [o.column for o in objectives] + ["accuracy_drop", "latency_ms_p50",
                                                                 "effective_bits_per_weight", "joules_per_inference",
                                                                 "plan", "run_id"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    return buf.getvalue()


def _plot_axes(objectives: Sequence["ObjectiveInfo"]):
    """(x objective, y objective, colour objective or None): cost on x, accuracy on y."""
    y = next(o for o in objectives if o.name == "accuracy")
    costs = [o for o in objectives if o.name != "accuracy"]
    x = next((o for o in costs if o.name in ("energy", "latency")), costs[0] if costs else None)
    colour = next((o for o in costs if o is not x), None)
    return x, y, colour


def plot_front(records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"], paths: Sequence[str | Path],
               title: str = "") -> None:
    """Accuracy vs energy (or latency): all trials, the front ringed, FP32 and the uniform baselines marked.

    Written as PNG and SVG (both render in MLflow's artifact viewer). There is no HTML version on purpose: a
    self-contained plotly file is ~4.6 MB, which the viewer shows blank; the runs table and front.csv carry
    what a hover would. Baseline labels are staggered so neighbours do not print over each other.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x, y, colour = _plot_axes(objectives)
    done = [r for r in records if r.state == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    if x is None or not done:
        ax.text(0.5, 0.5, "no completed trials yet", ha="center", va="center", transform=ax.transAxes)
    else:
        def xy(rs):
            return [r.values[x.name] for r in rs], [r.values[y.name] for r in rs]

        cvals = [r.values[colour.name] for r in done] if colour else []
        norm = None
        if cvals:
            hi = max(cvals) if max(cvals) > min(cvals) else min(cvals) + 1
            norm = matplotlib.colors.Normalize(min(cvals), hi)
        searched = [r for r in done if not r.baseline]
        feas = [r for r in searched if r.feasible is not False]
        infeas = [r for r in done if r.feasible is False]
        sc = None
        if feas:
            sc = ax.scatter(*xy(feas), c=[r.values[colour.name] for r in feas] if colour else "tab:blue",
                            cmap="viridis" if colour else None, norm=norm, s=28, alpha=0.6, edgecolors="none",
                            label="searched plans")
        if infeas:
            ax.scatter(*xy(infeas), marker="x", s=30, color="grey", alpha=0.7,
                       label="over the accuracy-drop limit")
        base = [r for r in done if r.baseline and r.feasible is not False]
        fp32 = [r for r in base if r.baseline == "uniform-fp32"]
        uniform = [r for r in base if r.baseline != "uniform-fp32"]
        if uniform:
            ax.scatter(*xy(uniform), marker="D", s=55, color="tab:orange", edgecolors="black", linewidths=0.6,
                       label="uniform baselines", zorder=3)
        if fp32:
            ax.scatter(*xy(fp32), marker="*", s=220, color="gold", edgecolors="black", linewidths=0.8,
                       label="FP32 reference", zorder=4)
        front = sorted([r for r in done if r.on_front], key=lambda r: r.values[x.name])
        if front:
            ax.scatter(*xy(front), s=150, facecolors="none", edgecolors="red", linewidths=1.8,
                       label="Pareto front (all objectives)", zorder=5)
            if len(objectives) == 2:  # a staircase only means something when the front is 2-D
                ax.plot(*xy(front), color="red", alpha=0.35, lw=1, zorder=1)
        if sc is not None and colour:
            fig.colorbar(sc, ax=ax, label=colour.label)
        offsets = [(8, 8), (8, -14), (-8, 8), (-8, -14)]
        for i, r in enumerate(sorted(base, key=lambda r: (r.values[x.name], r.values[y.name]))):
            dx, dy = offsets[i % len(offsets)]
            name = "FP32" if r.baseline == "uniform-fp32" else r.baseline.replace("uniform-", "all ")
            ax.annotate(name, (r.values[x.name], r.values[y.name]), textcoords="offset points", xytext=(dx, dy),
                        ha="left" if dx > 0 else "right", fontsize=8,
                        arrowprops=dict(arrowstyle="-", color="grey", lw=0.5))
        for r in done:
            if r.knee:
                ax.annotate(f"knee (trial {r.number})", (r.values[x.name], r.values[y.name]),
                            textcoords="offset points", xytext=(10, -18), fontsize=8, color="red",
                            arrowprops=dict(arrowstyle="->", color="red", lw=0.7))
        ax.set_xlabel(x.label)
        ax.set_ylabel(y.label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    ax.set_title(title)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path)
    plt.close(fig)


def plot_front_png(records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"], path: str | Path,
                   title: str = "") -> None:
    """:func:`plot_front` to one file (its suffix picks the format)."""
    plot_front(records, objectives, [path], title)
