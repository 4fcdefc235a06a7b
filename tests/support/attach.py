"""The small model, batches and comparisons the ``ema.attach(optimizer)`` tests share."""
from __future__ import annotations

import torch
from torch import nn


def net(dtype=torch.float32, seed=0):
    """A 6 -> 8 -> 3 MLP of ``dtype``, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(n, dtype=torch.float32):
    """``n`` batches of 4 inputs, the same in every test."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, generator=g).to(dtype) for _ in range(n)]


def averaged(avg):
    """A copy of the average's tensors (its ``state_dict()["averaged"]``)."""
    return {k: v.clone() for k, v in avg.state_dict()["averaged"].items()}


def same(a, b):
    """Whether two dicts of tensors hold the same keys and bit-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
