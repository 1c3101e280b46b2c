"""Conv + BatchNorm CNNs on scikit-learn's 8x8 digits: the shape of ResNet/MobileNet stems.

``bn_cnn``: three Conv + BatchNorm + ReLU blocks and a Linear head. ``separable_cnn``: a
MobileNet-style stem and two depthwise-separable blocks (depthwise 3x3 + BN + ReLU6, pointwise
1x1 + BN + ReLU6). The exporter folds every BatchNorm into the conv before it, so these are the
examples where layer discovery must follow folding (issue 14): every conv must stay searchable.

Weights are trained on first use and cached like :mod:`pipeline.examples.digits` (seeded, so every
machine gets the same model); the data entry points are that module's image-shaped splits.
"""

from __future__ import annotations

from collections import OrderedDict

from pipeline.examples.digits import _cached


def _build_bn_cnn():
    import torch.nn as nn

    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(16), act1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1, bias=False), bn2=nn.BatchNorm2d(32), act2=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        conv3=nn.Conv2d(32, 64, 3, padding=1, bias=False), bn3=nn.BatchNorm2d(64), act3=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(64, 10),
    ))


def _separable(cin: int, cout: int, stride: int):
    import torch.nn as nn

    return nn.Sequential(OrderedDict(
        dw=nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), dw_bn=nn.BatchNorm2d(cin),
        dw_act=nn.ReLU6(),
        pw=nn.Conv2d(cin, cout, 1, bias=False), pw_bn=nn.BatchNorm2d(cout), pw_act=nn.ReLU6(),
    ))


def _build_separable_cnn():
    import torch.nn as nn

    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(1, 16, 3, padding=1, bias=False), stem_bn=nn.BatchNorm2d(16), stem_act=nn.ReLU6(),
        block1=_separable(16, 32, 1),
        block2=_separable(32, 64, 2),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(64, 10),
    ))


def bn_cnn(checkpoint: str | None = None):
    """3 x (Conv + BatchNorm + ReLU) + Linear, ~97% on the eval split after a few seconds of training."""
    return _cached("digits_bn_cnn", _build_bn_cnn, image=True, epochs=10, checkpoint=checkpoint)


def separable_cnn(checkpoint: str | None = None):
    """Stem + 2 depthwise-separable blocks + Linear (5 convs, all followed by BatchNorm)."""
    return _cached("digits_separable_cnn", _build_separable_cnn, image=True, epochs=10, checkpoint=checkpoint)
