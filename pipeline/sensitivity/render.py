"""The sensitivity table for people: a rich table, a heat map PNG, a CSV, and MLflow.

Drops are shown in the metric's own units (``accuracy`` 0.012 = 1.2 points), sign-adjusted so
that positive is worse whatever the metric's direction; the title carries the eval subset, the
backend and where the latency share comes from, so no number travels without its label.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from rich.table import Table

from pipeline.sensitivity.table import SensitivityTable


def _fmt_drop(v: float) -> str:
    return "failed" if not math.isfinite(v) else f"{v:+.4f}"


def common_prefix(names: list[str]) -> str:
    """The dotted prefix every layer name shares (``encoder.``), left out of the table's rows."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    out = out[: min(len(p) for p in parts) - 1]
    return ".".join(out) + "." if out else ""


def rich_table(t: SensitivityTable, max_rows: int | None = None) -> Table:
    prefix = common_prefix(t.layers)
    title = (f"{t.model}: {t.metric} drop with only that layer quantized (> 0 is worse), on the artifact via "
             f"{t.backend} ({t.source}); {t.eval_label}; FP32 {t.metric} {t.reference_accuracy:.4f}"
             + (f"; layer names without the common prefix {prefix!r}" if prefix else ""))
    table = Table(title=title, title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("op")
    table.add_column("params", justify="right")
    table.add_column("size%", justify="right")
    table.add_column("lat%*", justify="right")
    for f in t.formats:
        table.add_column(f.value, justify="right")
    if t.proxy and t.proxy.scores:
        table.add_column("proxy i4/i8", justify="right")
    worst = max((t.drop(n, f) for n in t.layers for f in t.formats if math.isfinite(t.drop(n, f))), default=0.0)
    rows = sorted(t.layers, key=lambda n: -max((d for d in (t.drop(n, f) for f in t.formats) if math.isfinite(d)),
                                               default=0.0))
    for n in rows[:max_rows] if max_rows else rows:
        c = t.cost(n)
        cells = []
        for f in t.formats:
            d = t.drop(n, f)
            cell = t.cell(n, f)
            text = _fmt_drop(d) if cell is not None else "-"  # not measured (e.g. the backend only emulates it)
            if cell and cell.execution == "emulated":
                text += "e"
            if t.source == "proxy" and t.proxy and n not in t.proxy.layers:
                text += "~"  # predicted from the proxy, not measured
            if math.isfinite(d) and worst > 0 and d >= 0.5 * worst:
                text = f"[bold red]{text}[/bold red]"
            cells.append(text)
        row = [n[len(prefix):], c.onnx_op, f"{c.params:,}", f"{100 * c.size_share:.1f}", f"{100 * c.latency_share:.1f}", *cells]
        if t.proxy and t.proxy.scores:
            s = t.proxy.scores.get(n, {})
            row.append(f"{s.get('int4', float('nan')):.1e}/{s.get('int8', float('nan')):.1e}")
        table.add_row(*row)
    return table


def summary_lines(t: SensitivityTable) -> list[str]:
    lines = [f"columns: {t.metric} drop per format (e = the backend emulates it; - = not measured there: the "
             "table skips formats the backend only emulates; failed = the candidate failed"
             + ("; ~ = predicted from the proxy, not measured" if t.source == "proxy" else "")
             + "); size% = share of FP32 weight bits; "
             f"lat%* = {t.latency_source}", f"single-layer candidates: {t.plan_defaults}"]
    if t.grouping != "layer":
        groups = {c.group for c in t.cells if c.group}
        lines[-1] = (f"candidates: one per {t.grouping} group ({len(groups)} groups) x format, every layer of the "
                     f"group in the format at once, as the search decides it; each layer's drop is its even share "
                     f"of the group's (the group's drop is the column 'group_drop' in the CSV); {t.plan_defaults}")
    if t.proxy:
        rho = "n/a (fewer than 3 comparable cells)" if t.proxy.spearman is None else f"{t.proxy.spearman:+.2f}"
        lines.append(f"proxy vs artifact, Spearman rank correlation over {t.proxy.cells} cells "
                     f"({len(t.proxy.layers)} layers): {rho}   proxy: {t.proxy.proxy}")
    lines.append(("read from the cache " if t.from_cache else f"measured in {t.seconds:.1f} s, cached ")
                 + f"(key {t.cache_key})")
    return lines


def write_csv(t: SensitivityTable, path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "onnx_op", "params", "size_share", "latency_share_estimate", "format", "accuracy",
                    "drop", "execution", "error", "proxy_score", "source", "eval", "group", "group_drop"])
        for c in t.cells:
            cost = t.cost(c.layer)
            score = (t.proxy.scores.get(c.layer, {}).get(c.format.value) if t.proxy else None)
            w.writerow([c.layer, cost.onnx_op, cost.params, f"{cost.size_share:.6f}", f"{cost.latency_share:.6f}",
                        c.format.value, c.accuracy, c.drop, c.execution, c.error, score, t.source, t.eval_label,
                        c.group or "", "" if c.group_drop is None else c.group_drop])
    return path


def heatmap(t: SensitivityTable, path: str | Path) -> Path:
    """Layers (rows, model order) x formats (columns), colour = drop in metric units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, fmts = t.layers, t.formats
    data = np.array([[t.drop(n, f) for f in fmts] for n in layers], dtype=float)
    shown = np.where(np.isfinite(data), data, np.nan)
    height = max(3.0, 0.28 * len(layers) + 1.8)
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * len(fmts) + 0.06 * max(map(len, layers)), height))
    vmax = np.nanmax(np.abs(shown)) if np.isfinite(shown).any() else 1.0
    im = ax.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-vmax or -1, vmax=vmax or 1)
    ax.set_xticks(range(len(fmts)), [f.value for f in fmts])
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 20 else 9)
    for i in range(len(layers)):
        for j in range(len(fmts)):
            v = data[i, j]
            strong = np.isfinite(v) and abs(v) > 0.6 * vmax
            ax.text(j, i, "x" if not np.isfinite(v) else f"{v:+.3f}", ha="center", va="center",
                    color="white" if strong else "black", fontsize=6 if len(layers) > 20 else 8)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"{t.metric} drop (metric units, > 0 worse)")
    ax.set_title(f"{t.model}: single-layer {t.metric} drop on {t.backend}\n{t.eval_label}", fontsize=9)
    ax.set_xlabel("format (only this layer quantized; x = could not be built)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
