"""Keras 3 (TensorFlow backend) adapter: model -> FP32 ONNX reference + layer table.

Exporter: Keras 3's own ``model.export(path, format="onnx")``. On the TensorFlow
backend it traces the model into a ``tf.function`` and converts it with tf2onnx
(1.17, which Keras patches for NumPy 2), so it is the maintained path and needs
no private glue here. tf2onnx stops at opset 18; the exported graph is brought to
the configured ``model.opset`` (default 21, what the quantizer needs for mixed
INT4/FP8) with ``onnx.version_converter``, and checked against Keras' own outputs.

Layer table: :mod:`pipeline.models.keras_layers` (every Dense/EinsumDense/Conv/Embedding
tied to one ONNX node and weight, BatchNorm folding followed). TensorFlow itself is imported
lazily through :mod:`pipeline.models.keras_tf` (quiet logs, bounded thread pools).

In-memory models: ``KerasAdapter(config, model=keras_model)`` exports a model that lives in a
notebook; the calibration sample still sets the input signature unless ``sample_inputs`` is given.

Dense on a 2-D input: tf2onnx writes ``MatMul`` + a float bias ``Add``; the export folds the
pair into one ``Gemm(x, W, b)`` (:func:`fold_dense_bias`), the form PyTorch's exporter writes
for ``nn.Linear``. Not a cosmetic change: ONNX Runtime's session-time ``MatMulAddFusion`` makes
that very Gemm anyway, and for an int8-static or fp8 Dense followed by a quantized layer its
``WeightBiasQuantization`` then rounded the float bias to int32 - the deployed model was not
the written one (nor what Keras QAT trained). As a Gemm in the file, the quantizer writes the
int32 bias itself (``exporters.quant.ort_passes``), QAT mirrors it, and ORT finds nothing to
change. A Dense on a 3-D or larger input stays MatMul + Add (Gemm is 2-D only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.config import ConfigError, SearchConfig
from pipeline.data import load_dataset
from pipeline.models.base import ModelAdapter, ReferenceModel
from pipeline.models.keras_layers import (  # noqa: F401 - re-exported: QAT and TFLite import them from here
    _rename_tensor,
    _walk,
    build_layer_table,
    enumerate_layers,
    enumerate_unquantized,
)
from pipeline.models.keras_tf import _quiet_stderr, import_tf  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

TF2ONNX_MAX_OPSET = 18  # tf2onnx 1.17: "Opset 21 is not supported yet"
EXPORT_FORM = "dense-gemm-folded-v2"
"""Version of the graph rewrites done after tf2onnx and of the layer-table rules (part of the
content hash, so a cached reference written by an older adapter is re-exported rather than reused)."""


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


def _copy_model(model, keras):
    """A copy of an in-memory model with the same weights, so QAT fine-tuning never changes the
    caller's model: ``clone_model`` (functional/sequential), else a deep copy (subclassed)."""
    import copy

    if not isinstance(model, keras.Model):
        return model  # refused by the caller with the field's name
    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        return clone
    except Exception:  # noqa: BLE001 - subclassed models without get_config
        try:
            return copy.deepcopy(model)
        except Exception:  # noqa: BLE001
            log.warning("could not copy the in-memory Keras model; QAT would fine-tune the caller's model itself")
            return model


class KerasAdapter(ModelAdapter):
    framework = "keras"

    def __init__(self, config: SearchConfig, model: Any = None, sample_inputs: Any = None):
        super().__init__(config)
        self._sample: dict[str, np.ndarray] | None = None
        self._model = None
        self._given = model  # an in-memory keras.Model (checked when first used: TF loads lazily)
        if sample_inputs is not None:
            from pipeline.models.torch_adapter import normalise_sample

            self._sample = normalise_sample(sample_inputs, "sample_inputs")

    # -- TF -----------------------------------------------------------------
    def tf(self):
        return import_tf(self.config.measure.threads)

    # -- model --------------------------------------------------------------
    def load_model(self) -> Any:
        """The trained Keras model, built by one forward pass on a calibration sample."""
        _, keras = self.tf()
        spec = self.config.model
        if self._given is not None:
            model, field = _copy_model(self._given, keras), "model"
        elif spec.factory:
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
            raise ConfigError(f"{field}: {'the in-memory model' if self._given is not None else spec.factory or spec.path!r} gave {type(model).__name__}, not a keras.Model "
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
        raw = model(self.model_inputs(model, sample), training=False)
        expected = _flatten_outputs(raw)
        n_out = len(expected)
        # A model that returns a dict names its outputs (flattened by sorted key, as tf2onnx does): metric.output
        # can then say "parity", as with a PyTorch model returning a dict.
        default = ([str(k) for k in sorted(raw)] if isinstance(raw, dict) else
                   ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
        output_names = self.config.model.output_names or default
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
        norms = [layer.name for layer in _walk(model, set()) if "Normalization" in type(layer).__name__]
        table = build_layer_table(onnx_model, enumerate_layers(model, keras), norms)
        table.unquantized = enumerate_unquantized(model, keras, table)
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
