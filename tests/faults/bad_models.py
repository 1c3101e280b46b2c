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



def eval_inputs():
    """The digits eval rows alone (their targets come from data.targets)."""
    from pipeline.examples.digits import mlp_eval

    return mlp_eval()[0]


def short_targets():
    """Targets for only the first 50 eval rows: every score of the reference fails."""
    from pipeline.examples.digits import mlp_eval

    return mlp_eval()[1][:50]


def two_input_mlp():
    """A two-input model: forward(left, right)."""
    import torch

    class TwoInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 10), torch.nn.Linear(32, 10)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    return TwoInput()


def split_rows():
    """The digits rows split in two inputs whose keys are not named like forward()'s parameters."""
    from pipeline.examples.digits import mlp_eval

    x, y = mlp_eval()
    return {"first": x[:, :32], "second": x[:, 32:]}, y
