#!/usr/bin/env python
"""GPU check (`make gpu-check`): what this machine's GPU backends and energy meter really do.

(a) The bundled digits MLP (search_spaces/digits_mlp.yaml), one uniform plan per format
    (fp32, bf16, fp8, int8, int4) through the project's own quantizer, measured on every
    GPU backend that is available here (tensorrt, ort-trt, ort-cuda) with NVML energy:
    backend, format, accuracy, latency, J/inference, and native/emulated per layer.
(b) A GEMM energy microbenchmark through PyTorch on the GPU: the same N x N x N matrix
    product in fp32, tf32, bf16, fp8 (torch._scaled_mm) and int8 (torch._int_mm) where the
    GPU supports them: TFLOP/s (CUDA events), average watts and joules per TFLOP, with the
    same NVML meter.

Runs in well under 5 minutes (a time budget skips what would not fit, and says so). Works
with only PyTorch, ONNX Runtime (the CPU build is fine) and nvidia-ml-py installed: it does
what it can, and ends with what it skipped and why. It never prints an energy number that
was not metered: without NVML the energy columns say why they are empty.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_BACKENDS = ("tensorrt", "ort-trt", "ort-cuda")
FORMATS = ("fp32", "bf16", "fp8", "int8", "int4")


@dataclass
class Check:
    started: float = field(default_factory=time.perf_counter)
    budget_s: float = 270.0
    reserve_s: float = 0.0  # kept back for a later part (the GEMM part while the digits part runs)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rows_a: list[dict] = field(default_factory=list)
    rows_b: list[dict] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self, what: str, need_s: float) -> bool:
        if self.elapsed() + need_s > self.budget_s - self.reserve_s:
            kept = f", {self.reserve_s:.0f}s kept for the GEMM part" if self.reserve_s else ""
            self.skip(what, f"time budget: {self.elapsed():.0f}s of {self.budget_s:.0f}s used{kept}")
            return True
        return False

    def skip(self, what: str, why: str) -> None:
        self.skipped.append((what, why))
        print(f"  skipped {what}: {why}", flush=True)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    if not rows:
        return "  (no rows)"
    widths = [max(len(title), *(len(str(r.get(key, ""))) for r in rows)) for key, title in cols]
    line = "  " + "  ".join(t.ljust(w) for (_, t), w in zip(cols, widths))
    sep = "  " + "  ".join("-" * w for w in widths)
    body = ["  " + "  ".join(str(r.get(k, "")).ljust(w) for (k, _), w in zip(cols, widths)) for r in rows]
    return "\n".join([line, sep, *body])


# --------------------------------------------------------------------------------------
def environment(check: Check) -> tuple[bool, str]:
    """Print versions and the NVML status; returns (nvml works, its description or reason)."""
    from pipeline.backends.gpu import gpu_info, gpu_status
    from pipeline.energy import nvml_status

    env: dict = {"python": sys.version.split()[0]}
    try:
        import torch

        env["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}, available={torch.cuda.is_available()})"
    except ImportError:
        env["torch"] = "not installed"
    try:
        import onnxruntime as ort

        env["onnxruntime"] = f"{ort.__version__} providers={ort.get_available_providers()}"
    except ImportError:
        env["onnxruntime"] = "not installed"
    try:
        from importlib.metadata import version

        env["tensorrt"] = version("tensorrt")
    except Exception:  # noqa: BLE001
        env["tensorrt"] = "not installed"
    ok, why = gpu_status(0)
    info = gpu_info(0)
    env["gpu"] = f"{info.name} (sm {info.sm[0]}.{info.sm[1]})" if info else f"none ({why})"
    nvml_ok, nvml_desc = nvml_status(0)
    env["energy meter"] = nvml_desc if nvml_ok else f"NVML unavailable: {nvml_desc}"
    check.environment = env
    print("Environment")
    for k, v in env.items():
        print(f"  {k:13s} {v}")
    return nvml_ok, nvml_desc


# --------------------------------------------------------------------------------------
def _execution_summary(layers) -> str:
    kinds = [l.execution for l in layers]
    if kinds and all(k == "native" for k in kinds):
        return "native"
    if kinds and all(k == "emulated" for k in kinds):
        return "emulated"
    return f"mixed ({sum(k == 'native' for k in kinds)}/{len(kinds)} native)"


def part_a(check: Check, nvml_ok: bool, nvml_why: str, args) -> None:
    print("\n(a) digits MLP on each available GPU backend")
    from pipeline.backends import available_backends

    status = available_backends()
    backends = []
    for name in args.backends:
        ok, why = status.get(name, (False, "unknown backend"))
        if ok:
            backends.append(name)
        else:
            check.skip(f"(a) {name}", why)
    if not backends:
        return
    try:
        from pipeline.config import load_config
        from pipeline.evaluate import Evaluator
        from pipeline.plan import QuantPlan
    except Exception as exc:  # noqa: BLE001
        check.skip("(a) all backends", f"the measurement pipeline failed to import: {exc}")
        return

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for name in backends:
        is_gpu = name in GPU_BACKENDS
        energy = nvml_ok or not is_gpu  # GPU rows: NVML or nothing; never a CPU-side number under a GPU name
        overrides = {
            "workdir": str(work / name),
            "measure.backend": name,
            "measure.warmup": 5,
            "measure.runs": 30,
            "measure.energy.meter": "nvml" if is_gpu else "auto",
            "measure.energy.min_seconds": args.min_seconds,
            "measure.energy.repeats": args.repeats,
        }
        try:
            cfg = load_config(ROOT / "search_spaces" / "digits_mlp.yaml", overrides=overrides)
            evaluator = Evaluator(cfg)
        except Exception as exc:  # noqa: BLE001
            check.skip(f"(a) {name}", f"setup failed: {type(exc).__name__}: {exc}")
            continue
        for fmt in args.formats:
            what = f"(a) {name} {fmt}"
            need = (args.min_seconds * args.repeats + 2) + (20 if name != "ort-cuda" else 3)
            if check.out_of_time(what, need):
                continue
            t0 = time.perf_counter()
            try:
                result = evaluator.evaluate(QuantPlan.uniform(fmt), work / name / fmt, energy=energy)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next cell
                msg = f"{type(exc).__name__}: {exc}".splitlines()
                check.skip(what, " | ".join(msg[:4]))
                if args.verbose:
                    traceback.print_exc()
                continue
            m = result.measurement
            e = m.energy
            row = {
                "backend": name,
                "format": fmt,
                "accuracy": f"{m.accuracy:.4f}",
                "drop": f"{m.accuracy_drop:+.4f}" if m.accuracy_drop is not None else "",
                "latency_ms": f"{m.latency_ms_p50:.3f}",
                "J/inference": f"{e.joules_per_inference:.3e} ({e.source})" if e else "n/a",
                "avg_W": f"{e.average_power_w:.1f}" if e else "",
                "idle_W": f"{e.idle_power_w:.1f}" if e and e.idle_power_w is not None else "",
                "execution": _execution_summary(result.layers),
                "seconds": f"{time.perf_counter() - t0:.1f}",
            }
            if not e:
                row["J/inference"] = f"n/a (NVML unavailable: {nvml_why.split(':')[0]})"
            check.rows_a.append(row)
            print(f"  {name:9s} {fmt:5s} acc {row['accuracy']}  {row['latency_ms']} ms  {row['J/inference']}  "
                  f"{row['execution']}", flush=True)
    print()
    print(_table(check.rows_a, [("backend", "backend"), ("format", "format"), ("accuracy", "accuracy"),
                                ("drop", "vs fp32"), ("latency_ms", "latency ms (p50, batch 64)"),
                                ("J/inference", "J/inference (meter)"), ("avg_W", "avg W"), ("idle_W", "idle W"),
                                ("execution", "native/emulated")]))


# --------------------------------------------------------------------------------------
def tf32_switch(torch):
    """(set_tf32(enabled), restore()) for cuBLAS fp32 matmuls.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" | "tf32" | "none");
    the legacy ``allow_tf32`` flag still works, but torch refuses to *read* it once the new API
    has set "tf32" ("you have used mix of the legacy and new APIs to set the TF32 status for cublas
    matmul. We suggest only using the new API", torch 2.13). So the new API is used whenever it
    exists, and the state found is put back afterwards.
    """
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision

        def set_tf32(enabled: bool) -> None:
            m.fp32_precision = "tf32" if enabled else "ieee"

        def restore() -> None:
            m.fp32_precision = old
    else:  # torch < 2.9
        old = m.allow_tf32

        def set_tf32(enabled: bool) -> None:
            m.allow_tf32 = bool(enabled)

        def restore() -> None:
            m.allow_tf32 = old
    return set_tf32, restore


def part_b(check: Check, nvml_ok: bool, nvml_why: str, args) -> None:
    print(f"\n(b) GEMM energy microbenchmark (PyTorch, {args.gemm_n}^3, one GEMM = one 'inference')")
    try:
        import torch
    except ImportError:
        check.skip("(b) GEMM benchmark", "torch is not installed")
        return
    if not torch.cuda.is_available():
        check.skip("(b) GEMM benchmark", f"torch {torch.__version__} sees no CUDA GPU (CPU build, or no GPU here)")
        return
    from pipeline.config import EnergySpec
    from pipeline.energy import NvmlMeter, measure_energy

    dev = torch.device("cuda", 0)
    sm = torch.cuda.get_device_capability(dev)
    n = args.gemm_n
    flop = 2.0 * n * n * n
    meter = NvmlMeter(0) if nvml_ok else None
    spec = EnergySpec(meter="nvml", min_seconds=args.min_seconds, repeats=args.repeats)
    set_tf32, restore_tf32 = tf32_switch(torch)
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(dtype=torch.float32):
        return torch.randn(n, n, device=dev, generator=gen, dtype=torch.float32).to(dtype)

    def make(fmt):
        if fmt in ("fp32", "tf32"):
            a, b = rand(), rand()
            return lambda: a @ b
        if fmt == "bf16":
            a, b = rand(torch.bfloat16), rand(torch.bfloat16)
            return lambda: a @ b
        if fmt == "fp8":
            # torch 2.13: aten::_scaled_mm(Tensor self, Tensor mat2, Tensor scale_a, Tensor scale_b,
            # Tensor? bias=None, Tensor? scale_result=None, ScalarType? out_dtype=None,
            # bool use_fast_accum=False) -> Tensor. cuBLASLt wants `self` row-major and `mat2`
            # column-major, both dims multiples of 16; per-tensor scaling takes float32 scalar
            # scales on the device. FP8 tensor cores need sm >= 8.9 (checked by the caller).
            a = (rand() / 4).to(torch.float8_e4m3fn)
            b = (rand() / 4).to(torch.float8_e4m3fn).t().contiguous().t()  # column-major
            one = torch.ones((), device=dev, dtype=torch.float32)

            def fp8_mm():
                out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                return out[0] if isinstance(out, tuple) else out  # torch < 2.5 returned (out, amax)

            return fp8_mm
        if fmt == "int8":
            # aten::_int_mm(Tensor self, Tensor mat2) -> Tensor (int32). CUDA checks (Blas.cpp):
            # self.size(0) > 16, self.size(1) and mat2.size(1) multiples of 8, int8 inputs.
            a = torch.randint(-64, 64, (n, n), device=dev, generator=gen, dtype=torch.int8)
            b = torch.randint(-64, 64, (n, n), device=dev, generator=gen, dtype=torch.int8).t().contiguous().t()
            return lambda: torch._int_mm(a, b)
        raise ValueError(fmt)

    # TF32 and BF16 tensor cores arrive with Ampere (sm 8.0), FP8 with Ada/Hopper (sm 8.9);
    # int8 is simply tried (cuBLASLt decides) and any failure is reported.
    needs = {"fp32": (0, 0), "tf32": (8, 0), "bf16": (8, 0), "fp8": (8, 9), "int8": (0, 0)}
    apis = {"fp8": hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn"), "int8": hasattr(torch, "_int_mm")}
    try:
        for fmt in ("fp32", "tf32", "bf16", "fp8", "int8"):
            what = f"(b) GEMM {fmt}"
            if sm < needs[fmt]:
                check.skip(what, f"needs sm >= {needs[fmt][0]}.{needs[fmt][1]}, this GPU is sm {sm[0]}.{sm[1]}")
                continue
            if not apis.get(fmt, True):
                check.skip(what, f"this torch ({torch.__version__}) has no API for it")
                continue
            if check.out_of_time(what, args.min_seconds * args.repeats + 3):
                continue
            set_tf32(fmt == "tf32")  # fp32 means IEEE fp32: TF32 only in the tf32 row
            try:
                op = make(fmt)
                out = op()
                torch.cuda.synchronize(dev)
                if not bool(torch.isfinite(out.float()).all()):
                    raise RuntimeError("non-finite output")
                for _ in range(3):
                    op()
                torch.cuda.synchronize(dev)
                runs = 20
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
                for s, e in zip(starts, ends):
                    s.record()
                    op()
                    e.record()
                torch.cuda.synchronize(dev)
                ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[runs // 2]
            except Exception as exc:  # noqa: BLE001
                check.skip(what, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            row = {"format": fmt, "ms/GEMM": f"{ms:.3f}", "TFLOP/s": f"{flop / (ms / 1e3) / 1e12:.1f}"}
            if meter is not None:
                try:
                    r = measure_energy(meter, op, 1, spec, sync=lambda: torch.cuda.synchronize(dev))
                    row.update({"avg_W": f"{r.average_power_w:.0f}", "J/TFLOP": f"{r.joules_per_inference / (flop / 1e12):.3f}",
                                "idle_W": f"{r.idle_power_w:.0f}" if r.idle_power_w is not None else ""})
                except Exception as exc:  # noqa: BLE001
                    row.update({"avg_W": "n/a", "J/TFLOP": f"n/a ({type(exc).__name__}: {exc})"})
            else:
                row.update({"avg_W": "n/a", "J/TFLOP": f"n/a (NVML unavailable: {nvml_why.split(':')[0]})"})
            check.rows_b.append(row)
            print(f"  {fmt:5s} {row['TFLOP/s']:>8s} TFLOP/s  {row['avg_W']:>5s} W  {row['J/TFLOP']} J/TFLOP", flush=True)
            del op
            torch.cuda.empty_cache()
    finally:
        restore_tf32()
        if meter is not None:
            meter.close()
    print()
    print(_table(check.rows_b, [("format", "format"), ("ms/GEMM", "ms/GEMM (median)"), ("TFLOP/s", "TFLOP/s"),
                                ("avg_W", "avg W"), ("idle_W", "idle W"), ("J/TFLOP", "J/TFLOP")]))
    if meter is not None:
        print("  energy: NVML total-energy counter, windows of continuous GEMMs, median of repeats; "
              "idle power reported, not subtracted")


# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=270.0, help="seconds; parts that would not fit are skipped")
    p.add_argument("--min-seconds", type=float, default=1.0, help="length of each energy window")
    p.add_argument("--repeats", type=int, default=3, help="energy windows per measurement (median)")
    p.add_argument("--gemm-n", type=int, default=8192, help="GEMM size N (N x N x N)")
    p.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS),
                   help="backends for part (a); ort-cpu is accepted as a reference")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--skip-a", action="store_true", help="skip the digits part")
    p.add_argument("--skip-b", action="store_true", help="skip the GEMM part")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.gemm_n <= 16 or args.gemm_n % 16:
        p.error(f"--gemm-n must be a multiple of 16 above 16 (fp8 _scaled_mm needs multiples of 16, "
                f"_int_mm needs M > 16 and multiples of 8); got {args.gemm_n}")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.verbose:  # per-trial INFO lines (meter chosen, backend) would drown the table
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("pipeline", "onnxscript", "onnx_ir", "exporters"):
            logging.getLogger(name).setLevel(logging.WARNING)
    check = Check(budget_s=args.budget)
    nvml_ok, nvml_why = environment(check)
    if not args.skip_a:
        # The GEMM part needs about (window x repeats + idle + warm-up) per format; keep that back
        # so that a slow engine build in (a) cannot starve (b) out of the 5-minute budget.
        check.reserve_s = 0.0 if args.skip_b else 5 * (args.min_seconds * args.repeats + 4)
        part_a(check, nvml_ok, nvml_why, args)
        check.reserve_s = 0.0
    if not args.skip_b:
        part_b(check, nvml_ok, nvml_why, args)

    print(f"\nDone in {check.elapsed():.0f}s.")
    if check.skipped:
        print("Skipped:")
        for what, why in check.skipped:
            print(f"  - {what}: {why}")
    if args.json:
        args.json.write_text(json.dumps({"environment": check.environment, "digits": check.rows_a,
                                         "gemm": check.rows_b, "skipped": check.skipped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
