"""Keras 3 (TensorFlow backend) adapter: model -> FP32 ONNX reference + layer table.

Exporter: Keras 3's own ``model.export(path, format="onnx")``. On the TensorFlow
backend it traces the model into a ``tf.function`` and converts it with tf2onnx
(1.17, which Keras patches for NumPy 2), so it is the maintained path and needs
no private glue here. tf2onnx stops at opset 18; the exported graph is brought to
the configured ``model.opset`` (default 21, what the quantizer needs for mixed
INT4/FP8) with ``onnx.version_converter``, and checked against Keras' own outputs.

Layer table: every ``Dense``, ``EinsumDense``, ``Conv1D``, ``Conv2D`` (and
``Embedding``) maps to exactly one ONNX node and weight initializer. The mapping
is by **weight content**: tf2onnx stores kernels transposed/reshaped
(Conv2D HWIO -> OIHW, Conv1D -> OI1K, EinsumDense reshaped for a MatMul), so the
fingerprint is the sorted multiset of values, which any layout change keeps. The
TF name scope (``functional_1/<layer>_1/MatMul``) breaks ties between layers with
identical values. Matched nodes and weights are renamed after the Keras layer
(``<layer>`` and ``<layer>/kernel``) so artifacts read like the model.

Dense on a 2-D input: tf2onnx writes ``MatMul`` + a float bias ``Add``; the export folds the
pair into one ``Gemm(x, W, b)`` (:func:`fold_dense_bias`), the form PyTorch's exporter writes
for ``nn.Linear``. Not a cosmetic change: ONNX Runtime's session-time ``MatMulAddFusion`` makes
that very Gemm anyway, and for an int8-static or fp8 Dense followed by a quantized layer its
``WeightBiasQuantization`` then rounded the float bias to int32 - the deployed model was not
the written one (nor what Keras QAT trained). As a Gemm in the file, the quantizer writes the
int32 bias itself (``exporters.quant.ort_passes``), QAT mirrors it, and ORT finds nothing to
change. A Dense on a 3-D or larger input stays MatMul + Add (Gemm is 2-D only).

TensorFlow is imported lazily (only this module, the Keras QAT and the TFLite
paths touch it), with its C++ log noise silenced and its thread pools set to the
configured ``measure.threads``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.config import ConfigError, SearchConfig
from pipeline.data import load_dataset
from pipeline.layers import Layer, LayerTable, UnquantizedModule, choose_candidate, unquantized_reason
from pipeline.models.base import ModelAdapter, ReferenceModel

log = logging.getLogger(__name__)

KERAS_EXTRA_HINT = "pip install -e '.[keras]'   (or: make venv EXTRAS=keras)"
TF2ONNX_MAX_OPSET = 18  # tf2onnx 1.17: "Opset 21 is not supported yet"
EXPORT_FORM = "dense-gemm-v1"
"""Version of the graph rewrites done after tf2onnx (part of the content hash, so a cached
reference written by an older adapter is re-exported rather than reused)."""

# ONNX op -> which inputs may hold the layer's weight.
QUANT_OPS = {"MatMul": (1, 0), "Gemm": (1,), "Conv": (1,), "Einsum": (1, 0), "Gather": (0,)}


# --------------------------------------------------------------------------- TF import
@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 while TensorFlow's C++ runtime loads.

    TF 2.21 prints absl/oneDNN/CUDA-stub lines *before* absl logging is initialised,
    which ``TF_CPP_MIN_LOG_LEVEL`` cannot stop. Python exceptions still propagate
    (they are raised after the fd is restored). ``PRECISION_SEARCH_TF_VERBOSE=1``
    keeps everything.
    """
    if os.environ.get("PRECISION_SEARCH_TF_VERBOSE") == "1":
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_TF_THREADS: int | None = None
_GPUS_CONFIGURED = False


