"""all-MiniLM-L6-v2 on STS-B: FP32 vs INT8 dynamic / INT8 static / INT4 / a hand-picked mixed plan.

One run, one table. Accuracy is Spearman x100 of each exported artifact through ONNX
Runtime on all 1,500 sts-dev pairs. Latency is timed AFTER every artifact is built, with
all sessions open and single runs interleaved (fp32, int8, ..., fp32, int8, ...), so
background load on a shared machine hits every row alike (bursts of one plan's runs do not:
on a loaded 2-core box they moved the ratios by 2x); the ratio is candidate p50 /
FP32 p50 (lower is faster). Size ratio = candidate bytes / FP32 bytes.

Needs the examples extra (``pip install -e '.[examples]'``) and ``../shared/data/stsb``.
Run: ``.venv/bin/python benchmarks/minilm_stsb.py`` (about 10 minutes on 2 cores);
``--plan extra.yaml`` adds rows, ``--eval-pairs N`` shortens the accuracy pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The mixed plan found by hand (sensitivity runs on all 1,500 dev pairs, ORT CPU): every
# Linear INT8 dynamic (ORT's integer MatMul kernels: the speed), the word-embedding table
# INT4 in blocks of 64 (half of the FP32 file, only gathered: weight-only, no compute cost;
# blocks of 128 lost 0.1 pt more), position/token-type tables INT8 (INT4 there cost 0.13 pt).
# Keeping any one group of Linears (q, k, v, attention out, FFN in/out, first/last block) in
# FP32 moved Spearman by <= 0.05 pt for up to +11 MB, so none is kept.
MIXED = {
    "int8_activations": "dynamic",
    "layers": {
        "encoder.embeddings.word_embeddings": {"format": "int4", "int4_block_size": 64},
        "*": "int8",
    },
}


def plans() -> dict[str, "QuantPlan"]:  # noqa: F821
    from pipeline.plan import QuantPlan

    return {
        "fp32": QuantPlan(layers={"*": "fp32"}),
        "int8 dynamic": QuantPlan(layers={"*": "int8"}, int8_activations="dynamic"),
        "int8 static (minmax)": QuantPlan(layers={"*": "int8"}, int8_activations="static"),
        "int4 (block 32)": QuantPlan(layers={"*": "int4"}, int4_block_size=32),
        "mixed: word-emb int4 + int8 dyn": QuantPlan.model_validate(MIXED),
    }


def interleaved_p50(sessions: dict[str, object], feeds: dict[str, np.ndarray], rounds: int, runs: int,
                    warmup: int) -> dict[str, float]:
    from pipeline.measure import settle, time_batches

    times: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    for name, s in sessions.items():
        time_batches(s, feeds, warmup, 1)
    for _ in range(rounds):
        for name, s in sessions.items():
            settle()  # the previous session's ORT threads stop spinning first
            times[name].append(time_batches(s, feeds, 0, runs))
    return {k: float(np.percentile(np.concatenate(v), 50)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipeline.config import load_config
    from pipeline.evaluate import Evaluator
    from pipeline.plan import QuantPlan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "search_spaces" / "minilm_stsb.yaml"))
    ap.add_argument("--plan", action="append", default=[], help="extra plan.yaml rows (repeatable)")
    ap.add_argument("--eval-pairs", type=int, default=None, help="first N sts-dev pairs (default: all 1,500)")
    ap.add_argument("--rounds", type=int, default=80, help="interleaved timing rounds")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per plan per round")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: the config's)")
    ap.add_argument("--workdir", default=None, help="keep artifacts here (default: a temporary folder)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table (for the README)")
    args = ap.parse_args(argv)

    overrides = {"measure.runs": 3, "measure.warmup": 1}
    if args.eval_pairs:
        overrides["data.eval.kwargs"] = {"n": args.eval_pairs}
    if args.threads is not None:
        overrides["measure.threads"] = args.threads
    console = Console(width=max(Console().width, 150))  # the table is wide; never wrap it
    todo = plans()
    for p in args.plan:
        todo[Path(p).stem] = QuantPlan.from_yaml(p)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        cfg = load_config(args.config, overrides={**overrides, "workdir": str(work)})
        ev = Evaluator(cfg)
        results = {}
        for label, plan in todo.items():
            console.print(f"[dim]building + scoring {label} ...[/dim]")
            results[label] = ev.evaluate(plan, work / cfg.name / "bench" / label.replace(" ", "_").replace(":", ""),
                                         energy=False)
        sessions = {k: ev.backend.open(r.artifact_path, cfg.measure.threads) for k, r in results.items()}
        feeds = ev.eval_set.fixed_batch(cfg.measure.batch_size)
        console.print(f"[dim]timing {len(sessions)} artifacts, {args.rounds} interleaved rounds x {args.runs} runs ...[/dim]")
        p50 = interleaved_p50(sessions, feeds, args.rounds, args.runs, warmup=5)

    base = results["fp32"].measurement
    m0 = next(iter(results.values())).measurement
    title = (f"all-MiniLM-L6-v2 on STS-B dev ({len(ev.eval_set)} pairs), batch {cfg.measure.batch_size} pairs x "
             f"seq 64 (= {2 * cfg.measure.batch_size} sentences per encoder call), {m0.backend} "
             f"{m0.runtime_version}, {m0.device}, {m0.threads} threads")
    cols = ["plan", "Spearman x100", "vs FP32 (pt)", "p50 ms", "latency / FP32", "size MB", "size / FP32",
            "bits/weight", "non-native layers"]
    rows = []
    for label, r in results.items():
        m = r.measurement
        emulated = sum(1 for l in r.layers if l.execution != "native")
        rows.append([label, f"{100 * m.accuracy:.2f}", f"{100 * (m.accuracy - base.accuracy):+.2f}",
                     f"{p50[label]:.1f}", f"{p50[label] / p50['fp32']:.2f}", f"{m.size_bytes / 1e6:.1f}",
                     f"{m.size_bytes / base.size_bytes:.2f}", f"{m.effective_bits_per_weight:.2f}", str(emulated)])
    if args.markdown:
        print(f"**{title}**\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="left" if c == "plan" else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    console.print(f"load average at the end: {load}; latency = median of {args.rounds * args.runs} interleaved runs per plan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
