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