def import_tf(threads: int | None = None):
    """``(tensorflow, keras)``, imported on first use with quiet logs and bounded threads.

    ``threads`` (``measure.threads``; 0 = TF's default) sets TF's intra-op pool and
    a single inter-op thread, as ORT sessions do. TF fixes its pools when its
    runtime starts, so only the first call's value takes effect; a later different
    value is logged rather than silently assumed.
    """
    global _TF_THREADS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    backend = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        raise ConfigError(
            f"model.framework: keras runs on the TensorFlow backend, but KERAS_BACKEND={backend!r}; "
            "unset it or set KERAS_BACKEND=tensorflow"
        )
    try:
        with _quiet_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorflow as tf
            import keras
    except ImportError as exc:
        raise ConfigError(f"model.framework: keras needs TensorFlow and Keras ({exc}); install the extra: "
                          f"{KERAS_EXTRA_HINT}") from exc
    if keras.backend.backend() != "tensorflow":
        raise ConfigError(f"model.framework: Keras was already imported with the {keras.backend.backend()!r} "
                          "backend; precision-search needs KERAS_BACKEND=tensorflow")
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    if threads is not None and threads != _TF_THREADS:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1 if threads else 0)
            _TF_THREADS = threads
        except RuntimeError:  # runtime already initialised
            if _TF_THREADS is None:
                _TF_THREADS = tf.config.threading.get_intra_op_parallelism_threads()
            if _TF_THREADS != threads:
                log.info("TensorFlow thread pools already started with %s threads; %s requested",
                         _TF_THREADS, threads)
    global _GPUS_CONFIGURED
    if not _GPUS_CONFIGURED:
        # TF would otherwise reserve all GPU memory on first use, starving ONNX Runtime /
        # TensorRT in the same trial process. (Listing devices initialises CUDA: quiet.)
        _GPUS_CONFIGURED = True
        with _quiet_stderr():
            for gpu in tf.config.list_physical_devices("GPU"):
                try:
                    tf.config.experimental.set_memory_growth(gpu, True)
                except RuntimeError:  # already initialised
                    pass
    return tf, keras


# --------------------------------------------------------------------------- layers
@dataclass
class _KerasLayer:
    name: str  # table name: the Keras layer name (qualified only if names repeat in nested models)
    layer_name: str  # the Keras layer name, for TF name-scope tie-breaks
    kind: str
    module_type: str
    weight: np.ndarray  # float32 kernel in Keras layout
    weight_attr: str  # "kernel" or "embeddings"
    macs: int | None = None  # per sample, where the output shape is static
    layer: Any = None  # the keras.layers.Layer itself


def _macs(layer, kind: str, weight: np.ndarray) -> int | None:
    """Multiply-accumulates per sample: kernel size x output positions (Dense/Conv), from the
    layer's symbolic output shape; None where it is unknown (dynamic dims, subclassed models)."""
    if kind == "embedding":
        return None
    try:
        shape = tuple(layer.output.shape)[1:]
    except Exception:  # noqa: BLE001 - layers outside a functional graph have no symbolic output
        shape = None
    if kind == "linear" and type(layer).__name__ == "Dense":
        positions = shape[:-1] if shape is not None else ()
    elif kind == "conv" and shape is not None:
        positions = shape[:-1]  # channels-last spatial dims
    else:
        return int(weight.size) if kind == "linear" else None
    if any(d is None for d in positions):
        return int(weight.size) if kind == "linear" else None
    return int(weight.size * int(np.prod(positions, dtype=np.int64)))


def _quant_kind(layer, keras) -> tuple[str, str] | None:
    L = keras.layers
    if isinstance(layer, (L.Dense, L.EinsumDense)):
        return "linear", "kernel"
    if isinstance(layer, (L.Conv1D, L.Conv2D)):
        return "conv", "kernel"
    if isinstance(layer, L.Embedding):
        return "embedding", "embeddings"
    return None


def _sublayers(layer) -> list:
    """Direct sublayers: a model's ``layers``, and also the layers a custom layer owns
    (e.g. MultiHeadAttention's query/key/value EinsumDense), which ``layers`` does not list."""
    flatten = getattr(layer, "_flatten_layers", None)  # Keras 3 Layer API (tracked sublayers)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "layers", []) or [])


def _walk(layer, seen: set[int]):
    for sub in _sublayers(layer):
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        yield sub
        yield from _walk(sub, seen)


def enumerate_layers(model, keras) -> list[_KerasLayer]:
    """Quantizable layers of a Keras model (nested models included), in layer order."""
    found = []
    for layer in _walk(model, set()):
        kind = _quant_kind(layer, keras)
        if kind is None or not layer.built:  # never built = never called: no weight to map
            continue
        var = getattr(layer, kind[1])
        found.append((layer, kind, var))
    counts: dict[str, int] = {}
    for layer, _, _ in found:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    out = []
    for layer, (kind, attr), var in found:
        name = layer.name
        if counts[name] > 1:  # same name in two nested models: qualify by the variable path
            name = var.path.rsplit("/", 1)[0]
        w = np.asarray(var.numpy(), dtype=np.float32)
        out.append(_KerasLayer(name, layer.name, kind, type(layer).__name__, w, attr, _macs(layer, kind, w), layer))
    return out


