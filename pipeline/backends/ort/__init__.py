"""ONNX Runtime backends: sessions (``session``), kernel observation (``kernels``), CPU (``cpu``) and NVIDIA GPUs (``cuda``)."""
