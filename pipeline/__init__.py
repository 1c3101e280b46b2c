"""precision-search: measured, per-layer, multi-objective precision search.

The package is organised one concept per module (see README "Design"):
formats and plans (what a candidate is), config (what the user asked for),
models (framework adapters that produce the FP32 ONNX reference and its layer
table), exporters (the one ONNX quantizer that defines deployed numerics),
backends/measure/energy (how a candidate is measured), study/pareto/tracking
(the search and its record), registry (promotion).
"""

__version__ = "0.1.0"