def enumerate_unquantized(model, keras) -> list[UnquantizedModule]:
    """Layers whose variables no quantizable layer covers (each stays fp32), in layer order.

    A layer with no quantizable layer inside (an LSTM and its LSTMCell, a LayerNormalization) is
    one entry with all its variables, named as the user named it; a container (a nested model, an
    attention block) contributes only the variables it holds itself.
    """
    out: list[UnquantizedModule] = []

    def has_quantizable(layer) -> bool:
        return any(_quant_kind(sub, keras) is not None for sub in _walk(layer, set()))

    def visit(layer, seen: set[int]) -> None:
        for sub in _sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if _quant_kind(sub, keras) is not None or not sub.built:
                continue
            leaf = not has_quantizable(sub)
            inner = set() if leaf else {id(v) for s2 in _sublayers(sub) for v in s2.weights}
            own = [v for v in sub.weights if id(v) not in inner]
            if own:
                kind = type(sub).__name__
                out.append(UnquantizedModule(name=sub.name, module_type=kind,
                                             params=int(sum(int(np.prod(v.shape)) for v in own)),
                                             reason=unquantized_reason(kind)))
            if not leaf:
                visit(sub, seen)

    visit(model, set())
    return out


def _fingerprint(a: np.ndarray) -> str:
    """Layout-independent fingerprint: size plus the sorted values (transpose/reshape keep both)."""
    flat = np.sort(np.asarray(a, dtype=np.float32).reshape(-1))
    return hashlib.sha1(flat.tobytes()).hexdigest()


def _in_scope(node_name: str, layer_name: str) -> bool:
    return re.search(r"(^|/)" + re.escape(layer_name) + r"(_\d+)?/", node_name) is not None


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new
    for coll in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in coll:
            if item.name == old:
                item.name = new


def build_layer_table(onnx_model: onnx.ModelProto, keras_layers: list[_KerasLayer]) -> LayerTable:
    """Map each Keras layer to exactly one ONNX node + initializer; rename both after the layer.

    A layer called several times (shared weights) becomes ``name``, ``name#2``, ...,
    each with its own copy of the weight, so each call can get its own format.
    """
    graph = onnx_model.graph
    inits = {i.name: i for i in graph.initializer}
    by_print: dict[str, list[int]] = {}
    for idx, kl in enumerate(keras_layers):
        by_print.setdefault(_fingerprint(kl.weight), []).append(idx)

    init_prints: dict[str, str] = {}
    assignments: list[tuple[int, onnx.NodeProto, int]] = []
    taken: dict[int, int] = {}
    for node in graph.node:
        for pos in QUANT_OPS.get(node.op_type, ()):
            if pos >= len(node.input) or node.input[pos] not in inits:
                continue
            w = node.input[pos]
            arr = numpy_helper.to_array(inits[w])
            if arr.dtype.kind != "f" or arr.ndim < 2:
                continue
            if w not in init_prints:
                init_prints[w] = _fingerprint(arr)
            cands = by_print.get(init_prints[w], [])
            if not cands:
                continue
            chosen = choose_candidate(cands, lambda c: _in_scope(node.name, keras_layers[c].layer_name), taken)
            assignments.append((chosen, node, pos))
            break

    unmatched = [kl.name for i, kl in enumerate(keras_layers) if i not in taken]
    if unmatched:
        raise RuntimeError(
            f"layer table: {len(unmatched)} Keras layer(s) map to no ONNX node holding their weight: "
            f"{unmatched[:10]}. They may be unused in call(), or the exporter rewrote their weights "
            "(e.g. folded a BatchNormalization into a Conv). Remove unused layers or fold before export."
        )

    # Copy shared initializers so each quantizable node owns its weight, then rename.
    consumers: dict[str, int] = {}
    for node in graph.node:
        for n in node.input:
            consumers[n] = consumers.get(n, 0) + 1
    existing_nodes = {n.name for n in graph.node}
    existing_tensors = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    uses: dict[int, int] = {}
    layers: list[Layer] = []
    for idx, node, pos in assignments:
        kl = keras_layers[idx]
        uses[idx] = uses.get(idx, 0) + 1
        name = kl.name if uses[idx] == 1 else f"{kl.name}#{uses[idx]}"
        old_w = node.input[pos]
        new_w = f"{name}/{kl.weight_attr}"
        if new_w in existing_tensors and new_w != old_w:
            new_w = f"{new_w}__{uses[idx]}"
        if consumers.get(old_w, 0) > 1:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[old_w])
            copy.name = new_w
            graph.initializer.append(copy)
            node.input[pos] = new_w
            consumers[old_w] -= 1
        else:
            _rename_tensor(graph, old_w, new_w)
        existing_tensors.add(new_w)
        if name not in existing_nodes:
            existing_nodes.discard(node.name)
            node.name = name
            existing_nodes.add(name)
        init = next(i for i in graph.initializer if i.name == new_w)
        shape = tuple(int(d) for d in init.dims)
        macs = kl.macs
        layers.append(Layer(name=name, kind=kl.kind, module_type=kl.module_type, onnx_node=node.name,
                            onnx_op=node.op_type, weight=new_w, weight_shape=shape,
                            params=int(np.prod(shape)), macs=macs))
    node_names = [l.onnx_node for l in layers]
    if len(set(node_names)) != len(node_names):
        raise RuntimeError("layer table: one ONNX node claimed by several layers; please report this model")
    return LayerTable(layers=layers)


