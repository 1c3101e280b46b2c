"""The layer table: one row per quantizable layer of a model.

It ties a framework layer name (what users write in plans) to exactly one ONNX
weight initializer and exactly one ONNX node in the FP32 reference graph. The
quantizer, QAT and every report work through this table, so a layer that maps
to zero or several ONNX nodes is a bug the adapters must refuse, not paper over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

LayerKind = Literal["linear", "conv", "matmul", "embedding"]


class Layer(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # framework name, e.g. "encoder.layers.0.linear1" or Keras "dense_1"
    kind: LayerKind
    module_type: str  # e.g. "Linear", "Conv2d", "Embedding", "Dense"
    onnx_node: str  # name of the ONNX node computing the layer (Gemm/MatMul/Conv/Gather)
    onnx_op: str  # its op_type
    weight: str  # name of the ONNX initializer holding the weight
    weight_shape: tuple[int, ...]  # shape of that initializer as stored in ONNX
    params: int  # number of weight elements (bias excluded)
    macs: int | None = None  # multiply-accumulates per sample, where known
    # The framework module the exporter folded into this layer's weight (a BatchNorm after a
    # conv: the ONNX weight is W*gamma/sqrt(var+eps), so it is what gets quantized), if any.
    folded: str | None = None


class UnquantizedModule(BaseModel):
    """A framework module holding parameters that no quantizable layer covers: it stays fp32.

    Listed so a user sees where the rest of the model's weights are (a GRU, the norms, a custom
    parameter) instead of a parameter count that silently leaves them out."""

    name: str
    module_type: str
    params: int
    reason: str


QUANTIZABLE_KINDS_TEXT = "Linear/Dense, Conv1d/Conv2d, Embedding, attention projections"


def unquantized_reason(module_type: str) -> str:
    """Why a module type with parameters is not in the layer table (one line, for reports)."""
    if "Norm" in module_type:
        return "normalisation: kept fp32 (a per-channel scale and shift, cheap next to the matmuls)"
    if module_type.upper() in ("GRU", "LSTM", "RNN", "SIMPLERNN", "GRUCELL", "LSTMCELL", "RNNCELL"):
        return "recurrent layer (ONNX GRU/LSTM/RNN op): no quantized form here, stays fp32"
    return f"no quantized form here (quantizable: {QUANTIZABLE_KINDS_TEXT}), stays fp32"


class LayerTable(BaseModel):
    layers: list[Layer]
    # Framework layers with no weight left in the exported graph (unused in forward, or
    # constant-folded by the exporter); listed so reports can say why they are absent.
    skipped: list[str] = []
    # Modules with parameters outside every quantizable layer (norms, recurrent layers, ...).
    unquantized: list[UnquantizedModule] = []

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> Layer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def total_params(self) -> int:
        """Weights of the quantizable layers (what plans can change)."""
        return sum(l.params for l in self.layers)

    def unquantized_params(self) -> int:
        return sum(m.params for m in self.unquantized)

    def quantizable_share(self) -> float:
        """Fraction of the model's parameters a plan can change (1.0 when nothing is left fp32)."""
        total = self.total_params() + self.unquantized_params()
        return self.total_params() / total if total else 0.0

    def describe(self) -> str:
        """A readable listing: one line per layer, what stays fp32, and the params share."""
        lines = [f"{'layer':<28} {'kind':<9} {'op':<7} {'params':>10}  note"]
        for l in self.layers:
            note = f"{l.folded} folded in" if l.folded else ""
            lines.append(f"{l.name:<28} {l.kind:<9} {l.onnx_op:<7} {l.params:>10,}  {note}".rstrip())
        for m in self.unquantized:
            lines.append(f"{m.name:<28} {'fp32':<9} {'-':<7} {m.params:>10,}  {m.module_type}: {m.reason}")
        q, rest = self.total_params(), self.unquantized_params()
        lines.append(f"{len(self.layers)} quantizable layers, {q:,} params"
                     + (f" ({100 * q / (q + rest):.1f}% of {q + rest:,})" if rest else ""))
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "LayerTable":
        return cls.model_validate(json.loads(Path(path).read_text()))


