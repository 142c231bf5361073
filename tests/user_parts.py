"""Parts a user might write, good and bad, for tests/test_extending.py (imported by path, e.g.
``model.name: user_parts:bn_mlp``; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class BNMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: a model with float and integer buffers."""

    def __init__(self, d: int, classes: int, hidden: int = 8):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


def bn_mlp(input_shape, num_classes, hidden: int = 8):
    return BNMLP(int(np.prod(input_shape)), num_classes, hidden)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.b(self.a(x.flatten(1))))


def tied():
    return Tied()


def not_a_module():
    return "a string"


def raises(width: int = 3):
    raise ValueError(f"width {width} is too narrow")


class Pairs(torch.utils.data.Dataset):
    """Feature vectors with float targets (regression), or single tensors (``bad=True``)."""

    def __init__(self, n: int, seed: int, bad: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = self.x @ torch.arange(1.0, 6.0) / 5
        self.bad = bad

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] if self.bad else (self.x[i], self.y[i])


def regression(n: int = 96):
    return Pairs(n, 0), Pairs(32, 1)


def bad_items():
    return Pairs(8, 0, bad=True), Pairs(8, 1, bad=True)


def linear_1(input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 1))


def squared_error(output, target):
    """A per-sample loss without accuracy: (B, 1) predictions against (B,) floats."""
    return (output.squeeze(1) - target) ** 2


def mean_loss(output, target):
    """Wrong: one number for the batch, not one per sample."""
    return nn.functional.cross_entropy(output, target)

