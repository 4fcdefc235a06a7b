"""The array functions' prepared launches (issue 70 item 1): a second call with the same arrays launches
what the first prepared, with no description of the arrays; anything that changed what the first call
checked (an address, a shape, strides, a dtype, NumPy's writability, the rounding, ``lossy``) is checked
again, as a first call is. Results against ``torch.lerp_`` (bit for bit in float32) and a float64
reference."""
import numpy as np
import pytest
import torch
from support.arrays import DLPackOnly

import fastema
from fastema import ops


@pytest.fixture(autouse=True)
def _fresh():
    fastema.clear_caches()
    yield
    fastema.clear_caches()


def test_a_second_call_is_a_hit_and_writes_what_torch_writes():
    g = torch.Generator().manual_seed(0)
    s, x = torch.randn(16, generator=g), torch.randn(16, generator=g)
    want = s.clone()
    for decay in (0.9, 0.5, 0.99, 1.0, 0.0, 0.9):
        fastema.ema_update_(s, x, decay)
        want.lerp_(x, 1 - decay)
        assert torch.equal(s, want), decay
    assert len(ops._KEPT) == 1


def test_numpy_arrays_hit_by_identity_and_match_the_float64_reference():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(33).astype(np.float32), rng.standard_normal(33).astype(np.float32)
    ref = a.astype(np.float64)
    for decay in (0.9, 0.8, 0.9):
        fastema.ema_update_(a, b, decay)
        ref = ref + (1 - decay) * (b.astype(np.float64) - ref)
    assert np.allclose(a, ref, rtol=1e-6, atol=1e-7)
    assert len(ops._KEPT) == 1
    c = b.copy()                                          # another array of the same layout: its own entry
    fastema.ema_update_(a, c, 0.5)
    assert len(ops._KEPT) == 2


def test_a_numpy_shadow_made_read_only_is_refused_on_a_hit():
    a, b = np.zeros(8, np.float32), np.ones(8, np.float32)
    fastema.ema_update_(a, b, 0.5)
    a.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastema.ema_update_(a, b, 0.5)
    assert np.all(a == 0.5)


def test_a_numpy_array_re_viewed_in_place_is_checked_again():
    a, b = np.zeros(16, np.float32), np.ones(16, np.float32)
    fastema.ema_update_(a, b, 0.5)
    a.shape = (4, 4)                                      # the same object, another shape
    with pytest.raises(ValueError, match="must have shape"):
        fastema.ema_update_(a, b, 0.5)
    a.shape = (16,)
    a.dtype = np.int32                                    # the same memory, another dtype
    with pytest.raises(TypeError):
        fastema.ema_update_(a, b, 0.5)


def test_a_torch_tensor_moved_or_re_viewed_is_checked_again():
    s, x = torch.zeros(16), torch.ones(16)
    fastema.ema_update_(s, x, 0.5)
    s.data = torch.zeros(16)                              # new memory under the same tensor
    fastema.ema_update_(s, x, 0.5)
    assert torch.equal(s, torch.full((16,), 0.5))
    a, b = torch.zeros(4, 4), torch.arange(16.0).view(4, 4)
    fastema.ema_update_(a, b, 0.0)
    with pytest.raises(ValueError, match="laid out differently"):   # a's memory in another order, b's address:
        fastema.ema_update_(a.t(), b, 0.0)                # refused as a first call is, not taken for a hit
    fastema.ema_update_(a.t(), b.t(), 0.0)                # both transposed: the same walk
    assert torch.equal(a, b)


def test_unusual_weights_on_a_hit_take_the_full_check():
    s, x = torch.zeros(4), torch.ones(4)
    fastema.ema_update_(s, x, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fastema.ema_update_(s, x, 1.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fastema.ema_update_(s, x, float("nan"))
    fastema.ema_update_(s, x, np.float64(0.5))            # a NumPy number: the full path, same result
    assert torch.equal(s, torch.full((4,), 0.75))


def test_the_rounding_is_part_of_the_key():
    s, x = torch.zeros(64, dtype=torch.bfloat16), torch.full((64,), 1e-3)
    fastema.ema_update_(s, x, 0.999)
    fastema.ema_update_(s, x, 0.999, rounding="stochastic", seed=1, step=2)
    assert len(ops._KEPT) == 2
    with pytest.raises(ValueError):
        fastema.ema_update_(torch.zeros(4), torch.ones(4), 0.5, rounding="stochastic")


def test_copy_swap_and_the_nonfinite_flag_hit_and_stay_right():
    a, b = torch.arange(8.0), torch.zeros(8)
    for _ in range(2):
        fastema.copy_(b, a)
        assert torch.equal(b, a)
        a += 1
    x, y = torch.zeros(8), torch.ones(8)
    for _ in range(3):
        fastema.swap_(x, y)
    assert torch.equal(x, torch.ones(8)) and torch.equal(y, torch.zeros(8))
    lo = torch.zeros(8, dtype=torch.bfloat16)
    fastema.swap_(x, lo, lossy=True)
    with pytest.raises(ValueError, match="lossy=True"):
        fastema.swap_(x, lo)                              # lossy is part of the key
    flag, src = torch.zeros(1, dtype=torch.int32), torch.zeros(8)
    fastema.flag_nonfinite_(flag, src)
    src[3] = float("inf")
    fastema.flag_nonfinite_(flag, src)
    assert flag.item() == 1


def test_arrays_with_no_cheap_key_keep_their_launch_by_description():
    s, x = torch.zeros(8), torch.ones(8)
    a, b = DLPackOnly(s), DLPackOnly(x)
    for _ in range(3):
        fastema.ema_update_(a, b, 0.5)
    assert torch.equal(s, torch.full((8,), 0.875))
    assert not len(ops._KEPT) and len(ops._GROUPS) == 1   # no cheap key: the pair's group, by description,
    (g,) = [ops._GROUPS.hit(k, []) for k in ops._GROUPS.keys()]
    assert [op for op, _ in g.prepared()] == ["lerp"]     # keeps its launch, prepared once
    n = np.zeros(8, np.float32)                           # NumPy written, torch read: no common cheap key
    fastema.ema_update_(n, x, 0.5)
    fastema.ema_update_(n, x, 0.5)
    assert np.all(n == 0.75) and len(ops._GROUPS) == 2 and not len(ops._KEPT)
    fastema.ema_update_(n[4:], x[:4], 0.5)                # another description: its own launch
    assert np.all(n[4:] == 0.875) and np.all(n[:4] == 0.75) and len(ops._GROUPS) == 3
