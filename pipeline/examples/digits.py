"""PyTorch models on scikit-learn's 8x8 digits: an MLP and a small CNN.

The factories train in a few seconds on first use and cache the weights (a
state dict, reloaded with ``weights_only=True``) so that later runs, Ray
workers and tests all see the same model. Data functions return
``(inputs, targets)``: the contract of ``data.*.source`` in configs.

Split: a fixed, stratified 60/20/20 train/calibration/eval split of the 1,797
images, so calibration never sees eval rows.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np

# Example weights, trained once per machine: $PRECISION_SEARCH_CACHE, else $XDG_CACHE_HOME/precision-search,
# else ~/.cache/precision-search (README "make search").
CACHE_DIR = Path(os.environ.get("PRECISION_SEARCH_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "precision-search")


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    x_cal, x_eval, y_cal, y_eval = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest)
    return {"train": (x_train, y_train), "calibration": (x_cal, y_cal), "eval": (x_eval, y_eval)}


def _shape(x: np.ndarray, image: bool) -> np.ndarray:
    return x.reshape(-1, 1, 8, 8) if image else x


def train_data(image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = _splits()["train"]
    return _shape(x, image), y


def calibration_data(image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = _splits()["calibration"]
    return _shape(x, image), y


def eval_data(image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = _splits()["eval"]
    return _shape(x, image), y


def _build_mlp(hidden: int = 256):
    import torch.nn as nn

    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, hidden), act1=nn.ReLU(),
        fc2=nn.Linear(hidden, hidden), act2=nn.ReLU(),
        fc3=nn.Linear(hidden, hidden // 2), act3=nn.ReLU(),
        fc4=nn.Linear(hidden // 2, 10),
    ))


def _build_cnn():
    import torch.nn as nn

    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 32, 3, padding=1), act1=nn.ReLU(),
        conv2=nn.Conv2d(32, 64, 3, padding=1), act2=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        conv3=nn.Conv2d(64, 64, 3, padding=1), act3=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(64 * 4 * 4, 128), act4=nn.ReLU(),
        fc2=nn.Linear(128, 10),
    ))


def _train(model, image: bool, epochs: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    x, y = train_data(image)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def _cached(name: str, build, image: bool, epochs: int, checkpoint: str | None):
    import torch

    path = Path(checkpoint) if checkpoint else CACHE_DIR / f"{name}_v2.pt"  # v2: seeded initial weights
    torch.manual_seed(0)  # the initial weights too: every machine trains the same example model
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    _train(model, image, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: parallel workers never read a half-written file
    return model


def mlp(checkpoint: str | None = None, hidden: int = 256):
    """4-layer MLP, ~97% on the eval split after ~3 s of training."""
    return _cached(f"digits_mlp_{hidden}", lambda: _build_mlp(hidden), image=False, epochs=30, checkpoint=checkpoint)


def cnn(checkpoint: str | None = None):
    """3 conv + 2 linear layers, ~98% on the eval split after ~15 s of training."""
    return _cached("digits_cnn", _build_cnn, image=True, epochs=12, checkpoint=checkpoint)


# Config-friendly data entry points (import strings cannot pass booleans positionally).
def mlp_calibration():
    return calibration_data(image=False)


def mlp_eval():
    return eval_data(image=False)


def mlp_train():
    return train_data(image=False)


def cnn_calibration():
    return calibration_data(image=True)


def cnn_eval():
    return eval_data(image=True)


def cnn_train():
    return train_data(image=True)
