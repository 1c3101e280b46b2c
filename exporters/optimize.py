"""Optimize the FP32 reference graph before any candidate is built from it.

Users who quantize with ONNX Runtime start from an optimized graph (Hugging Face Optimum fuses,
then quantizes; ORT's docs say to optimize first), so candidates start there too, and the FP32
reference's accuracy and latency are measured on the *same optimized graph* the candidates are
quantized from: every accuracy drop and speed ratio compares like with like.

Modes (``export.optimize`` in the config, :class:`pipeline.config.ExportSpec`):

* ``none`` - the export as is (only a name repair, see below).
* ``basic`` - ONNX Runtime's own graph optimizer at level BASIC, saved offline: constant
  folding, redundant-node elimination and the standard-op fusions (Conv+BatchNorm, Conv+Add,
  MatMul+Add -> Gemm). Standard ONNX ops only, so any backend can read the result.
* ``transformer`` - ``basic``, after the transformer fusions of ``onnxscript.rewriter.ort_fusions``
  (the library ORT's own ``dynamo_onnx_helper`` uses for dynamo exports, which is how the torch
  adapter exports): SkipLayerNormalization, Gelu/BiasGelu, SDPA -> MultiHeadAttention. The
  attention-packing step (Q/K/V MatMuls concatenated into one ``Attention`` weight) is left
  out on purpose: it would merge three user layers into one node, and the Q/K/V projections
  stay separate MatMuls (each still its own layer, each its own integer kernel) while the
  attention core (QK^T, softmax, V, head transposes) runs as one fused kernel. ORT's
  ``onnxruntime.transformers.optimizer.optimize_model`` was tried first: on dynamo exports its
  pattern matchers find no Attention/SkipLayerNorm (its symbolic shape inference fails), so it
  adds nothing over ORT's session-time fusions.
* ``auto`` (default) - ``basic`` for backends that run ORT's CPU/CUDA kernels (``ort-cpu``,
  ``ort-cuda``), ``none`` for the others: TensorRT (also through ORT's TensorRT provider)
  builds its own fusions from standard ONNX; TFLite converts the Keras model and reads no ONNX
  (there every mode means ``none``). ``transformer`` is not the default because it did not pay
  on ORT CPU: all-MiniLM-L6-v2, 2 threads, batch 8 pairs x 64 tokens, 40 interleaved rounds -
  FP32 0.99x with the fused MultiHeadAttention/SkipLayerNorm graph, and uniform INT8 dynamic
  from the fused graph 0.69x of FP32 against 0.60x from the plain one (ORT's session-time
  fusions already give the plain graph SkipLayerNorm/BiasGelu; timings on a shared 2-core box).

Whatever the mode, the user's layer names stay addressable: the layer table (one ONNX node +
weight initializer per layer, :mod:`pipeline.layers`) is re-mapped onto the optimized graph,
by node name when the node kept it (ORT folds BatchNorm into the Conv's weight under the same
node name), else by the weight initializer's name, else by its exact contents. A layer that
cannot be re-mapped to exactly one quantizable node, or optimized outputs that differ from the
export's on a calibration batch beyond float rounding, abandon the optimization (the export is
used as is, with a warning that says why): an optimization never costs a searchable layer.

Every mode first repairs duplicate tensor definitions the exporter wrote
(:func:`exporters.quant.names.repair_duplicate_definitions`: a user output named
``embedding`` used to collide with torch's internal ``embedding`` value).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import onnx

from exporters.quant.names import repair_duplicate_definitions
from pipeline.layers import LayerTable

log = logging.getLogger(__name__)

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv", "Gather")
ORT_KERNEL_BACKENDS = ("ort-cpu", "ort-cuda")
"""Backends that run ORT's own kernels, where the com.microsoft fused ops exist."""

OUTPUT_RTOL = 1e-3
"""Optimized vs exported outputs on a calibration batch: max |diff| <= OUTPUT_RTOL * max(1, max |y|).
Fusions reorder float sums (~1e-6 relative); anything larger is a broken rewrite."""


class OptimizeMode(str, Enum):
    AUTO = "auto"
    NONE = "none"
    BASIC = "basic"
    TRANSFORMER = "transformer"