# --------------------------------------------------------------------------- Dense -> Gemm
def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference can type (graph inputs, outputs, value_info)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - no fold is a valid (if less useful) export
        log.info("ONNX shape inference failed on the Keras export (%s); Dense layers stay MatMul + Add", exc)
        return {}
    g = inferred.graph
    out = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def fold_dense_bias(onnx_model: onnx.ModelProto) -> int:
    """``Add(MatMul(x, W), b)`` -> ``Gemm(x, W, b)`` where x is 2-D; returns how many were folded.

    Conditions (all of them, else the pair is left alone): ``W`` a 2-D float initializer
    ``[K, N]``; ``x`` known to be 2-D; the MatMul's output read by that one Add only and not a
    graph output; ``b`` a float initializer of shape ``[N]``. The Gemm keeps the MatMul's node
    name (so the layer table's name-scope tie-break still works) and the Add's output tensor.
    Same arithmetic as ORT's own MatMulAddFusion does at session time (``alpha = beta = 1``,
    no transposes).
    """
    graph = onnx_model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    ranks = tensor_ranks(onnx_model)
    floats = (onnx.TensorProto.FLOAT,)
    folds: list[tuple[str, str, str]] = []  # (matmul name, add name, bias)
    for n in graph.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or not n.name:
            continue
        w = inits.get(n.input[1])
        if w is None or w.data_type not in floats or len(w.dims) != 2 or ranks.get(n.input[0]) != 2:
            continue
        y = n.output[0]
        users = readers.get(y, [])
        if y in outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
            continue
        add = users[0]
        if len(add.input) != 2 or not add.name or list(add.input).count(y) != 1:
            continue
        bias = add.input[1] if add.input[0] == y else add.input[0]
        b = inits.get(bias)
        if b is None or b.data_type not in floats or list(b.dims) != [int(w.dims[1])]:
            continue
        folds.append((n.name, add.name, bias))
    for mm_name, add_name, bias in folds:
        idx = next(i for i, m in enumerate(graph.node) if m.name == mm_name)
        mm = graph.node[idx]
        add = next(m for m in graph.node if m.name == add_name)
        gemm = onnx.helper.make_node("Gemm", [mm.input[0], mm.input[1], bias], [add.output[0]], name=mm_name)
        dead = mm.output[0]
        graph.node.remove(add)
        idx = next(i for i, m in enumerate(graph.node) if m.name == mm_name)
        del graph.node[idx]
        graph.node.insert(idx, gemm)
        for v in [v for v in graph.value_info if v.name == dead]:
            graph.value_info.remove(v)
    return len(folds)


# --------------------------------------------------------------------------- adapter
def _flatten_outputs_tensors(out) -> list:
    """Model outputs in a fixed order: dict outputs by sorted key (as tf2onnx flattens them)."""
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


def _flatten_outputs(out) -> list[np.ndarray]:
    return [np.asarray(o) for o in _flatten_outputs_tensors(out)]


