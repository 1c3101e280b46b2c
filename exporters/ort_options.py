"""The ONNX Runtime session options an artifact is run with: one definition for the quantizer's
load check (``exporters.onnx_quant``) and for the ORT backends' sessions
(:mod:`pipeline.backends.ort.session`), so an artifact that passes the check loads the way it is
measured. Kept in ``exporters`` because the quantizer may not import the backends."""

from __future__ import annotations

WEIGHT_ONLY_ACCURACY_LEVEL = ("session.qdq_matmulnbits_accuracy_level", "0")
"""ORT fuses DequantizeLinear(int4) + MatMul (the quantizer's ``tensorrt`` target form) into
MatMulNBits with this accuracy level, 4 by default: int8 activations on the CPU, which is not the
weight-only fp32-activation layer the graph (and the report) describe. 0 keeps it weight-only. The
``ort`` target writes MatMulNBits itself without the attribute (also 0), so nothing else changes."""


def session_options(threads: int = 0):
    """ORT session options for running an artifact as its report describes it (see :class:`OrtSession`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry(*WEIGHT_ONLY_ACCURACY_LEVEL)
    return opts
