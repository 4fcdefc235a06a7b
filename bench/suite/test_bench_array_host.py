"""The array functions' per-call host cost (issue 70): ``ema_update_`` on a 16-element float32 pair, torch
tensors and NumPy arrays, against ``torch.lerp_`` on the same torch pair, on the CPU, one thread. A call of
this size is host work only: what is timed is the boundary (the prepared launch found by the arrays' key
and layout) and the launch. Each round is 200 calls (one call, 1-5 us, is near the timer's own cost); the
same figures, interleaved in one process, are ``bench.gates``' ratios ``16 elements, ...``."""
import numpy as np
import pytest
import torch

import fastema

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
        run(fn, "cpu", impl=impl, case="16 elements x200", nbytes=12 * 16 * CALLS, elements=16 * CALLS,
            rounds=5 if QUICK else 30)
        assert np.isfinite(a).all()
    finally:
        torch.set_num_threads(threads)
