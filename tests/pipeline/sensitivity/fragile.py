"""A digits MLP with one deliberately fragile layer (a real model, not a mock).

``fc1`` gets an outlier weight 8x its largest one on input pixels 0 and 32, which are zero in
every digits image: the model computes exactly what it did, but every int4 block of 32 along
fc1's inputs now holds an outlier, so its scale (outlier / -8) rounds the real weights to 0 and
INT4 ruins the layer, while a per-channel int8 scale keeps 16 levels per original max.
"""

from __future__ import annotations

OUTLIER_PIXELS = (0, 32)  # constant zero in the digits train/calibration/eval splits


def fragile_mlp():
    import torch

    from pipeline.examples.digits import mlp

    model = mlp()
    with torch.no_grad():
        w = model.fc1.weight  # [out, in]: ONNX Gemm(transB=1) keeps this layout, blocks run along "in"
        big = 8 * w.abs().max()
        for px in OUTLIER_PIXELS:
            w[:, px] = big
    return model
