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
        print(json.dumps(ref.layer_table.model_dump(mode="json")["layers"], indent=2))
        return 0
    table = Table(title=f"{cfg.name}: {len(ref.layer_table)} quantizable layers  (reference: {ref.onnx_path})")
    for col in ("layer", "kind", "module", "onnx op", "onnx node", "weight", "shape", "params"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for l in ref.layer_table:
        table.add_row(l.name, l.kind, l.module_type, l.onnx_op, l.onnx_node, l.weight,
                      "x".join(map(str, l.weight_shape)), f"{l.params:,}")
    console.print(table)
    if ref.layer_table.skipped:
        console.print(f"[yellow]not quantizable (weight unused or constant-folded in the export):[/yellow] {ref.layer_table.skipped}")
    console.print(f"inputs: {ref.input_names}  outputs: {ref.output_names}  total params: {ref.layer_table.total_params():,}")
    return 0
