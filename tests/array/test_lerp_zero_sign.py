"""The sign of a zero result (issue 77, L1): ``ema_update_`` at decay 0 with a source of -0.0.

torch's own ``lerp_`` on the CPU gives either sign there, by where the element sits: its vectorized
body computes ``fma(w - 1, end - self, end)`` for ``w >= 0.5`` (-0.0 when ``end`` is -0.0 and ``w`` is
1), its scalar tail ``end - (end - self) * (1 - w)`` (+0.0). fastema computes the vectorized body's
form for every element, so it equals ``lerp_`` bit for bit, zeros' signs included, wherever torch
runs its vector loop; docs/guides/array.md says so.
"""
import numpy as np
import pytest

import fastema

torch = pytest.importorskip("torch")

# Enough elements for torch's vector loop to cover the first 16 of them (AVX-512: 16 floats a vector).
N = 256
CASES = [  # (shadow, src, decay): every signed-zero corner of the lerp
    (2.0, -0.0, 0.0), (2.0, 0.0, 0.0), (-0.0, -0.0, 0.0), (-0.0, -0.0, 0.3), (0.0, -0.0, 0.3),
    (-0.0, 0.0, 0.7), (-2.0, -0.0, 0.5), (-0.0, -0.0, 1.0), (0.0, -0.0, 1.0), (5.0, 5.0, 0.0),
    (-5.0, -5.0, 0.25), (1.0, -1.0, 0.5),
]


def _vector_form(e: float, x: float, w: float) -> float:
    """torch's vectorized lerp in float32 (ATen's lerp_vec): one fused multiply-add, exact in float64
    for float32 inputs, then one rounding."""
    e32, x32, w32 = np.float32(e), np.float32(x), np.float32(w)
    small = abs(w32) < np.float32(0.5)
    coeff = w32 if small else np.float32(w32 - np.float32(1))
    base = e32 if small else x32
    diff = np.float32(x32 - e32)
    prod = np.float64(coeff) * np.float64(diff)            # exact: two float32 factors
    if prod == 0.0 and base == 0.0:                       # IEEE: the sum of two zeros keeps their common sign
        return float(np.float32(np.copysign(0.0, 1.0 if not (np.signbit(prod) and np.signbit(base)) else -1.0)))
    return float(np.float32(prod + np.float64(base)))


@pytest.mark.parametrize("e,x,decay", CASES)
def test_the_zero_sign_is_torchs_vector_loop(e, x, decay):
    shadow = torch.full((N,), e)
    src = torch.full((N,), x)
    expected = torch.full((N,), e).lerp_(src, 1 - decay)
    fastema.ema_update_(shadow, src, decay)
    want = _vector_form(e, x, 1 - decay)
    assert bool(torch.signbit(shadow[0])) == bool(np.signbit(want)) and float(shadow[0]) == want
    # torch's vector body (the first elements) has the same bits, zeros' signs included
    assert torch.equal(shadow[:16].view(torch.int32), expected[:16].view(torch.int32))
