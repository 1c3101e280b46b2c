"""Building blocks of :mod:`exporters.onnx_quant`: graph surgery, calibration feeds,
the ONNX Runtime quantizer passes, and the hand-written forms ORT lacks."""
