"""The torch functions a block calls, counted: the host work of fastema's per-step paths per tensor.

A ``TorchFunctionMode`` sees every ``Tensor`` method and property, also those called from C
through ``map`` (``data_ptr`` read by a check over a model's tensors). Imports torch: only the
tests that have it import this.
"""
from __future__ import annotations

import collections

from torch.overrides import TorchFunctionMode


class TorchCalls(TorchFunctionMode):
    """Counts the torch functions (``Tensor`` methods and properties included) called inside it, by
    qualified name (``calls["TensorBase.data_ptr"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls[getattr(func, "__qualname__", repr(func))] += 1
        return func(*args, **(kwargs or {}))
