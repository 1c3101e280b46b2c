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


def plot_front_png(records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"], path: str | Path,
                   title: str = "") -> None:
    """Accuracy vs energy (or latency): all trials, front highlighted, baselines labelled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x, y, colour = _plot_axes(objectives)
    done = [r for r in records if r.state == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    if x is None or not done:
        ax.text(0.5, 0.5, "no completed trials yet", ha="center", va="center", transform=ax.transAxes)
    else:
        feas = [r for r in done if r.feasible is not False and not r.on_front]
        infeas = [r for r in done if r.feasible is False]
        front = sorted([r for r in done if r.on_front], key=lambda r: r.values[x.name])
        cvals = [r.values[colour.name] for r in done] if colour else None
        norm = None
        if colour and cvals:
            norm = matplotlib.colors.Normalize(min(cvals), max(cvals) if max(cvals) > min(cvals) else min(cvals) + 1)
        def scatter(rs, **kw):
            if not rs:
                return None
            c = [r.values[colour.name] for r in rs] if colour else None
            return ax.scatter([r.values[x.name] for r in rs], [r.values[y.name] for r in rs], c=c,
                              cmap="viridis" if colour else None, norm=norm, **kw)
        scatter(feas, s=30, alpha=0.55, label="trials", edgecolors="none")
        scatter(infeas, s=30, marker="x", alpha=0.6, label="infeasible (accuracy drop)")
        sc = scatter(front, s=90, edgecolors="red", linewidths=1.8, label="Pareto front (all objectives)")
        if front and len(objectives) == 2:  # a staircase only means something when the front is 2-D
            ax.plot([r.values[x.name] for r in front], [r.values[y.name] for r in front], color="red", alpha=0.35,
                    lw=1, zorder=0)
        if sc is not None and colour:
            fig.colorbar(sc, ax=ax, label=colour.label)
        for r in done:
            if r.baseline:
                ax.annotate(r.baseline.replace("uniform-", "all "), (r.values[x.name], r.values[y.name]),
                            textcoords="offset points", xytext=(6, 4), fontsize=8)
            if r.knee:
                ax.annotate("knee", (r.values[x.name], r.values[y.name]), textcoords="offset points",
                            xytext=(6, -12), fontsize=8, color="red")
        ax.set_xlabel(x.label)
        ax.set_ylabel(y.label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_front_html(records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"], path: str | Path,
                    title: str = "") -> None:
    """Interactive version of the PNG (hover shows the per-layer plan); self-contained HTML."""
    import plotly.graph_objects as go

    x, y, colour = _plot_axes(objectives)
    done = [r for r in records if r.state == "COMPLETE"]
    fig = go.Figure()
    if x is not None and done:
        groups = [
            ("trials", [r for r in done if not r.on_front and r.feasible is not False], dict(size=8, opacity=0.6)),
            ("infeasible", [r for r in done if r.feasible is False], dict(size=8, symbol="x", opacity=0.6)),
            ("Pareto front", sorted([r for r in done if r.on_front], key=lambda r: r.values[x.name]),
             dict(size=13, line=dict(color="red", width=2))),
        ]
        for name, rs, marker in groups:
            if not rs:
                continue
            if colour:
                marker = {**marker, "color": [r.values[colour.name] for r in rs], "colorscale": "Viridis",
                          "showscale": name == "Pareto front", "colorbar": dict(title=colour.label)}
            fig.add_trace(go.Scatter(
                x=[r.values[x.name] for r in rs], y=[r.values[y.name] for r in rs],
                mode="markers+text" if name != "infeasible" else "markers", name=name, marker=marker,
                text=[(r.baseline or "").replace("uniform-", "all ") + (" (knee)" if r.knee else "") for r in rs],
                textposition="top right",
                hovertext=[f"trial {r.number} {r.baseline or ''}<br>{r.plan_summary}<br>"
                           + "<br>".join(f"{o.label}: {r.values[o.name]:.6g}" for o in objectives) for r in rs],
                hoverinfo="text",
            ))
        fig.update_layout(xaxis_title=x.label, yaxis_title=y.label)
    fig.update_layout(title=title, template="plotly_white")
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
