"""The array functions' per-call host cost (issue 70): ``ema_update_`` on a 16-element float32 pair, torch
tensors and NumPy arrays, against ``torch.lerp_`` on the same torch pair, on the CPU, one thread. A call of
this size is host work only: what is timed is the boundary (the prepared launch found by the arrays' key
and layout) and the launch. Each round is 200 calls (one call, 1-5 us, is near the timer's own cost); the
same figures, interleaved in one process, are ``bench.gates``' ratios ``16 elements, ...``. The baseline's
200 calls are checked against ``ema_update_``'s from the same start before it is timed
(``bench/suite/checked.py``)."""
import numpy as np
import pytest
import torch

import fastema
from bench.suite.checked import agree, same_work

from .conftest import QUICK

DECAY = 0.999
CALLS = 200


@pytest.mark.parametrize("impl", ["fastema (torch)", "fastema (NumPy)", "torch.lerp_"])
def test_small_array_host_cost(run, benchmark, impl):
    benchmark.group = "array function host cost, 16 elements, x200 calls (cpu)"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        shadow, src = torch.randn(16, generator=g), torch.randn(16, generator=g)
        a, b = shadow.numpy(), src.numpy()
        calls, w, update = range(CALLS), 1 - DECAY, fastema.ema_update_

        def torch_side():
            for _ in calls:
                update(shadow, src, DECAY)

        def numpy_side():
            for _ in calls:
                update(a, b, DECAY)

        def baseline():
            for _ in calls:
                shadow.lerp_(src, w)

        fn = {"fastema (torch)": torch_side, "fastema (NumPy)": numpy_side, "torch.lerp_": baseline}[impl]
        mine = shadow.clone()                      # fastema's 200 calls from the baseline's start
        def check():
            agree(impl, lambda: [(torch_side_of(mine, src, DECAY, calls), mine)[1]],
                  lambda: [(baseline(), shadow)[1]], inputs=[src])
            same_work(lambda: torch_side_of(mine, src, DECAY, calls))      # timed in the baseline's rounds

        run(fn, "cpu", impl=impl, case="16 elements x200", nbytes=12 * 16 * CALLS, elements=16 * CALLS,
            rounds=5 if QUICK else 30, check=check)
        assert np.isfinite(a).all()
    finally:
        torch.set_num_threads(threads)


def torch_side_of(shadow, src, decay, calls) -> None:
    """``ema_update_`` of ``shadow`` toward ``src`` once per call of ``calls`` (the baseline's check)."""
    for _ in calls:
        fastema.ema_update_(shadow, src, decay)