def resolve_mode(mode: OptimizeMode | str, backend: str | None) -> OptimizeMode:
    """What ``auto`` means for a backend; ``backend=None`` or ``tflite``: the backend reads no ONNX."""
    mode = OptimizeMode(mode)
    if backend in (None, "tflite"):
        return OptimizeMode.NONE
    if mode is not OptimizeMode.AUTO:
        return mode
    return OptimizeMode.BASIC if backend in ORT_KERNEL_BACKENDS else OptimizeMode.NONE


FORM = "2"  # the optimized file's form: 2 = without unused opset imports (drop_unused_domains); older folders are redone


def optimize_reference(onnx_path: str | Path, layer_table: LayerTable, content_hash: str,
                       mode: OptimizeMode | str, backend: str | None,
                       check_feeds: Sequence[dict[str, np.ndarray]] = ()) -> tuple[str, LayerTable]:
    """The reference candidates are built from (and the FP32 accuracy is measured on).

    Cached next to the export (``<export dir>/optimized-<mode>/``, keyed by the export's content
    hash as the export is), so Ray workers and later runs reuse it. ``check_feeds``: input
    batches (the first one is used) to check the optimized outputs against the export's.
    Returns ``(onnx path, layer table)``: the export's own when nothing was applied.
    """
    raw_path, raw_table = str(onnx_path), layer_table
    mode = resolve_mode(mode, backend)
    src = Path(raw_path)
    folder = src.parent / f"optimized-{mode.value}"
    record = folder / "optimize.json"
    if record.is_file():
        info = json.loads(record.read_text())
        if info.get("content_hash") == content_hash and info.get("form") == FORM:
            if not info.get("applied"):
                return raw_path, raw_table
            return str(folder / "reference.onnx"), LayerTable.load(folder / "reference.json")
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    repaired = repair_duplicate_definitions(model)
    fusions: dict[str, int] = {}
    note = ""
    try:
        if mode is not OptimizeMode.NONE:
            protected = _protect(model, [l.weight for l in raw_table])
            if mode is OptimizeMode.TRANSFORMER:
                model, fusions = transformer_fusions(model)
            model = ort_basic(model, folder)
            _unprotect(model, protected)
        table = remap_layers(onnx.load(str(src)), model, raw_table) if mode is not OptimizeMode.NONE \
            else raw_table
        if check_feeds and mode is not OptimizeMode.NONE:
            check_outputs(src, model, check_feeds[0], folder)
    except OptimizationRefused as exc:
        note = f"export.optimize={mode.value} not applied: {exc}; candidates start from the export as is"
        log.warning(note)
        model, table, fusions = onnx.load(str(src)), raw_table, {}
        repair_duplicate_definitions(model)
    applied = bool(repaired) or (not note and mode is not OptimizeMode.NONE)
    info = {"content_hash": content_hash, "form": FORM, "mode": mode.value, "applied": applied, "fusions": fusions,
            "repaired_names": repaired, "note": note}
    # Written atomically, the record last: Ray workers may build the same reference at once, and
    # a reader only trusts a folder whose record exists.
    tag = f".tmp{os.getpid()}"
    if applied:
        onnx.save(model, str(folder / f"reference.onnx{tag}"))
        os.replace(folder / f"reference.onnx{tag}", folder / "reference.onnx")
        table.save(folder / f"reference.json{tag}")
        os.replace(folder / f"reference.json{tag}", folder / "reference.json")
    (folder / f"optimize.json{tag}").write_text(json.dumps(info, indent=2))
    os.replace(folder / f"optimize.json{tag}", record)
    if not applied:
        return raw_path, raw_table
    log.info("reference optimized (%s): fusions %s", mode.value, {k: v for k, v in fusions.items() if v})
    return str(folder / "reference.onnx"), table


class OptimizationRefused(RuntimeError):
    """The optimized graph cannot serve as the reference (a layer lost, outputs changed)."""


