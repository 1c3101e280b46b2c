"""``precision-search evaluate``: build one candidate from a plan and measure it."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from pipeline.cli.common import add_config_arg, console, load


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="quantize per a plan.yaml, export, and measure the artifact")
    add_config_arg(p)
    p.add_argument("--plan", required=True, help="plan YAML: method, calibration, layers: {glob: format}")
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/<name>/evaluate/<plan name>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-energy", action="store_true", help="skip the energy window (faster)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.evaluation import Evaluator
    from pipeline.measure import TrialFailure
    from pipeline.plan import QuantPlan

    cfg = load(args)
    plan = QuantPlan.from_yaml(args.plan)
    out = Path(args.out) if args.out else cfg.work_path / "evaluate" / Path(args.plan).stem
    ev = Evaluator(cfg)
    try:
        choices = plan.resolve(ev.reference.layer_table.names)  # once: the evaluator takes it as is
    except ValueError as exc:
        from pipeline.errors import ConfigError

        raise ConfigError(f"{args.plan}: {exc}") from None
    try:
        result = ev.evaluate(choices, out, energy=not args.no_energy)
    except TrialFailure as exc:
        console.print(f"[red]candidate failed:[/red] {exc}")
        return 1
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print_result(result)
    console.print(f"artifact: [bold]{result.artifact_path}[/bold]")
    return 0


def print_result(result) -> None:
    m = result.measurement
    t = Table(title=f"candidate: {result.plan_summary}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    drop = f" (drop {m.accuracy_drop:+.4f} vs FP32 {m.reference_accuracy:.4f})" if m.accuracy_drop is not None else ""
    t.add_row(m.metric, f"{m.accuracy:.4f}{drop}")
    t.add_row("latency p50 / p95", f"{m.latency_ms_p50:.3f} / {m.latency_ms_p95:.3f} ms  ({m.batch_note()})")
    t.add_row("throughput", f"{m.throughput_per_s:,.0f} samples/s")
    t.add_row("size", f"{m.size_bytes:,} bytes")
    t.add_row("effective bits/weight", f"{m.effective_bits_per_weight:.2f}")
    if m.energy:
        e = m.energy
        t.add_row("energy", f"{e.joules_per_inference * 1e3:.4f} mJ/inference, {e.average_power_w:.1f} W avg  [{e.source}: {e.meter}]")
        t.add_row("carbon", f"{e.gco2e_per_1m_inferences:.3f} gCO2e / 1M inferences @ {e.grid_intensity_g_per_kwh:g} g/kWh")
    t.add_row("backend / device", f"{m.backend} / {m.device}  ({m.runtime_version})")
    console.print(t)
    lt = Table(title="layers")
    for col in ("layer", "onnx op", "format", "runs as", "kernel", "params", "detail"):
        lt.add_column(col)
    for l in result.layers:
        color = "green" if l.execution == "native" else "yellow"
        lt.add_row(l.name, l.onnx_op, l.format.value, f"[{color}]{l.execution}[/{color}]",
                   l.kernel or "(table)", f"{l.params:,}", l.detail)
    console.print(lt)
