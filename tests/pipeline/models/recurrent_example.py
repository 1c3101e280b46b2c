"""A model no bundled example looks like, for tests that use the product as a new user would: two inputs
(a numeric series and a categorical id), a Conv1d, a GRU (not quantizable), a LayerNorm, and a regression
head scored by a custom metric (R^2). Trained for a few steps, seeded, so the metric means something."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SeriesNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.cat = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.gru = nn.GRU(16, 24, batch_first=True)
        self.norm = nn.LayerNorm(40)
        self.mix = nn.Linear(40, 64)
        self.head = nn.Linear(64, 1)

    def forward(self, series, cat_id):
        h = torch.relu(self.conv(series))
        out, _ = self.gru(h.transpose(1, 2))
        z = self.norm(torch.cat([out[:, -1], self.cat(cat_id)], dim=1))
        return self.head(torch.relu(self.mix(z))).squeeze(1)


def _data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    series = rng.standard_normal((n, 4, 12)).astype(np.float32)
    cat = rng.integers(0, 50, size=(n,)).astype(np.int64)
    y = (series[:, 0, -3:].sum(1) + 0.05 * cat - series[:, 2].mean(1)).astype(np.float32)
    return {"series": series, "cat_id": cat}, y


def build() -> SeriesNet:
    torch.manual_seed(0)
    m = SeriesNet()
    x, y = _data(1024, 0)
    xs, xc, yt = torch.from_numpy(x["series"]), torch.from_numpy(x["cat_id"]), torch.from_numpy(y)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(60):
        loss = ((m(xs, xc) - yt) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def calibration():
    return _data(128, 1)


def evaluation():
    return _data(256, 2)


def r2(outputs, targets) -> float:
    pred = np.asarray(next(iter(outputs.values()))).reshape(-1)
    t = np.asarray(targets).reshape(-1)
    return float(1 - ((pred - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())
