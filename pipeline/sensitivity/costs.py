"""Each layer's share of the model's weight size and (estimated) latency.

Size: ``params x 32`` bits over all quantizable layers' FP32 weight bits (bias, norms and other
fp32 tensors are left out: plans cannot change them). Latency: an estimate, the layer's share of
multiply-accumulates per sample, taken from the output shapes the probe run observed (so it
counts a Conv's spatial positions and a transformer's sequence length); where no shape was
observed, the layer table's MACs, and where those are missing too, parameters. The label says
which was used; it is never a timing.
"""

from __future__ import annotations

from pipeline.layers import LayerTable
from pipeline.sensitivity.probe import ProbeResult
from pipeline.sensitivity.table import LayerCost

LATENCY_FROM_SHAPES = "estimate: share of multiply-accumulates per sample (from output shapes observed on the FP32 reference)"
LATENCY_FROM_PARAMS = "estimate: share of parameters (MACs unknown for some layers)"


def layer_costs(table: LayerTable, probe: ProbeResult | None) -> tuple[list[LayerCost], str]:
    total_params = max(table.total_params(), 1)
    macs: dict[str, int | None] = {}
    for layer in table:
        p = probe.layers.get(layer.name) if probe else None
        macs[layer.name] = p.macs_per_sample if p and p.macs_per_sample is not None else layer.macs
    known = all(v is not None for v in macs.values()) and sum(macs.values()) > 0
    total_macs = sum(macs.values()) if known else 0
    label = LATENCY_FROM_SHAPES if known else LATENCY_FROM_PARAMS
    costs = [
        LayerCost(layer=l.name, kind=l.kind, onnx_op=l.onnx_op, params=l.params, macs=macs[l.name],
                  size_share=l.params / total_params,
                  latency_share=(macs[l.name] / total_macs) if known else l.params / total_params)
        for l in table
    ]
    return costs, label
