"""WindowShadow: the mean of the last ``window`` pushes of many tensors (fastema.torch.WindowAverage
is tested in tests/torch/test_window_average.py)."""
import numpy as np
import pytest
import torch

import fastema
from fastema import WindowShadow


@pytest.mark.parametrize("ring_dtype", ["float32", "bfloat16"])
def test_window_mean_stays_within_2_ulp_after_1e5_pushes(ring_dtype):
    rng = np.random.default_rng(0)
    x = torch.zeros(257)
    w = WindowShadow([x], 10, ring_dtype=ring_dtype)
    scale = 10.0 ** rng.uniform(-3, 3, 257)                         # mixed magnitudes per element
    for i in range(100_000):
        x.copy_(torch.from_numpy(scale * rng.standard_normal(257)))
        if i == 5:
            x[:10] = 1e6                                            # a spike that leaves the window
        w.push()
    exact = w.ring_view(0).double().mean(0)                          # what the ring holds now
    got = w.view(0).double()
    ulp = torch.from_numpy(np.spacing(exact.float().abs().numpy())).double()
    assert ((got - exact).abs() <= 2 * ulp).all(), ((got - exact).abs() / ulp).max()


def test_window_shadow_refuses_misuse():
    x = torch.zeros(3)
    w = WindowShadow([x], 2)
    # built from a layout and a source table, not derived from FlatShadow: no update() to disable,
    # and the running sum's rows stay private (one public average, the mean)
    assert not isinstance(w, fastema.FlatShadow) and not hasattr(w, "update")
    assert w.rows == 1 and w.nbytes == 3 * 3 * 4 + 2 * 3 * 4       # mean + sum rows + ring
    with pytest.raises(IndexError, match="one average"):
        w.view(0, row=1)
    w.swap()
    with pytest.raises(RuntimeError, match="swap"):
        w.push()
    w.swap()
    with pytest.raises(ValueError, match="window"):
        WindowShadow([x], 0)
