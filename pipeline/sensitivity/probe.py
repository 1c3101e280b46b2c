"""One instrumented run of the FP32 reference: each layer's input activations and output shape.

Both the cheap proxy (weight error weighted by how strongly each input channel is driven) and
the latency-share estimate (multiply-accumulates from the real output shapes, where the layer
table has no MACs for convolutions or sequence models) need what flows through each layer's
ONNX node. Reading that from ONNX Runtime on a few calibration batches is general: any model
the exporter wrote, any input shape, no framework hooks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.layers import LayerTable

MAX_PROBE_BATCHES = 4


@dataclass
class LayerProbe:
    name: str
    op: str
    activation: str | None  # the ONNX tensor feeding the layer (None: a Gather's indices)
    channel_ms: np.ndarray | None = None  # mean x^2 per input channel over the probe rows
    absmax: float = 0.0  # max |x| of the input over the probe rows (a minmax int8/fp8 activation range)
    lo: float = 0.0  # min(x, 0) and max(x, 0): the range dynamic int8 scales by
    hi: float = 0.0
    macs_per_sample: int | None = None  # from the observed output shape
    trans_b: bool = False  # Gemm's transB: weight stored [N, K]
    group: int = 1  # Conv groups


@dataclass
class ProbeResult:
    layers: dict[str, LayerProbe] = field(default_factory=dict)
    rows: int = 0
    note: str = ""


def _attr(node, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def probe_reference(onnx_path: str | Path, table: LayerTable, feeds: list[dict[str, np.ndarray]]) -> ProbeResult:
    """Run ``onnx_path`` on ``feeds`` (at most :data:`MAX_PROBE_BATCHES`) with every layer's input
    activation and output exposed as graph outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    by_name = {n.name: n for n in model.graph.node}
    existing = {o.name for o in model.graph.output}
    probes: dict[str, LayerProbe] = {}
    extra: list[str] = []
    for layer in table:
        node = by_name.get(layer.onnx_node)
        if node is None:
            continue
        act = None
        if layer.onnx_op != "Gather":
            act = next((i for i in node.input if i and i != layer.weight), None)
        p = LayerProbe(layer.name, layer.onnx_op, act, trans_b=bool(_attr(node, "transB", 0)),
                       group=_attr(node, "group", 1))
        probes[layer.name] = p
        for t in (act, node.output[0]):
            if t and t not in existing and t not in extra:
                extra.append(t)
    model.graph.output.extend([onnx.ValueInfoProto(name=t) for t in extra])
    result = ProbeResult(layers=probes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_500_000_000)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's tensors
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for feed in feeds[:MAX_PROBE_BATCHES]:
            outs = dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted})))
            batch = next(iter(feed.values())).shape[0]
            result.rows += batch
            for layer in table:
                p = probes.get(layer.name)
                if p is None:
                    continue
                node = by_name[layer.onnx_node]
                out = outs.get(node.output[0])
                if out is not None and p.macs_per_sample is None:
                    p.macs_per_sample = _macs(layer.params, layer.onnx_op, np.asarray(out).shape, batch)
                if p.activation and p.activation in outs:
                    x = np.asarray(outs[p.activation], dtype=np.float64)
                    if x.size:
                        p.lo, p.hi = min(p.lo, float(x.min())), max(p.hi, float(x.max()))
                        p.absmax = max(p.absmax, -p.lo, p.hi)
                    axis = 1 if layer.onnx_op == "Conv" else x.ndim - 1
                    x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
                    sums[layer.name] = sums.get(layer.name, 0) + (x * x).sum(axis=0)
                    counts[layer.name] = counts.get(layer.name, 0) + x.shape[0]
        for n, s in sums.items():
            probes[n].channel_ms = s / max(counts[n], 1)
    return result


def _macs(params: int, op: str, out_shape: tuple[int, ...], batch: int) -> int:
    """Multiply-accumulates per sample: each weight is used once per output position.

    Output positions = output elements / (batch x output channels): 1 for a Gemm, the sequence
    length for a transformer MatMul, H x W for a Conv. A Gather (lookup) does no MACs.
    """
    if op == "Gather" or not out_shape:
        return 0
    channels = out_shape[1] if op == "Conv" and len(out_shape) > 1 else out_shape[-1]
    positions = int(np.prod(out_shape)) // max(batch * channels, 1)
    return int(params * max(positions, 1))
