"""Keras -> TFLite: INT8 full-integer (representative dataset), dynamic-range or float.

The TFLite target is a second deployment path for Keras models, next to the
ONNX one: TFLite cannot read ONNX, so a candidate is converted from the Keras
model itself (the FP32 one, or a QAT fine-tune) with TensorFlow's converter,
which does its own calibration. What a plan can ask for maps onto TFLite as:

================================  ============================================================
plan (per layer)                  TFLite conversion
================================  ============================================================
all fp32                          float32 model, no quantization (the TFLite reference)
all int8 static                   full-integer: int8 weights (per channel) and activations,
                                  int8 model inputs/outputs, ``TFLITE_BUILTINS_INT8`` only
int8 static + fp32 mix            selective: full-int8 calibration, fp32 layers denylisted via
                                  ``tf.lite.experimental.QuantizationDebugger``; float I/O
all int8 dynamic                  dynamic-range: int8 weights, activations quantized per call
                                  (hybrid kernels; TFLite leaves weights < 1024 elements float)
anything else (bf16, fp8, int4,   refused with :class:`UnsupportedPlan`; TFLite's float16 /
static+dynamic mix)               16x8 modes are not these formats
================================  ============================================================

Calibration is TFLite's own (min/max over the representative batches), whatever
``plan.calibration`` says; the result states that. Each layer's realisation is
read back from the converted flatbuffer (the dtypes of its op), not assumed.

The model is wrapped in a Keras ``ExportArchive`` endpoint with inputs named like
the data and outputs named like the ONNX reference, so a ``.tflite`` signature
and an ONNX session take the same feeds and give the same output names.
TensorFlow is imported only when a conversion runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import numpy as np

from exporters.errors import UnsupportedPlan
from pipeline.formats import names as native
from pipeline.formats import Format, Int8Activations
from pipeline.plan import LayerChoice, resolved

@dataclass(frozen=True)
class KerasTools:
    """What the converter needs from the Keras side, handed in by its caller (the TFLite backend
    passes the Keras adapter's: :func:`pipeline.backends.tflite.keras_tools`), so that exporters
    never import the framework adapters.

    ``import_tf() -> (tensorflow, keras)`` with quiet logs; ``quiet()`` silences TensorFlow's C++
    stderr while it loads or converts; ``flatten_outputs(out)`` orders a model's outputs as the ONNX
    export does; ``structure_inputs(model, feeds)`` is how a model is called with named feeds;
    ``enumerate_layers(model, keras)`` the quantizable layers (rows with ``name``, ``layer_name``).
    """

    import_tf: Callable[[], tuple[Any, Any]]
    quiet: Callable[[], ContextManager]
    flatten_outputs: Callable[[Any], list]
    structure_inputs: Callable[[Any, dict], Any]
    enumerate_layers: Callable[[Any, Any], list]


# TFLite ops that carry a layer's weight, and which input holds it.
WEIGHT_OPS = {"CONV_2D": 1, "FULLY_CONNECTED": 1, "DEPTHWISE_CONV_2D": 1, "BATCH_MATMUL": 1,
              "EMBEDDING_LOOKUP": 1, "GATHER": 0}

MODE_FLOAT = "float"
MODE_FULL_INT8 = "int8-full-integer"
MODE_SELECTIVE_INT8 = "int8-selective"
MODE_DYNAMIC_INT8 = "int8-dynamic-range"


@dataclass
class TFLiteLayer:
    """What one layer became in the .tflite file (duck-compatible with the ONNX quantizer's layer record)."""

    name: str
    format: Format  # what it actually is in the file: fp32 or int8
    realisation: str  # pipeline.backends.native name: fp32 | qdq-int8 | dynamic-int8
    detail: str
    op: str  # TFLite op, e.g. FULLY_CONNECTED


@dataclass
class TFLiteModel:
    path: str
    mode: str
    layers: list[TFLiteLayer]
    calibration_used: str
    input_names: list[str]
    output_names: list[str]
    notes: list[str] = field(default_factory=list)


def plan_mode(choices: dict[str, LayerChoice]) -> tuple[str, list[str]]:
    """The conversion mode a resolved plan needs, and the layers to keep float."""
    bad = {n: c.format.value for n, c in choices.items() if c.format not in (Format.FP32, Format.INT8)}
    if bad:
        raise UnsupportedPlan(
            f"the tflite backend builds fp32 and int8 layers only; plan asks {bad}. "
            "Use search.formats: [fp32, int8] with measure.backend: tflite"
        )
    int8 = {n: c for n, c in choices.items() if c.format is Format.INT8}
    fp32 = [n for n, c in choices.items() if c.format is Format.FP32]
    if not int8:
        return MODE_FLOAT, fp32
    acts = {c.int8_activations for c in int8.values()}
    if acts == {Int8Activations.DYNAMIC}:
        if fp32:
            raise UnsupportedPlan(
                f"tflite dynamic-range quantization applies to every layer; the plan keeps {fp32} fp32. "
                "Use int8 static for a per-layer mix on tflite"
            )
        return MODE_DYNAMIC_INT8, []
    if len(acts) > 1:
        raise UnsupportedPlan("tflite cannot mix int8 static and int8 dynamic layers in one model")
    return (MODE_SELECTIVE_INT8 if fp32 else MODE_FULL_INT8), fp32


def _scope_match(name: str, layer: str) -> int:
    """2: ``name`` lies under the name scope ``layer``; 1: under ``layer_<n>``; 0: neither."""
    best = 0
    for part in name.split(";"):  # fused TFLite names join several TF op names
        for scope in part.split("/")[:-1]:
            if scope == layer:
                return 2
            if re.fullmatch(re.escape(layer) + r"_\d+", scope):
                best = 1
    return best


def _layer_ops(weight_names: Sequence[str], keras_layers: Iterable[str]) -> dict[str, list[int]]:
    """Which weight-carrying ops (indices into ``weight_names``) belong to which Keras layer.

    A layer's ops lie under its TF name scope, which TF uniquifies with ``_<n>`` when the
    name was used before in the traced graph (``conv1`` becomes ``conv1_1``). With Keras's
    automatic names that is ambiguous: scope ``dense_1`` can be layer ``dense`` re-entered
    or layer ``dense_1`` (then scoped ``dense_1_2``). So: each layer's candidates are the
    ops under its name or a suffixed form; a layer with one candidate left owns it (no other
    layer can), repeated until nothing changes; an op still claimed twice goes to the exact
    name (first layer if none). Every op ends with at most one layer.
    """
    layers = list(dict.fromkeys(keras_layers))
    cands = {l: {i for i, w in enumerate(weight_names) if _scope_match(w, l)} for l in layers}
    owned: dict[int, str] = {}
    changed = True
    while changed:
        changed = False
        for l in layers:
            free = cands[l] - owned.keys()
            if len(free) == 1 and not any(o == l for o in owned.values()):
                owned[free.pop()] = l
                changed = True
    for l in layers:
        for i in sorted(cands[l] - owned.keys()):
            rivals = [m for m in layers if i in cands[m] and i not in owned]
            exact = [m for m in rivals if _scope_match(weight_names[i], m) == 2]
            owned[i] = (exact or rivals)[0]
    return {l: sorted(i for i, o in owned.items() if o == l) for l in layers}


def _interpreter(model_content: bytes | None = None, model_path: str | None = None, threads: int | None = None,
                 tools: KerasTools | None = None):
    """The LiteRT interpreter (``ai_edge_litert``) where installed, else TensorFlow's ``tf.lite``
    (``tools``: TensorFlow imported and silenced the caller's way; default a plain import)."""
    kwargs: dict[str, Any] = {"num_threads": threads or None}
    if model_content is not None:
        kwargs["model_content"] = model_content
    else:
        kwargs["model_path"] = model_path
    quiet = tools.quiet if tools else contextlib.nullcontext
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        tf = tools.import_tf()[0] if tools else importlib.import_module("tensorflow")
        Interpreter = tf.lite.Interpreter  # noqa: N806 - deprecated in TF 2.21 but present
    with warnings.catch_warnings(), quiet():  # "Created TensorFlow Lite XNNPACK delegate" per load
        warnings.simplefilter("ignore")  # "tf.lite.Interpreter is deprecated"
        return Interpreter(**kwargs)


def _weight_ops(interp) -> list[tuple[str, str, Any, Any]]:
    """(op name, weight tensor name, input dtype, weight dtype) for each weight-carrying op."""
    tensors = interp.get_tensor_details()
    out = []
    for op in interp._get_ops_details():  # noqa: SLF001 - the interpreter's only op listing
        pos = WEIGHT_OPS.get(op["op_name"])
        if pos is None or len(op["inputs"]) <= pos or op["inputs"][pos] < 0:
            continue
        w = tensors[op["inputs"][pos]]
        data_pos = 0 if pos == 1 else 1
        x_dtype = tensors[op["inputs"][data_pos]]["dtype"] if len(op["inputs"]) > data_pos else None
        out.append((op["op_name"], w["name"], x_dtype, w["dtype"]))
    return out


def layer_realisations(model_content: bytes, layer_names: dict[str, str], tools: KerasTools | None = None) -> list[TFLiteLayer]:
    """Per layer, what the converted model computes, read from the flatbuffer.

    ``layer_names`` maps table name -> Keras layer name (its TF name scope).
    """
    interp = _interpreter(model_content=model_content, tools=tools)
    ops = _weight_ops(interp)
    owner = _layer_ops([o[1] for o in ops], layer_names.values())
    out = []
    for table_name, keras_name in layer_names.items():
        hits = [ops[i] for i in owner[keras_name]]
        if not hits:
            raise RuntimeError(f"tflite: no TFLite op holds the weight of layer {table_name!r}; "
                               "the converter may have folded it away")
        op, _, x_dt, w_dt = hits[0]
        if w_dt == np.int8 and x_dt == np.int8:
            out.append(TFLiteLayer(table_name, Format.INT8, native.QDQ_INT8, "int8 full-integer kernel (int32 acc.)", op))
        elif w_dt == np.int8:
            out.append(TFLiteLayer(table_name, Format.INT8, native.DYNAMIC_INT8,
                                   "int8 weights, activations quantized per call (hybrid kernel)", op))
        else:
            out.append(TFLiteLayer(table_name, Format.FP32, native.FP32, f"float32 ({np.dtype(w_dt).name} weights)", op))
    return out


def _float_node_names(model_content: bytes, keras_layers: Sequence[str], all_layers: Iterable[str],
                      tools: KerasTools | None = None) -> list[str]:
    """The quantizer's denylist keys for these layers: output tensor names of the ops holding their weights.

    ``model_content`` must be the *calibrated* float model that ``QuantizationDebugger`` hands
    to ``convert.mlir_quantize`` (``debugger.calibrated_model``). The MLIR quantizer skips an
    op when its location is a ``NameLoc`` in ``denylisted_nodes``, and the flatbuffer importer
    sets an op's location from the names of its output tensors (one output: that name). Names
    read from an already quantized model are wrong for an op that produces a model output:
    there the final DEQUANTIZE takes the output's name (``StatefulPartitionedCall:0``) and the
    op's own output is renamed (``StatefulPartitionedCall:01``), a key that matches nothing.
    ``all_layers``: every layer of the table, so ops are told apart as :func:`_layer_ops` does.
    """
    interp = _interpreter(model_content=model_content, tools=tools)
    tensors = interp.get_tensor_details()
    weight_ops = []
    for op in interp._get_ops_details():  # noqa: SLF001
        pos = WEIGHT_OPS.get(op["op_name"])
        if pos is None or len(op["inputs"]) <= pos or op["inputs"][pos] < 0:
            continue
        weight_ops.append((tensors[op["inputs"][pos]]["name"], [tensors[o]["name"] for o in op["outputs"]]))
    owner = _layer_ops([w for w, _ in weight_ops], [*keras_layers, *all_layers])
    return [name for l in dict.fromkeys(keras_layers) for i in owner[l] for name in weight_ops[i][1]]


def save_endpoint(model, feeds: dict[str, np.ndarray], output_names: list[str], folder: Path,
                  structure: Callable[[Any, dict], Any], tools: KerasTools) -> None:
    """A SavedModel with one ``serving_default`` signature: named inputs -> dict of named outputs."""
    tf, keras = tools.import_tf()
    names = list(feeds)
    specs = [tf.TensorSpec((None,) + tuple(v.shape[1:]), tf.as_dtype(v.dtype), name=n) for n, v in feeds.items()]

    def serve(*args):
        out = tools.flatten_outputs(model(structure(model, dict(zip(names, args))), training=False))
        if len(out) != len(output_names):
            raise ValueError(f"model gives {len(out)} outputs, expected {len(output_names)} ({output_names})")
        return dict(zip(output_names, out))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=specs)
    archive.write_out(str(folder), verbose=False)


def convert(
    model,
    choices: dict[str, LayerChoice],
    representative: Iterable[dict[str, np.ndarray]],
    out_path: str | Path,
    output_names: list[str],
    layer_names: dict[str, str] | None = None,
    structure: Callable[[Any, dict], Any] | None = None,
    *,
    tools: KerasTools,
) -> TFLiteModel:
    """Convert a Keras model to ``out_path`` (.tflite) as the plan asks.

    ``representative``: calibration batches (dicts named like the data, several rows
    each); ``layer_names``: table name -> Keras layer name (default: the same);
    ``structure(model, feeds)``: how the model is called with named feeds (default:
    ``tools.structure_inputs``); ``tools``: the Keras side (:class:`KerasTools`).
    """
    tf, _ = tools.import_tf()
    structure = structure or tools.structure_inputs
    layer_names = layer_names or {n: n.split("#")[0] for n in choices}
    mode, fp32_layers = plan_mode(choices)
    batches = [dict(b) for b in representative]
    if not batches:
        raise ValueError("tflite: the representative dataset is empty (data.calibration gave no rows)")
    input_names = list(batches[0])
    float_inputs = all(np.issubdtype(v.dtype, np.floating) for v in batches[0].values())

    def rep():
        for b in batches:
            yield {k: np.asarray(v) for k, v in b.items()}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix="tflite-", dir=out_path.parent))
    notes: list[str] = []
    try:
        save_endpoint(model, {k: v[:1] for k, v in batches[0].items()}, output_names, tmpdir / "saved", structure, tools)

        def converter():
            c = tf.lite.TFLiteConverter.from_saved_model(str(tmpdir / "saved"))
            if mode != MODE_FLOAT:
                c.optimizations = [tf.lite.Optimize.DEFAULT]
            if mode in (MODE_FULL_INT8, MODE_SELECTIVE_INT8):
                c.representative_dataset = rep
            return c

        with warnings.catch_warnings(), tools.quiet():
            warnings.simplefilter("ignore")
            if mode == MODE_FULL_INT8:
                c = converter()
                c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                if float_inputs:
                    c.inference_input_type = tf.int8
                    c.inference_output_type = tf.int8
                else:
                    notes.append("integer model inputs kept as they are; float outputs")
                content = c.convert()
            elif mode == MODE_SELECTIVE_INT8:
                # The debugger calibrates once; the denylist keys are read from that calibrated
                # model, the one mlir_quantize matches them against (see _float_node_names).
                dbg = tf.lite.experimental.QuantizationDebugger(converter=converter(), debug_dataset=rep)
                deny = _float_node_names(dbg.calibrated_model, [layer_names[n] for n in fp32_layers],
                                         layer_names.values(), tools)
                dbg.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=deny)
                content = dbg.get_nondebug_quantized_model()
                notes.append("selective int8 (fp32 layers denylisted); float model inputs/outputs")
            else:
                content = converter().convert()
        tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
        tmp.write_bytes(content)
        os.replace(tmp, out_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    layers = layer_realisations(content, layer_names, tools)
    for l in layers:  # the file, not the plan, is what gets reported; say where they differ
        asked = choices[l.name].format
        if asked is not l.format:
            notes.append(f"{l.name}: plan asked {asked.value}, TFLite stored {l.format.value} ({l.detail})")
    calibration = {MODE_FLOAT: "none", MODE_DYNAMIC_INT8: "none (dynamic range)"}.get(
        mode, f"tflite min/max over {sum(len(next(iter(b.values()))) for b in batches)} rows")
    return TFLiteModel(path=str(out_path), mode=mode, layers=layers, calibration_used=calibration,
                       input_names=input_names, output_names=list(output_names), notes=notes)


def constant_bytes(tflite_path: str | Path, tools: KerasTools | None = None) -> int:
    """Bytes of constant tensors (weights, biases) plus their quantization parameters.

    The TFLite analogue of ``pipeline.measure.weight_bytes`` for ONNX: constants are
    tensors no op produces and that are not model inputs.
    """
    interp = _interpreter(model_path=str(tflite_path), tools=tools)
    produced: set[int] = set()
    for op in interp._get_ops_details():  # noqa: SLF001
        produced.update(int(i) for i in op["outputs"])
    inputs = {d["index"] for d in interp.get_input_details()}
    total = 0
    for t in interp.get_tensor_details():
        if t["index"] in produced or t["index"] in inputs:
            continue
        shape = t["shape"]
        if len(shape) == 0 and not t["quantization_parameters"]["scales"].size:
            n = 1
        else:
            n = int(np.prod(shape)) if len(shape) else 1
        total += n * np.dtype(t["dtype"]).itemsize
        qp = t["quantization_parameters"]
        total += 4 * len(qp["scales"]) + 8 * len(qp["zero_points"])
    return total


def effective_bits_per_weight(candidate: str | Path, reference: str | Path, quantizable_params: int,
                              tools: KerasTools | None = None) -> float:
    """Storage bits per quantizable weight, as :func:`pipeline.measure.effective_bits_per_weight`
    computes it for ONNX: (candidate constants - non-layer constants of the float reference) * 8 / params."""
    other = constant_bytes(reference, tools) - 4 * quantizable_params
    return max(constant_bytes(candidate, tools) - other, 0) * 8.0 / max(quantizable_params, 1)


# --------------------------------------------------------------------------- trial helpers
def _layer_names(adapter, model, tools: KerasTools) -> dict[str, str]:
    """Layer-table name -> Keras layer name (its TF name scope), ``name#k`` rows included."""
    _, keras = adapter.tf()
    return {kl.name: kl.layer_name for kl in tools.enumerate_layers(model, keras)}


def reference_artifact(adapter, reference, calibration_feeds: Sequence[dict[str, np.ndarray]], *,
                       tools: KerasTools) -> str:
    """The float32 ``.tflite`` of the FP32 reference model, cached next to ``reference.onnx``:
    what accuracy drops on the tflite backend are measured against."""
    path = Path(reference.onnx_path).with_name("reference.tflite")
    if path.exists():
        return str(path)
    model = adapter.load_model()
    names = _layer_names(adapter, model, tools)
    table = reference.layer_table.names
    choices = {n: LayerChoice(format=Format.FP32) for n in table}
    convert(model, choices, list(calibration_feeds)[:1], path, reference.output_names,
            layer_names={n: names.get(n, names.get(n.split("#")[0], n)) for n in table},
            structure=lambda m, f: adapter.model_inputs(m, f), tools=tools)
    return str(path)


def candidate(adapter, reference, plan, calibration_feeds: Sequence[dict[str, np.ndarray]], out_path: str | Path,
              model=None, *, tools: KerasTools) -> TFLiteModel:
    """A trial's ``.tflite`` artifact: ``plan`` applied to the Keras model (``model``: a QAT
    fine-tune; default the FP32 model), inputs/outputs named like the ONNX reference."""
    model = model if model is not None else adapter.load_model()
    names = _layer_names(adapter, model, tools)
    table = reference.layer_table.names
    return convert(model, resolved(plan, table), calibration_feeds, out_path, reference.output_names,
                   layer_names={n: names.get(n, names.get(n.split("#")[0], n)) for n in table},
                   structure=lambda m, f: adapter.model_inputs(m, f), tools=tools)
