"""Small torch models whose exports fold, fuse or group their layers (used by the layer-table tests).

Each builder returns a model in eval mode with non-trivial BatchNorm statistics (a freshly built
BatchNorm has mean 0, var 1, gamma 1, so folding it would leave the conv weight almost unchanged
and hide the problem), plus the input shape of one sample.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


def conv_bn_cnn() -> tuple[nn.Module, tuple[int, ...]]:
    """3 x (Conv + BatchNorm + ReLU), then a Linear head: the model of issue 14."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(16), act1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1, bias=False), bn2=nn.BatchNorm2d(32), act2=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        conv3=nn.Conv2d(32, 32, 3, padding=1), bn3=nn.BatchNorm2d(32), act3=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(32, 10),
    ))
    return _randomise_norms(m), (1, 8, 8)


class _DepthwiseSeparable(nn.Module):
    """MobileNet block: depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN + ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.dw_bn = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.act(self.pw_bn(self.pw(self.act(self.dw_bn(self.dw(x))))))


def mobilenet_block() -> tuple[nn.Module, tuple[int, ...]]:
    """Stem conv + BN, two depthwise-separable blocks, a grouped conv, a Linear head."""
    torch.manual_seed(1)
    m = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(1, 8, 3, padding=1, bias=False), stem_bn=nn.BatchNorm2d(8), stem_act=nn.ReLU6(),
        block1=_DepthwiseSeparable(8, 16),
        block2=_DepthwiseSeparable(16, 32, stride=2),
        grouped=nn.Conv2d(32, 32, 3, padding=1, groups=4), grouped_bn=nn.BatchNorm2d(32), grouped_act=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        head=nn.Linear(32, 10),
    ))
    return _randomise_norms(m), (1, 8, 8)


class _Residual(nn.Module):
    """ResNet basic block with a 1x1 projection shortcut (conv + BN on both branches)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def residual_net() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(2)
    m = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(1, 8, 3, padding=1), stem_bn=nn.BatchNorm2d(8), relu=nn.ReLU(),
        res1=_Residual(8, 16), res2=_Residual(16, 16),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(16, 10),
    ))
    return _randomise_norms(m), (1, 8, 8)


class _LnGeluMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.ln1 = nn.LayerNorm(128)
        self.fc2 = nn.Linear(128, 128)
        self.ln2 = nn.LayerNorm(128)
        self.head = nn.Linear(128, 10)
        self.gelu = nn.GELU()

    def forward(self, x):
        h = self.gelu(self.ln1(self.fc1(x)))
        h = h + self.gelu(self.ln2(self.fc2(h)))  # pre-head residual
        return self.head(h)


def ln_gelu_mlp() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(3)
    m = _LnGeluMlp()
    with torch.no_grad():
        for ln in (m.ln1, m.ln2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.1, 0.1)
    return m.eval(), (64,)


def linear_bn_mlp() -> tuple[nn.Module, tuple[int, ...]]:
    """Linear + BatchNorm1d: the exporter folds the norm into the Gemm the same way."""
    torch.manual_seed(4)
    m = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 64), bn=nn.BatchNorm1d(64), act=nn.ReLU(), fc2=nn.Linear(64, 10)))
    return _randomise_norms(m), (64,)


ZOO = {"conv_bn_cnn": conv_bn_cnn, "linear_bn_mlp": linear_bn_mlp, "mobilenet_block": mobilenet_block, "residual_net": residual_net,
       "ln_gelu_mlp": ln_gelu_mlp}
