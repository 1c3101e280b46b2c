"""``precision-search layers``: the quantizable layers of the configured model."""

from __future__ import annotations

import json

from rich.table import Table

from pipeline.cli.common import add_config_arg, console, load


def register(sub) -> None:
    p = sub.add_parser("layers", help="list the quantizable layers (one row each)")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.models import get_adapter

    cfg = load(args)
    ref = get_adapter(cfg).export_reference(cfg.work_path)
    if args.json:
        dump = ref.layer_table.model_dump(mode="json")
        print(json.dumps({"layers": dump["layers"], "skipped": dump["skipped"], "unquantized": dump["unquantized"]},
                         indent=2))
        return 0
    table = Table(title=f"{cfg.name}: {len(ref.layer_table)} quantizable layers  (reference: {ref.onnx_path})")
    for col in ("layer", "kind", "module", "onnx op", "onnx node", "weight", "shape", "params"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for l in ref.layer_table:
        table.add_row(l.name, l.kind, l.module_type, l.onnx_op, l.onnx_node, l.weight,
                      "x".join(map(str, l.weight_shape)), f"{l.params:,}")
    console.print(table)
    lt = ref.layer_table
    if lt.skipped:
        console.print(f"[yellow]not quantizable (weight unused or constant-folded in the export):[/yellow] {lt.skipped}")
    if lt.unquantized:
        console.print(_unquantized_text(lt.unquantized), highlight=False, soft_wrap=True)
    quantizable, rest = lt.total_params(), lt.unquantized_params()
    share = f" ({100 * quantizable / (quantizable + rest):.1f}% of {quantizable + rest:,})" if rest else ""
    console.print(f"inputs: {ref.input_names}  outputs: {ref.output_names}  "
                  f"params in quantizable layers: {quantizable:,}{share}", highlight=False)
    return 0


def _unquantized_text(modules) -> str:
    """Modules that stay fp32, one line each when few, else grouped by type (a transformer has dozens of norms)."""
    lines = ["[yellow]not quantized (stay fp32):[/yellow]"]
    if len(modules) <= 8:
        lines += [f"  {m.name} ({m.module_type}, {m.params:,} params): {m.reason}" for m in modules]
        return "\n".join(lines)
    groups: dict[str, list] = {}
    for m in modules:
        groups.setdefault(m.module_type, []).append(m)
    for kind, ms in sorted(groups.items(), key=lambda kv: -sum(m.params for m in kv[1])):
        names = ", ".join(m.name for m in ms[:3]) + (", ..." if len(ms) > 3 else "")
        lines.append(f"  {len(ms)} x {kind} ({sum(m.params for m in ms):,} params; {names}): {ms[0].reason}")
    return "\n".join(lines)
