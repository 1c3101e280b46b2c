"""Exporters: turn an FP32 reference plus a per-layer plan into deployable artifacts.

``exporters.onnx_quant`` is the one quantizer (ONNX in, quantized ONNX out) that every
runtime-specific exporter starts from, and ``exporters.numerics`` states the numbers it
writes, for the tests and for QAT fake-quant to mirror.
"""