def structure_inputs(model, feeds: dict[str, Any]):
    """Feeds named like the data, in the structure ``model`` is called with.

    One feed -> the bare tensor (unless the model takes a dict); a functional model
    with a list of ``keras.Input``s -> a list ordered by their names; else the dict.
    """
    struct = getattr(model, "_inputs_struct", None)
    if len(feeds) == 1 and not isinstance(struct, dict):
        return next(iter(feeds.values()))
    if isinstance(struct, (list, tuple)) and len(struct) == len(feeds):
        names = [getattr(t, "name", None) for t in struct]
        if all(n in feeds for n in names):
            return [feeds[n] for n in names]
    return dict(feeds)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("tensorflow", "keras", "tf2onnx", "onnx"):
        try:
            parts.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg}=?")
    return ",".join(parts)


class KerasAdapter(ModelAdapter):
    framework = "keras"

    def __init__(self, config: SearchConfig):
        super().__init__(config)
        self._sample: dict[str, np.ndarray] | None = None
        self._model = None

    # -- TF -----------------------------------------------------------------
    def tf(self):
        return import_tf(self.config.measure.threads)

    # -- model --------------------------------------------------------------
    def load_model(self) -> Any:
        """The trained Keras model, built by one forward pass on a calibration sample."""
        _, keras = self.tf()
        spec = self.config.model
        if spec.factory:
            from pipeline.importing import import_object

            model = import_object(spec.factory)(**spec.kwargs)
            field = "model.factory"
        else:
            path = self.config.resolve_path(spec.path)
            if path.suffix != ".keras":
                raise ConfigError(f"model.path: {path} — for Keras give a .keras file (model.save('m.keras')) "
                                  "or `factory: package.module:function` returning a keras.Model")
            if not path.exists():
                raise ConfigError(f"model.path: {path} does not exist")
            model = keras.saving.load_model(str(path))
            field = "model.path"
        if not isinstance(model, keras.Model):
            raise ConfigError(f"{field}: {spec.factory or spec.path!r} gave {type(model).__name__}, not a keras.Model "
                              "(model.framework is keras)")
        if spec.checkpoint:
            ckpt = self.config.resolve_path(spec.checkpoint)
            if not ckpt.exists():
                raise ConfigError(f"model.checkpoint: {ckpt} does not exist")
            if not ckpt.name.endswith(".weights.h5"):
                raise ConfigError(f"model.checkpoint: {ckpt} — Keras checkpoints are `.weights.h5` files "
                                  "(model.save_weights(path))")
            self._call(model, self.sample_inputs())
            model.load_weights(str(ckpt))
        policy = getattr(getattr(model, "dtype_policy", None), "name", "float32")
        if policy != "float32":
            raise ConfigError(f"{field}: the model's dtype policy is {policy!r}; the FP32 reference needs "
                              "'float32' (build it under keras.mixed_precision.set_global_policy('float32'))")
        self._call(model, self.sample_inputs())
        return model

    def sample_inputs(self) -> dict[str, np.ndarray]:
        if self._sample is None:
            ds = load_dataset(self.config.data.calibration, self.config, "data.calibration")
            self._sample = ds.fixed_batch(2)
        return self._sample

    def model_inputs(self, model, feeds: dict[str, np.ndarray]):
        """Feeds (named like the dataset) in the structure ``model`` is called with."""
        return structure_inputs(model, feeds)

    def _call(self, model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return _flatten_outputs(model(self.model_inputs(model, feeds), training=False))

    def predict(self, model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Keras outputs for one batch, flattened in ONNX output order."""
        return self._call(model, feeds)

    # -- export -------------------------------------------------------------
    def content_hash(self, model) -> str:
        h = hashlib.sha256()
        for w in model.weights:
            h.update(w.path.encode())
            h.update(np.ascontiguousarray(w.numpy()).tobytes())
        h.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
        h.update(self.config.model.model_dump_json().encode())
        sample = self.sample_inputs()
        h.update(json.dumps({k: [list(v.shape[1:]), str(v.dtype)] for k, v in sample.items()}).encode())
        h.update(_versions().encode())
        h.update(EXPORT_FORM.encode())
        return h.hexdigest()[:16]

    def export_reference(self, workdir: Path) -> ReferenceModel:
        model = self.load_model()
        digest = self.content_hash(model)
        folder = Path(workdir) / "reference" / digest
        meta_path = folder / "reference.json"
        if meta_path.exists() and (folder / "reference.onnx").exists():
            return ReferenceModel.model_validate_json(meta_path.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        ref = self._export(model, folder / "reference.onnx", digest)
        ref.layer_table.save(folder / "layers.json")
        tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(ref.model_dump_json(indent=2))
        os.replace(tmp, meta_path)
        return ref

    def export_model(self, model: Any, out_path: Path) -> ReferenceModel:
        return self._export(model, Path(out_path), digest="")

    def _signature(self, model, sample: dict[str, np.ndarray]):
        tf, _ = self.tf()

        def spec(name: str, a: np.ndarray):
            return tf.TensorSpec((None,) + tuple(a.shape[1:]), tf.as_dtype(a.dtype), name=name)

        structured = self.model_inputs(model, sample)
        if isinstance(structured, np.ndarray):
            return [spec(next(iter(sample)), structured)]
        if isinstance(structured, list):
            names = [t.name for t in model._inputs_struct]
            return [[spec(n, sample[n]) for n in names]]
        return [{k: spec(k, v) for k, v in sample.items()}]

    def _export(self, model, out_path: Path, digest: str) -> ReferenceModel:
        tf, keras = self.tf()
        sample = self.sample_inputs()
        expected = self._call(model, sample)
        n_out = len(expected)
        output_names = self.config.model.output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
        if len(output_names) != n_out:
            raise ConfigError(f"model.output_names: {len(output_names)} names for {n_out} model outputs")

        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.stem}.tmp{os.getpid()}.onnx")
        opset = self.config.model.opset
        with warnings.catch_warnings(), _quiet_stderr():
            warnings.simplefilter("ignore")
            model.export(str(tmp), format="onnx", verbose=False,
                         input_signature=self._signature(model, sample),
                         opset_version=min(opset, TF2ONNX_MAX_OPSET))
        onnx_model = onnx.load(str(tmp))
        tmp.unlink(missing_ok=True)
        if opset > TF2ONNX_MAX_OPSET:
            from onnx import version_converter

            onnx_model = version_converter.convert_version(onnx_model, opset)
        # The converter keeps tf2onnx's IR version; int4/fp8 initializers the quantizer adds need the
        # IR version that goes with the opset.
        min_ir = onnx.helper.find_min_ir_version_for(list(onnx_model.opset_import), ignore_unknown=True)
        onnx_model.ir_version = max(onnx_model.ir_version, min_ir)

        graph = onnx_model.graph
        # Inputs: named like the dataset (tf2onnx uses the TensorSpec names; make sure).
        onnx_inputs = [i.name for i in graph.input if i.name not in {x.name for x in graph.initializer}]
        for name in onnx_inputs:
            base = name.split(":")[0]
            if base != name and base in sample:
                _rename_tensor(graph, name, base)
        onnx_inputs = [i.name for i in graph.input if i.name not in {x.name for x in graph.initializer}]
        if sorted(onnx_inputs) != sorted(sample):
            raise RuntimeError(f"Keras ONNX export: graph inputs {onnx_inputs} do not match the data's inputs "
                               f"{list(sample)}; name the keras.Input layers like the data keys")
        for o, new in zip(list(graph.output), output_names):
            _rename_tensor(graph, o.name, new)
        folded = fold_dense_bias(onnx_model)
        if folded:
            log.debug("Keras ONNX export: %d Dense MatMul + Add pair(s) folded into Gemm", folded)
        table = build_layer_table(onnx_model, enumerate_layers(model, keras))
        table.unquantized = enumerate_unquantized(model, keras)
        onnx.checker.check_model(onnx_model)
        self._check_parity(onnx_model, sample, expected, output_names)
        onnx.save(onnx_model, str(tmp))
        os.replace(tmp, out_path)
        return ReferenceModel(onnx_path=str(out_path), layer_table=table, input_names=list(sample),
                              output_names=output_names, content_hash=digest, framework="keras")

    @staticmethod
    def _check_parity(onnx_model, sample, expected: list[np.ndarray], output_names: list[str]) -> None:
        """The exported graph must compute what Keras computes (fp32 round-off aside)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = sess.run(output_names, sample)
        for name, g, e in zip(output_names, got, expected):
            g = np.asarray(g, dtype=np.float64)
            e = np.asarray(e, dtype=np.float64).reshape(g.shape) if e.size == g.size else e
            if g.shape != np.shape(e):
                raise RuntimeError(f"Keras ONNX export: output {name!r} has shape {g.shape}, Keras gives {np.shape(e)}")
            scale = max(1.0, float(np.abs(e).max()))
            err = float(np.abs(g - e).max())
            if err > 1e-4 * scale:
                raise RuntimeError(f"Keras ONNX export: output {name!r} differs from Keras by {err:.3g} "
                                   "(the exporter changed the computation; please report this model)")
