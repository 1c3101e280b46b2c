"""FP32 vs uniform BF16/FP8/INT8/INT4 on the bundled digits MLP and CNN, one run, one table.

Every row is measured in this run on the exported artifact through the same
backend, so the ratios are side by side: latency ratio = candidate p50 / FP32
p50 (lower is faster), size ratio = FP32 bytes / candidate bytes (higher is
smaller). Run: ``make bench`` or ``.venv/bin/python benchmarks/formats.py``.
"runs as" is per layer what ORT ran (kernels read from its optimized graph, see
``pipeline.backends.ort_kernels.observe_kernels``), counted over the quantized layers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def runs_as_label(layers) -> str:
    """How the quantized layers ran, e.g. ``native (1 QGemm), emulated (3 FusedGemm)``: native/emulated
    per layer with the kernel ORT was observed to run (``LayerReport.kernel``), FP32 layers left out."""
    from collections import Counter

    from pipeline.formats import Format

    quantized = [l for l in layers if l.format is not Format.FP32]
    if not quantized:
        return "native"
    parts = []
    for execution in ("native", "emulated"):
        kernels = Counter((l.kernel or "").split("(")[0] for l in quantized if l.execution == execution)
        if kernels:
            inner = ", ".join(f"{n} {k}" if k else f"{n} not observed" for k, n in sorted(kernels.items()))
            parts.append(f"{execution} ({inner})")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipeline.config import load_config
    from pipeline.evaluate import Evaluator
    from pipeline.formats import Format
    from pipeline.plan import QuantPlan

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["digits_mlp.yaml", "digits_cnn.yaml"])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--markdown", action="store_true", help="print a markdown table (for the README)")
    args = ap.parse_args(argv)

    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            cfg = load_config(ROOT / "search_spaces" / preset, overrides={
                "workdir": tmp, "measure.runs": args.runs, "measure.warmup": 20,
                "measure.batch_size": args.batch_size, "measure.energy.min_seconds": 0.5})
            ev = Evaluator(cfg)
            base = None
            for fmt in Format:
                plan = QuantPlan.uniform(fmt)
                if fmt is Format.INT8:
                    plans = [("int8 static", plan), ("int8 dynamic", QuantPlan.uniform(fmt, int8_activations="dynamic"))]
                else:
                    plans = [(fmt.value, plan)]
                for label, p in plans:
                    r = ev.evaluate(p, Path(tmp) / cfg.name / label.replace(" ", "-"))
                    m = r.measurement
                    if base is None:
                        base = m
                    runs_as = runs_as_label(r.layers)
                    e = m.energy
                    rows.append([
                        cfg.name, label, f"{m.accuracy:.4f}", f"{m.accuracy - base.accuracy:+.4f}",
                        f"{m.latency_ms_p50:.3f}", f"{m.latency_ms_p50 / base.latency_ms_p50:.2f}x",
                        f"{m.size_bytes:,}", f"{base.size_bytes / m.size_bytes:.2f}x",
                        f"{m.effective_bits_per_weight:.2f}",
                        f"{e.joules_per_inference * 1e6:.1f} ({e.source})" if e else "n/a",
                        runs_as,
                    ])
                    console.print(f"  measured {cfg.name} {label}", style="dim")
            backend = f"{m.backend} on {m.device}, batch {m.batch_size}, {args.runs} timed runs"
    headers = ["model", "format", "accuracy", "Δ vs fp32", "p50 ms", "latency ratio", "size B", "size ratio",
               "bits/weight", "µJ/inference", "runs as"]
    if args.markdown:
        print(f"\nBackend: {backend}\n")
        print("| " + " | ".join(headers) + " |")
        print("|" + "---|" * len(headers))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        t = Table(title=f"uniform formats vs FP32 — {backend}")
        for h in headers:
            t.add_column(h)
        for r in rows:
            t.add_row(*r)
        console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
