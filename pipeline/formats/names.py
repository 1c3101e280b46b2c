"""Realisation names (the ONNX graph forms ``exporters.onnx_quant`` records per layer), gathered
from the family modules that declare them, for code that names a form directly."""

from pipeline.formats.bf16 import CAST_BF16
from pipeline.formats.fp8 import DQ_GATHER_FP8, GATHER_FP8, QDQ_FP8
from pipeline.formats.fp32 import FP32
from pipeline.formats.int4 import DQ_GATHER_INT4, GATHER_INT4, MATMULNBITS_INT4, QDQ_INT4
from pipeline.formats.int8 import DQ_GATHER_INT8, DYNAMIC_INT8, GATHER_INT8, QDQ_INT8

__all__ = ["CAST_BF16", "DQ_GATHER_FP8", "DQ_GATHER_INT4", "DQ_GATHER_INT8", "DYNAMIC_INT8", "FP32", "GATHER_FP8",
           "GATHER_INT4", "GATHER_INT8", "MATMULNBITS_INT4", "QDQ_FP8", "QDQ_INT4", "QDQ_INT8"]
