"""The product's candidates against what users already run, in one interleaved table per model.

Rows (each an artifact scored through its runtime on the model's eval set, then timed):

* FP32 - the export as is, and the product's FP32 reference (the graph candidates start from,
  ``export.optimize``; its accuracy is the one drops are measured against);
* ORT ``quantize_dynamic`` - per-channel INT8 weights, ORT's defaults otherwise (the one-liner);
* ORT ``quantize_static`` - QDQ, MinMax on the product's calibration batches, ORT's defaults;
* Optimum-style - ORT's transformer optimizer (``optimize_model``; ORT-only level-1 for CNNs)
  then ``quantize_dynamic`` per-channel (Hugging Face Optimum's fuse-then-quantize recipe);
* torch.ao dynamic INT8 - ``torch.ao.quantization.quantize_dynamic`` on the Linears, timed in
  PyTorch eager (another runtime: labelled so); for models with Linears only;
* the product's uniform baselines (fp32, int8 static, int8 dynamic, int4) built by
  ``Evaluator.evaluate`` exactly as a search builds them.

Timing: every session is opened first, then single runs are interleaved (A, B, C, ..., A, B, C,
...) for ``--rounds`` rounds, so load on a shared machine hits every row alike; the table gives
the median, the p25-p75 spread, and ratios of medians vs the FP32 export and vs
``quantize_dynamic`` (latency ratio < 1 = faster). Only the ratios mean anything on a shared box.

Models: ``minilm`` (all-MiniLM-L6-v2 on STS-B dev, Spearman x100; needs the examples extra and
the STS-B folder, ``--stsb``) and ``cnn`` (a 3x Conv+BatchNorm CNN defined here, trained for a
few seconds on scikit-learn's digits, accuracy %). ``--quick``: few eval rows and rounds, for the
smoke test (tests/benchmarks). Run: ``python benchmarks/vs_peers.py [--models minilm cnn]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_STSB = ROOT / ".." / "shared" / "data" / "stsb"


# ----------------------------------------------------------------------------- the Conv+BN CNN


def convbn_cnn(checkpoint: str | None = None):
    """3x (Conv + BatchNorm + ReLU), depthwise in the middle, then a Linear: digits 8x8, ~10 s of training."""
    import torch
    import torch.nn as nn

    from pipeline.examples import digits

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 32, 3, padding=1), bn1=nn.BatchNorm2d(32), act1=nn.ReLU(),
        conv2=nn.Conv2d(32, 32, 3, padding=1, groups=32), bn2=nn.BatchNorm2d(32), act2=nn.ReLU(),
        conv3=nn.Conv2d(32, 64, 1), bn3=nn.BatchNorm2d(64), act3=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(64, 10),
    ))
    path = Path(checkpoint) if checkpoint else digits.CACHE_DIR / "vs_peers_convbn.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    digits._train(model, image=True, epochs=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


CNN_YAML = """
name: vs-peers-cnn
model: {framework: torch, factory: "benchmarks.vs_peers:convbn_cnn"}
data:
  calibration: {source: "pipeline.examples.digits:cnn_calibration"}
  eval: {source: "pipeline.examples.digits:cnn_eval"}
metric: {name: accuracy}
measure: {batch_size: 64, warmup: 1, runs: 3}
search: {formats: [fp32, int8, int4], int8_activations: [static, dynamic]}
"""


# ----------------------------------------------------------------------------- variants


@dataclass
class Row:
    label: str
    runtime: str  # "ORT CPU" or "PyTorch eager (another runtime)"
    accuracy: float
    size_bytes: int
    run: Callable[[], object]  # one timed batch
    times: list[float]


def _ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def peer_artifacts(raw_onnx: str, feeds: list[dict], transformer: bool, out: Path) -> dict[str, str]:
    """What users run today, with the tools' own defaults (per-channel where the tool offers it)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    arts = {}
    p = out / "ort_quantize_dynamic.onnx"
    quantize_dynamic(raw_onnx, str(p), per_channel=True, weight_type=QuantType.QInt8)
    arts["ORT quantize_dynamic (per-channel INT8)"] = str(p)
    p = out / "ort_quantize_static.onnx"
    quantize_static(raw_onnx, str(p), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True)
    arts["ORT quantize_static (QDQ INT8, MinMax)"] = str(p)
    from onnxruntime.transformers.optimizer import optimize_model

    fused = out / "optimum_fused.onnx"
    m = optimize_model(raw_onnx, model_type="bert", opt_level=0 if transformer else 1,
                       only_onnxruntime=not transformer)
    m.save_model_to_file(str(fused))
    p = out / "optimum_fused_dynamic.onnx"
    quantize_dynamic(str(fused), str(p), per_channel=True, weight_type=QuantType.QInt8)
    arts["Optimum-style: optimize_model + quantize_dynamic"] = str(p)
    return arts