def transformer_fusions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """onnxscript's ORT transformer fusions, without Q/K/V packing (module docstring)."""
    try:
        import onnx_ir as ir
        from onnxscript import optimizer
        from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
        from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
        from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
        from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
        from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
        from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
        from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
        from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
        from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization
    except ImportError as exc:  # onnxscript ships with torch's dynamo exporter
        raise OptimizationRefused(f"onnxscript's ORT fusions are not importable ({exc})") from exc
    m = ir.from_proto(model)
    try:
        ir.passes.common.ShapeInferencePass()(m)
        optimizer.optimize(m)
        counts = {
            "erf_gelu": fuse_erfgelu(m),
            "skip_layer_normalization": fuse_skip_layer_normalization(m),
            "sdpa": fuse_sdpa(m, apply_shape_inference=True),
            "mha1": fuse_mha1(m),
            "mha2": fuse_mha2(m),
            "mha_scale": fuse_mha_scale(m),
            "mha_bias": fuse_mha_bias(m),
            "gelu": fuse_gelu(m),
            "bias_gelu": fuse_bias_gelu(m),
            "sdpa_via_mha": replace_sdpa_by_mha(m),
        }
        optimizer.optimize(m)
        out = ir.to_proto(m)
    except Exception as exc:  # noqa: BLE001 - a fusion library failing on an unseen graph
        raise OptimizationRefused(f"transformer fusions failed ({type(exc).__name__}: {exc})") from exc
    return out, counts