def choose_candidate(candidates: list[int], in_scope: Callable[[int], bool], taken: dict[int, int]) -> int:
    """Pick which framework layer an ONNX node's weight belongs to (both adapters use this).

    ``candidates`` are the layers whose weight equals the node's initializer (deep-copied
    layers can be equal); prefer those whose name scope contains the node, then those not
    yet mapped. Counts the choice in ``taken`` (a layer used twice maps twice).
    """
    pool = [c for c in candidates if in_scope(c)] or candidates
    free = [c for c in pool if c not in taken]
    chosen = free[0] if free else pool[0]
    taken[chosen] = taken.get(chosen, 0) + 1
    return chosen


SKIPPED_REASON = ("not quantizable: its weight is not in the exported graph (unused in forward/call, "
                  "or computed away by the exporter), stays fp32")


def folded_reason(layer: str) -> str:
    return (f"normalisation folded by the exporter into {layer}'s weight and bias "
            "(quantized with it; its own parameters are gone from the graph)")


def scaled_axis(onnx_w: np.ndarray, ref: np.ndarray, rtol: float = 1e-3) -> int | None:
    """The axis along which ``onnx_w`` is ``ref`` times one scale per slice, or None.

    That is how an exporter folds a following normalisation into a layer: Conv+BatchNorm
    becomes ``W[o] * gamma[o] / sqrt(var[o] + eps)`` (axis 0 for Conv/Gemm, 1 for ConvTranspose).
    A copy (all scales 1) matches too. Used to tie a rewritten weight back to its layer by
    structure where the bytes changed; shapes must agree exactly.
    """
    a = np.asarray(onnx_w, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape or a.ndim == 0 or a.size == 0:
        return None
    tol = rtol * max(float(np.abs(a).max()), 1e-12)
    for axis in range(a.ndim):
        am = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
        bm = np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1)
        if bm.shape[1] < 2:  # one value per slice: any vector "scales"; no evidence either way
            continue
        denom = (bm * bm).sum(axis=1)
        if np.any(denom == 0) and np.any(np.abs(am[denom == 0]) > tol):
            continue
        scale = np.where(denom > 0, (am * bm).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
        if np.all(np.abs(am - scale[:, None] * bm) <= tol + rtol * np.abs(am)):
            return axis
    return None


ONNX_WEIGHT_INPUTS = {"Gemm": (1,), "MatMul": (1, 0), "Conv": (1,), "Gather": (0,)}
_ONNX_KINDS = {"Gemm": "linear", "MatMul": "matmul", "Conv": "conv", "Gather": "embedding"}


def table_from_onnx(model) -> LayerTable:
    """The layer table of a plain ONNX model (no framework model to name layers after).

    One row per Gemm/MatMul/Conv/Gather node whose weight is a float initializer of rank >= 2,
    named after the weight (``conv1.weight`` -> ``conv1``, as torch and most exporters name
    parameters) or else the node. An initializer feeding several such nodes is copied so each
    node owns its weight (``model`` is changed in place: save it before quantizing). Parameters
    outside these rows are not counted (the graph does not say which module owns them).
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    layers: list[Layer] = []
    seen_weights: dict[str, int] = {}
    used_names: set[str] = set()
    for k, node in enumerate(graph.node):
        for pos in ONNX_WEIGHT_INPUTS.get(node.op_type, ()):
            if pos >= len(node.input) or node.input[pos] not in inits:
                continue
            init = inits[node.input[pos]]
            if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(init.dims) < 2:
                continue
            weight = node.input[pos]
            seen_weights[weight] = seen_weights.get(weight, 0) + 1
            if seen_weights[weight] > 1:  # un-tie: this node gets its own copy
                copy = numpy_helper.from_array(numpy_helper.to_array(init), f"{weight}__untied{seen_weights[weight]}")
                graph.initializer.append(copy)
                node.input[pos] = weight = copy.name
            if not node.name:
                node.name = f"{node.op_type}_{k}"
            base = node.input[pos].removesuffix(".weight") if node.input[pos].endswith(".weight") else node.name
            name, n = base, 1
            while name in used_names:
                n += 1
                name = f"{base}#{n}"
            used_names.add(name)
            shape = tuple(int(d) for d in init.dims)
            layers.append(Layer(name=name, kind=_ONNX_KINDS[node.op_type], module_type=f"onnx.{node.op_type}",
                                onnx_node=node.name, onnx_op=node.op_type, weight=weight, weight_shape=shape,
                                params=int(np.prod(shape))))
            break
    return LayerTable(layers=layers)