def product_plans() -> dict[str, "QuantPlan"]:  # noqa: F821
    from pipeline.plan import QuantPlan

    return {
        "product uniform fp32": QuantPlan(layers={"*": "fp32"}),
        "product uniform int8 static": QuantPlan(layers={"*": "int8"}, int8_activations="static"),
        "product uniform int8 dynamic": QuantPlan(layers={"*": "int8"}, int8_activations="dynamic"),
        "product uniform int4 (block 32)": QuantPlan(layers={"*": "int4"}, int4_block_size=32),
    }


def torch_ao_row(ev, threads: int) -> Row | None:
    """torch.ao dynamic INT8 on the Linears, scored and timed in PyTorch eager."""
    import torch

    model = ev.adapter.load_model()
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        return None
    torch.set_num_threads(threads)
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8).eval()
    names = ev.reference.input_names
    bs = ev.config.measure.batch_size

    def call(feeds):
        with torch.no_grad():
            out = q(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
        return out if isinstance(out, (tuple, list)) else (out,)

    chunks: list[list[np.ndarray]] = []
    for feeds in ev.eval_set.batches(ev.config.measure.eval_batch):
        outs = call(feeds)
        if not chunks:
            chunks = [[] for _ in outs]
        for c, o in zip(chunks, outs):
            c.append(o.numpy())
    from pipeline.measure import task_metric

    outputs = {n: np.concatenate(c) for n, c in zip(ev.reference.output_names, chunks)}
    acc = task_metric(ev.config, outputs, ev.eval_set.targets)
    fixed = ev.eval_set.fixed_batch(bs)
    buf = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    torch.save(q.state_dict(), buf.name)
    size = os.path.getsize(buf.name)
    os.unlink(buf.name)
    return Row("torch.ao quantize_dynamic INT8 (Linear)", "PyTorch eager (another runtime)", acc, size,
               lambda: call(fixed), [])


# ----------------------------------------------------------------------------- one model


def bench_model(config_path: str, overrides: dict, *, transformer: bool, rounds: int, threads: int,
                work: Path, log=print) -> tuple[str, list[Row]]:
    from pipeline.config import load_config
    from pipeline.evaluate import Evaluator
    from pipeline.measure import run_dataset, task_metric

    cfg = load_config(config_path, overrides={**overrides, "workdir": str(work), "measure.threads": threads})
    ev = Evaluator(cfg)
    raw = ev.adapter.export_reference(ev.workdir)
    bs = cfg.measure.batch_size
    fixed = ev.eval_set.fixed_batch(bs)
    out = work / cfg.name / "vs_peers"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []

    def onnx_row(label: str, path: str) -> Row:
        s = _ort_session(path, threads)
        names = {i.name for i in s.get_inputs()}
        feeds = {k: v for k, v in fixed.items() if k in names}
        outs = run_dataset(ev.backend.open(path, threads), ev.eval_set, cfg.measure.eval_batch)
        return Row(label, "ORT CPU", task_metric(cfg, outs, ev.eval_set.targets), os.path.getsize(path),
                   lambda: s.run(None, feeds), [])

    log(f"[{cfg.name}] FP32 and peers ...")
    rows.append(onnx_row("FP32 export", raw.onnx_path))
    rows.append(onnx_row(f"FP32 product reference (export.optimize={cfg.export.optimize})", ev.reference.onnx_path))
    for label, path in peer_artifacts(raw.onnx_path, ev.calibration_feeds(), transformer, out).items():
        rows.append(onnx_row(label, path))
    ao = torch_ao_row(ev, threads)
    if ao is not None:
        rows.append(ao)
    for label, plan in product_plans().items():
        log(f"[{cfg.name}] {label} ...")
        r = ev.evaluate(plan, out / label.replace(" ", "_").replace("(", "").replace(")", ""), energy=False)
        rows.append(onnx_row(label, r.artifact_path))

    log(f"[{cfg.name}] timing {len(rows)} variants, {rounds} interleaved rounds ...")
    for r in rows:  # warm-up
        r.run()
        r.run()
    from pipeline.measure import settle

    for _ in range(rounds):
        for r in rows:
            settle()  # the previous variant's ORT threads stop spinning first (pipeline.measure.SETTLE_S)
            t = time.perf_counter()
            r.run()
            r.times.append(1e3 * (time.perf_counter() - t))
    title = (f"{cfg.name}: timing batch {bs}, eval batch {cfg.measure.eval_batch}, {threads} threads, {rounds} "
             f"interleaved rounds, eval rows {len(ev.eval_set)}, metric {cfg.metric.name}")
    return title, rows


def markdown(title: str, rows: list[Row], scale: float, metric: str) -> str:
    med = {r.label: float(np.median(r.times)) for r in rows}
    fp32 = med[rows[0].label]
    peer = next((med[k] for k in med if k.startswith("ORT quantize_dynamic")), None)
    lines = [f"**{title}**", "",
             f"| variant | runtime | {metric} | ms median [p25-p75] | vs FP32 export | vs quantize_dynamic | MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p25, p75 = np.percentile(r.times, [25, 75])
        vs_peer = f"{peer / med[r.label]:.2f}x speed" if peer else "-"
        lines.append(f"| {r.label} | {r.runtime} | {scale * r.accuracy:.2f} | {med[r.label]:.1f} [{p25:.1f}-{p75:.1f}] "
                     f"| {med[r.label] / fp32:.2f}x latency | {vs_peer} | {r.size_bytes / 1e6:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm", "cnn"], choices=["minilm", "cnn"])
    ap.add_argument("--quick", action="store_true", help="few eval rows and rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 40, quick 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stsb", default=str(DEFAULT_STSB), help="folder holding sts-train.csv and sts-dev.csv")
    ap.add_argument("--workdir", default=None, help="keep artifacts here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 40)

    parts = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, load average at start "
             f"{os.getloadavg()[0]:.1f}); onnxruntime {_version('onnxruntime')}, torch {_version('torch')}. "
             "Latency ratio < 1 = faster than FP32; 'vs quantize_dynamic' > 1 = faster than the peer."]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for name in args.models:
            if name == "minilm":
                stsb = str(Path(args.stsb).resolve())
                few = {"n": 64} if args.quick else {}  # pairs: eval sentences and gold scores alike
                ov = {"data.calibration.kwargs": {"n": 32 if args.quick else 256, "data_dir": stsb},
                      "data.eval.kwargs": {"data_dir": stsb, **few}, "data.targets.kwargs": {"data_dir": stsb, **few}}
                title, rows = bench_model(str(ROOT / "search_spaces" / "minilm_stsb.yaml"), ov, transformer=True,
                                          rounds=rounds, threads=args.threads, work=work)
                parts.append(markdown(title, rows, 100.0, "Spearman x100"))
            else:
                cfg = work / "vs_peers_cnn.yaml"
                cfg.parent.mkdir(parents=True, exist_ok=True)
                cfg.write_text(CNN_YAML)
                title, rows = bench_model(str(cfg), {}, transformer=False, rounds=rounds, threads=args.threads,
                                          work=work)
                parts.append(markdown(title, rows, 100.0, "accuracy %"))
            print(parts[-1], flush=True)
    parts.append(f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    text = "\n\n".join(parts) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