def ort_basic(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """ONNX Runtime's BASIC graph optimizations (standard ops only), saved offline."""
    import onnxruntime as ort

    src, dst = folder / f"pre_basic.{os.getpid()}.onnx", folder / f"basic.{os.getpid()}.onnx"
    onnx.save(model, str(src))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        out = onnx.load(str(dst))
    except Exception as exc:  # noqa: BLE001
        raise OptimizationRefused(f"ONNX Runtime's basic optimizer failed ({type(exc).__name__}: {exc})") from exc
    finally:
        for p in (src, dst):
            p.unlink(missing_ok=True)
    drop_unused_domains(out)
    return out


def drop_unused_domains(model: onnx.ModelProto) -> list[str]:
    """Remove the opset imports no node uses (ORT's saved graph imports every domain it knows: ai.onnx.ml,
    training, preview, nchwc, org.pytorch.aten). They change nothing but the file: ~170 bytes per artifact,
    1.5% of a small model's size objective, and a candidate built from this reference and one built from the
    raw export then differed in size for the same plan. Returns the domains removed."""
    used = {n.domain for n in model.graph.node}
    for f in model.functions:
        used |= {n.domain for n in f.node} | {f.domain}
    stack = [model.graph]
    while stack:  # subgraphs (If/Loop/Scan bodies)
        g = stack.pop()
        for n in g.node:
            used.add(n.domain)
            stack += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
            stack += [x for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for x in a.graphs]
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    gone = [o.domain for o in model.opset_import if o not in keep]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return gone


def _protect(model: onnx.ModelProto, weights: Sequence[str]) -> list[str]:
    """List the layer weights as graph inputs while the optimizers run (returns those added).

    Both optimizers leave a node alone when an input is a graph input (onnxscript: "to preserve
    the graph signature"; ORT: an initializer listed as an input can be overridden, so it is not
    a constant). Without this, constant folding eats layers whose other inputs are constant too
    (a position-embedding Gather on a constant range: the table becomes a folded slice and the
    layer is gone). Fusions around the layer (bias, residual, norm, attention) still happen.
    """
    have = {i.name for i in model.graph.input}
    inits = {t.name: t for t in model.graph.initializer}
    added = []
    for w in dict.fromkeys(weights):
        if w in inits and w not in have:
            t = inits[w]
            model.graph.input.append(onnx.helper.make_tensor_value_info(w, t.data_type, list(t.dims)))
            added.append(w)
    return added


def _unprotect(model: onnx.ModelProto, added: Sequence[str]) -> None:
    drop = set(added)
    keep = [i for i in model.graph.input if i.name not in drop]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def _digest(t: onnx.TensorProto) -> str:
    return hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest() + str(list(t.dims))


def remap_layers(before: onnx.ModelProto, after: onnx.ModelProto, table: LayerTable) -> LayerTable:
    """The layer table on the optimized graph: each layer's node and weight located again.

    Per layer, in order: the node of the same name and op (its weight may be new, e.g. with
    BatchNorm folded in), else the one quantizable node reading the same-named initializer,
    else the one reading an initializer with identical contents. Raises
    :class:`OptimizationRefused` naming the layer when none (or several) fit.
    """
    inits = {t.name: t for t in after.graph.initializer}
    old_inits = {t.name: t for t in before.graph.initializer}
    by_name = {n.name: n for n in after.graph.node if n.name}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in after.graph.node:
        if n.op_type in QUANTIZABLE_OPS and n.domain in ("", "ai.onnx"):
            for i in n.input:
                if i in inits:
                    readers.setdefault(i, []).append(n)
    digests: dict[str, list[str]] | None = None
    layers = []
    for layer in table:
        n, weight = by_name.get(layer.onnx_node), None
        if n is not None and n.op_type in QUANTIZABLE_OPS and n.domain in ("", "ai.onnx"):
            idx = 0 if n.op_type == "Gather" else 1
            cand = n.input[idx] if len(n.input) > idx else ""
            if cand in inits and list(inits[cand].dims) == list(layer.weight_shape):
                weight = cand
        if weight is None:
            found = [(r, layer.weight) for r in readers.get(layer.weight, [])]
            if not found and layer.weight in old_inits:
                if digests is None:
                    digests = {}
                    for name, t in inits.items():
                        digests.setdefault(_digest(t), []).append(name)
                found = [(r, name) for name in digests.get(_digest(old_inits[layer.weight]), [])
                         for r in readers.get(name, [])]
            if len(found) != 1:
                what = "no quantizable node reads its weight" if not found else \
                    f"{len(found)} nodes read its weight ({', '.join(r.name for r, _ in found[:4])})"
                raise OptimizationRefused(f"layer {layer.name!r} cannot be located on the optimized graph: {what}")
            n, weight = found[0]
        layers.append(layer.model_copy(update={"onnx_node": n.name, "onnx_op": n.op_type, "weight": weight,
                                               "weight_shape": tuple(inits[weight].dims)}))
    nodes = [l.onnx_node for l in layers]
    dup = sorted({x for x in nodes if nodes.count(x) > 1})
    if dup:
        raise OptimizationRefused(f"several layers map to the same optimized node(s) {dup[:4]}")
    return table.model_copy(update={"layers": layers})


def check_outputs(src: Path, model: onnx.ModelProto, feeds: dict[str, np.ndarray], folder: Path) -> None:
    """Optimized and exported graphs give the same outputs on one batch (within float rounding)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    tmp = folder / f"check.{os.getpid()}.onnx"
    onnx.save(model, str(tmp))
    try:
        fixed = onnx.load(str(src))
        repair_duplicate_definitions(fixed)
        a_sess = ort.InferenceSession(fixed.SerializeToString(), so, providers=["CPUExecutionProvider"])
        b_sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in a_sess.get_inputs()]
        a = a_sess.run(None, {k: feeds[k] for k in names})
        b = b_sess.run(None, {k: feeds[k] for k in names})
    except Exception as exc:  # noqa: BLE001
        raise OptimizationRefused(f"the optimized graph does not run ({type(exc).__name__}: {exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    for o, x, y in zip(a_sess.get_outputs(), a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise OptimizationRefused(f"output {o.name!r} changed shape {x.shape} -> {y.shape}")
        err, scale = float(np.max(np.abs(x - y), initial=0.0)), max(1.0, float(np.max(np.abs(x), initial=0.0)))
        if not err <= OUTPUT_RTOL * scale:
            raise OptimizationRefused(f"output {o.name!r} differs from the export's by {err:.3g} (allowed "
                                      f"{OUTPUT_RTOL * scale:.3g})")


def clear_cache(onnx_path: str | Path) -> None:
    """Forget every optimized copy of this export (tests, or after an onnxruntime upgrade)."""
    for d in Path(onnx_path).parent.glob("optimized-*"):
        shutil.rmtree(d, ignore_errors=True)
