"""TFLite on the CPU: runs ``.tflite`` artifacts built from Keras models by ``exporters.tflite``.

It cannot run ONNX: a trial on this backend builds its artifact from the Keras
model (``exporters.tflite.convert``), not through ``exporters.onnx_quant``, and
its FP32 reference is a float ``.tflite`` of the same model, so accuracy drops
compare like with like.

Interpreter: LiteRT's (``ai_edge_litert``) where installed, else TensorFlow's
``tf.lite.Interpreter`` (deprecated but present in TF 2.21). Both apply the
XNNPACK delegate by default, with ``num_threads`` = the configured threads.
Full-integer models take int8 inputs and give int8 outputs; the session
quantizes float feeds with the model's input scale/zero point (rounding half
away from zero, as TFLite's QUANTIZE kernel does) and dequantizes the outputs,
so callers always see float in, float out, as with an ONNX session.

Nothing heavy is imported at module import (the registry imports this module to read its declarations).
"""

from __future__ import annotations

import importlib.util
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from pipeline.backends.base import Backend, BackendUnavailable, BuildInputs, BuiltArtifact, Session
from pipeline.formats import Format, Int8Activations
from pipeline.results import LayerReport
from pipeline.backends.ort.cpu import cpu_model_name

INSTALL_HINT = "pip install -e '.[keras]'"


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def keras_tools():
    """The Keras side the TFLite converter needs (:class:`exporters.tflite.KerasTools`), from the
    Keras adapter: passed in, so ``exporters`` never imports the adapters. Imports no TensorFlow."""
    from exporters.tflite import KerasTools
    from pipeline.models import keras_adapter as ka

    return KerasTools(import_tf=ka.import_tf, quiet=ka._quiet_stderr, flatten_outputs=ka._flatten_outputs_tensors,
                      structure_inputs=ka.structure_inputs, enumerate_layers=ka.enumerate_layers)


class TFLiteSession(Session):
    def __init__(self, path: str | Path, threads: int = 0):
        from exporters.tflite import _interpreter

        self._interp = _interpreter(model_path=str(path), threads=threads or None, tools=keras_tools())
        sigs = self._interp.get_signature_list()
        if not sigs:
            raise BackendUnavailable(f"{path}: the .tflite file has no signature; build it with exporters.tflite")
        self._runner = self._interp.get_signature_runner(next(iter(sigs)))
        self._in = self._runner.get_input_details()
        self._out = self._runner.get_output_details()
        self.input_names = list(self._in)
        self.output_names = list(sigs[next(iter(sigs))]["outputs"])

    @staticmethod
    def _qparams(detail) -> tuple[float, int] | None:
        scale, zp = detail["quantization"]
        return (float(scale), int(zp)) if scale else None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = {}
        for name, d in self._in.items():
            x = np.asarray(feeds[name])
            q = self._qparams(d)
            if q is not None and d["dtype"] in (np.int8, np.uint8) and np.issubdtype(x.dtype, np.floating):
                info = np.iinfo(d["dtype"])
                x = np.clip(_round_half_away(x.astype(np.float32) / np.float32(q[0])) + q[1], info.min, info.max)
            args[name] = np.ascontiguousarray(x, dtype=d["dtype"])
        res = self._runner(**args)
        out = []
        for name in self.output_names:
            y = res[name]
            q = self._qparams(self._out[name])
            if q is not None and np.issubdtype(y.dtype, np.integer):
                y = ((y.astype(np.float32) - np.float32(q[1])) * np.float32(q[0])).astype(np.float32)
            out.append(np.array(y, copy=True))
        return out


class TFLiteBackend(Backend):
    """Builds its own artifacts: TFLite's converter on the Keras model (QAT-tuned when asked), never ONNX."""

    name = "tflite"
    needs_gpu = False
    install_hint = INSTALL_HINT
    builds_from = "framework"  # QAT hands over the fine-tuned Keras model

    @classmethod
    def check_config(cls, config) -> None:
        if config.model.framework != "keras":
            raise ValueError("measure.backend: tflite converts Keras models only; use ort-cpu for PyTorch models")
        bad = [f.value for f in config.search.formats if f not in (Format.FP32, Format.INT8)]
        if bad:
            raise ValueError(f"search.formats: TFLite builds fp32 and int8 layers only; remove {bad} "
                             "(or measure on ort-cpu, which runs every format)")
        if Int8Activations.DYNAMIC in config.search.int8_activations:
            raise ValueError("search.int8_activations: TFLite mixes int8 and fp32 layers with static "
                             "activations only; set [static]")

    def build(self, inputs: BuildInputs, plan, out_dir: Path, progress=None) -> BuiltArtifact:
        from exporters import tflite

        extra: dict = {}
        if plan.method == "qat":
            extra["qat_note"] = "QAT trains ORT's symmetric grid; TFLite int8 uses asymmetric activations (close, not exact)"
        art = tflite.candidate(inputs.adapter, inputs.reference, plan, inputs.calibration_feeds,
                               Path(out_dir) / "candidate.tflite", model=inputs.model, tools=keras_tools())
        table = inputs.reference.layer_table
        reports = [LayerReport(name=l.name, onnx_op=l.op, format=l.format, execution=self.execution(l.format, l.realisation),
                               params=table[l.name].params, detail=l.detail) for l in art.layers]
        extra["calibration_used"] = art.calibration_used
        if art.notes:
            extra["tflite_notes"] = art.notes
        return BuiltArtifact(art.path, reports, extra)

    def reference_artifact(self, inputs: BuildInputs) -> str:
        """A float ``.tflite`` of the same Keras model, so accuracy drops compare like with like."""
        from exporters import tflite

        return tflite.reference_artifact(inputs.adapter, inputs.reference, inputs.calibration_feeds, tools=keras_tools())

    def bits_per_weight(self, artifact: str | Path, reference_artifact: str | Path, quantizable_params: int) -> float:
        from exporters import tflite

        return tflite.effective_bits_per_weight(artifact, reference_artifact, quantizable_params, keras_tools())

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("ai_edge_litert") is None and importlib.util.find_spec("tensorflow") is None:
            return False, f"needs the TFLite interpreter (TensorFlow or ai-edge-litert): {INSTALL_HINT}"
        return True, ""

    def device(self) -> str:
        return f"{cpu_model_name()} ({os.cpu_count()} cores), TFLite XNNPACK"


    def open(self, onnx_path: str | Path, threads: int = 0) -> Session:
        path = Path(onnx_path)
        if path.suffix != ".tflite":
            raise BackendUnavailable(
                f"backend 'tflite' runs .tflite artifacts, not {path.name}: build the candidate from the Keras "
                "model with exporters.tflite.convert (TFLite cannot read ONNX)"
            )
        self.require()
        return TFLiteSession(path, threads)

    def runtime_version(self) -> str:
        for pkg, label in (("ai-edge-litert", "LiteRT"), ("tensorflow", "TensorFlow Lite")):
            try:
                if importlib.util.find_spec(pkg.replace("-", "_")) is not None:
                    return f"{label} {version(pkg)}"
            except PackageNotFoundError:
                continue
        return ""


BACKENDS = (TFLiteBackend,)
