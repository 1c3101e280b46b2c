"""How much of PTQ's accuracy loss QAT recovers, at the same plan, on the ONNX artifact.

For each bundled digits model and plan (every layer int4, first and last included, at one
block size) this measures through the same backend, on the eval split:

* ``fp32``       the FP32 reference;
* ``ptq``        the plan applied by ``exporters.onnx_quant`` to the reference;
* ``qat``        ``method: qat`` with the same plan (fine-tune with fake quantization, export,
                 same quantizer), one row per seed;
* ``control``    the same fine-tune budget *without* fake quantization, then PTQ: separates
                 what the fake quantizers buy from what extra training on data.train buys.

``recovery = (qat - ptq) / (fp32 - ptq)``: 1.0 means QAT got back everything PTQ lost. It
is undefined when PTQ loses nothing, which is the honest outcome for the bundled 256-wide
MLP and the CNN at int4 (the eval split has 360 rows: one image is 0.28 points); the
32-wide MLP (``model.kwargs.hidden: 32``) is where int4 PTQ loses measurably.

Run: ``.venv/bin/python benchmarks/qat_recovery.py`` (about a minute on 2 cores);
``--quick`` runs only the 32-wide MLP at block 32 with one seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    # (label, preset, overrides)
    ("digits-mlp-32", "digits_mlp.yaml", {"model.kwargs": {"hidden": 32}}),
    ("digits-mlp-256", "digits_mlp.yaml", {}),
    ("digits-cnn", "digits_cnn.yaml", {}),
]


def evaluate_case(label: str, preset: str, overrides: dict, blocks: list[int], seeds: list[int], steps: int,
                  lr: float, workdir: Path) -> list[dict]:
    """Rows for one model: fp32 / ptq / qat per seed / control, per block size."""
    from exporters.onnx_quant import quantize_model
    from pipeline.config import load_config
    from pipeline.evaluate import Evaluator
    from pipeline.plan import QATSettings, QuantPlan
    from pipeline.qat import run_qat

    cfg = load_config(ROOT / "search_spaces" / preset, overrides={
        "workdir": str(workdir / label), "measure.runs": 3, "measure.warmup": 1, **overrides})
    ev = Evaluator(cfg)
    fp32 = ev.reference_accuracy
    rows = []
    for block in blocks:
        base = dict(int4_block_size=block, layers={"*": "int4"})
        out = workdir / label / f"b{block}"
        ptq = ev.evaluate(QuantPlan(**base), out / "ptq", energy=False).measurement.accuracy
        qat_runs = []
        for seed in seeds:
            plan = QuantPlan(method="qat", qat=QATSettings(steps=steps, learning_rate=lr, seed=seed), **base)
            t0 = time.perf_counter()
            r = ev.evaluate(plan, out / f"qat{seed}", energy=False, progress=False)
            qat_runs.append({"seed": seed, "accuracy": r.measurement.accuracy, "train_s": r.extra["qat_seconds"],
                             "total_s": time.perf_counter() - t0, "loss_first": r.qat_curve[0],
                             "loss_last": r.qat_curve[-1]})
        # control: the same fine-tune without fake quantization, then the same PTQ
        ctrl_plan = QuantPlan(method="qat", qat=QATSettings(steps=steps, learning_rate=lr, seed=seeds[0]),
                              layers={"*": "fp32"})
        outcome = run_qat(cfg, ev.adapter, ctrl_plan, ev.reference, out / "control", progress=False)
        tuned_fp32 = ev.measure(outcome.reference.onnx_path, energy=False).accuracy
        choices = QuantPlan(**base).resolve(outcome.reference.layer_table.names)
        q = quantize_model(outcome.reference.onnx_path, outcome.reference.layer_table, choices,
                           ev.calibration_feeds(), ctrl_plan.calibration, out / "control" / "candidate.onnx",
                           workdir=out / "control")
        control = ev.measure(q.path, energy=False).accuracy
        qat_mean = statistics.mean(r["accuracy"] for r in qat_runs)
        lost = fp32 - ptq
        rows.append({
            "model": label, "plan": f"all int4, block {block}", "fp32": fp32, "ptq": ptq,
            "qat_mean": qat_mean, "qat_min": min(r["accuracy"] for r in qat_runs), "qat_runs": qat_runs,
            "control_fp32_finetuned": tuned_fp32, "control_ptq": control,
            "ptq_drop": lost,
            "recovery": (qat_mean - ptq) / lost if lost > 0 else None,
            "recovery_worst_seed": (min(r["accuracy"] for r in qat_runs) - ptq) / lost if lost > 0 else None,
            "steps": steps, "learning_rate": lr, "eval_rows": len(ev.eval_set),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    ap.add_argument("--blocks", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--quick", action="store_true", help="digits-mlp-32, block 32, seed 0 only")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table (for the README)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.blocks, args.seeds = ["digits-mlp-32"], [32], [0]
    logging.disable(logging.INFO)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset, overrides in CASES:
            if label in args.models:
                rows += evaluate_case(label, preset, overrides, args.blocks, args.seeds, args.steps, args.lr, Path(tmp))

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    def rec(v):
        return "n/a (PTQ lost nothing)" if v is None else f"{100 * v:.0f}%"

    head = ["model", "plan", "fp32", "ptq", f"qat (mean of {len(args.seeds)})", "qat worst", "recovery",
            "control: fp32 tuned", "control: tuned+ptq", "qat train s"]
    body = [[r["model"], r["plan"], pct(r["fp32"]), pct(r["ptq"]), pct(r["qat_mean"]), pct(r["qat_min"]),
             rec(r["recovery"]), pct(r["control_fp32_finetuned"]), pct(r["control_ptq"]),
             f"{statistics.mean(q['train_s'] for q in r['qat_runs']):.2f}"] for r in rows]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for b in body:
            print("| " + " | ".join(b) + " |")
    else:
        t = Table(title=f"QAT recovery (accuracy %, eval split, ORT CPU artifact; {args.steps} steps, lr {args.lr:g})")
        for h in head:
            t.add_column(h)
        for b in body:
            t.add_row(*b)
        Console(width=max(Console().width, 170)).print(t)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
