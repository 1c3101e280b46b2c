"""Model factories and data sources for the bad-input tests (imported by the CLI through config import strings)."""

from __future__ import annotations

import numpy as np


def raising():
    raise RuntimeError("the factory could not find its weights")


def other_arch():
    """A small CNN: a checkpoint of the digits MLP does not fit it."""
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))


def mlp_checkpoint(path: str) -> None:
    import torch

    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 7)).state_dict(), path)


def empty_eval():
    return np.zeros((0, 64), dtype=np.float32), np.zeros((0,), dtype=np.int64)
