"""Native TensorRT: the plugin (``plugin``) and the engine build + timed session (``engine``)."""
