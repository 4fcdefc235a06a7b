"""What the multi-rank fault suites (``tests/faults/test_faults_{agree,split,trl,zero3_targets}.py``)
share: what a rank got from a call, the small model they break, and the bit-for-bit comparisons of
"nothing was written". Imported by the spawned ranks too (``tests/`` is on their ``sys.path``)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence

import torch


def outcome(fn: Callable[[], object], causes: bool = False) -> tuple[str, str, float]:
    """``(error type or "ok", message, seconds)`` of ``fn()``: what each rank got, compared by the
    parent. ``causes``: the message followed by each cause's (``msg <- cause <- ...``)."""
    t0 = time.monotonic()
    try:
        fn()
    except Exception as err:                      # what each rank got, whatever it is
        msg, cause = str(err), err.__cause__
        while causes and cause is not None:
            msg, cause = f"{msg} <- {cause}", cause.__cause__
        return type(err).__name__, msg, time.monotonic() - t0
    return "ok", "", time.monotonic() - t0


def model() -> torch.nn.Module:
    """The same small model on every rank (seed 0): 8 -> 8 -> 3, with a Tanh between."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def raw(module: torch.nn.Module) -> dict:
    """A copy of ``module``'s state dict (what "nothing was written" compares against)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: Mapping | Sequence, b: Mapping | Sequence) -> bool:
    """Whether ``a`` and ``b`` hold the same tensors bit for bit: two dicts under the same keys, or
    two sequences of the same length in the same order."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys() and \
            all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def held(request, block: contextlib.AbstractContextManager):
    """``block`` entered for the rest of the test (left at its teardown, as a fixture's ``with``):
    a seam the library owns (``offload_ring.pipeline(...)``, ``folds.watched(...)``) set from a
    helper called in the test's body. Returns what entering it gave."""
    got = block.__enter__()
    request.addfinalizer(lambda: block.__exit__(None, None, None))
    return got
