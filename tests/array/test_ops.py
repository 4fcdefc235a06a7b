"""Array-level kernels on the CPU: against a float64 reference, torch, and closed forms."""
import contextlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import DTYPES, assert_close_to_reference, naive_ema, torch_dtype
from support import faults
from support.calls import watching
from torch import nn

import fastema
from fastema import _launch
from fastema.torch.compat import ModelEmaV3

SIZES = st.one_of(st.integers(0, 3), st.integers(4, 300), st.integers(5000, 70000))
DECAYS = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.999, 0.9999, 1.0]), st.floats(0, 1))


def rand(n, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(torch_dtype(dtype))


@given(n=SIZES, decay=DECAYS, sd=st.sampled_from(DTYPES), xd=st.sampled_from(DTYPES), seed=st.integers(0, 99))
def test_ema_matches_float64_reference(n, decay, sd, xd, seed):
    shadow, src = rand(n, sd, seed), rand(n, xd, seed + 1, scale=3.0)
    e64, x64 = shadow.double().numpy(), src.double().numpy()
    fastema.ema_update_(shadow, src, decay=decay)
    assert_close_to_reference(shadow.double().numpy(), naive_ema(e64, x64, decay), sd, np.abs(e64) + np.abs(x64))


@pytest.mark.parametrize("n", [1, 31, 4097, 1 << 17, 3 * (1 << 20) + 5])   # serial and parallel kernels
@pytest.mark.parametrize("w", [1e-4, 1e-3, 0.3, 0.4999, 0.5, 0.75, 1.0])
def test_float32_equals_torch_lerp_bit_for_bit(n, w):
    shadow, src = rand(n, "float32", 1), rand(n, "float32", 2)
    ref = shadow.clone().lerp_(src, w)
    fastema.ema_update_(shadow, src, weight=w)
    assert torch.equal(shadow.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_equal_torch_lerp(dtype):
    shadow, src = rand(100_003, dtype, 3), rand(100_003, dtype, 4)
    ref = shadow.clone().lerp_(src, 0.01)          # torch: float32 opmath, rounded to nearest even
    fastema.ema_update_(shadow, src, decay=0.99)
    assert torch.equal(shadow.view(torch.int16), ref.view(torch.int16))


def test_decay_equals_weight_one_minus_decay():
    a, b, src = rand(1000, "float32", 5), rand(1000, "float32", 5), rand(1000, "float32", 6)
    fastema.ema_update_(a, src, decay=0.999)
    fastema.ema_update_(b, src, weight=1 - 0.999)
    assert torch.equal(a, b)


def test_weight_array_is_read_on_device():
    shadow, src = rand(5000, "float32", 7), rand(5000, "float32", 8)
    ref = shadow.clone().lerp_(src, 0.25)
    fastema.ema_update_(shadow, src, weight=torch.tensor([0.25]))
    assert torch.equal(shadow, ref)


@pytest.mark.parametrize("make", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_a_weight_in_the_shadows_memory_is_refused_and_nothing_written(make):
    """A device weight that is part of the shadow was read while the kernel wrote it: elements
    after the first averaged with the first's new value (0.75 and 0.875 where 0.75 is right)."""
    shadow, src = make(np.full(1 << 16, 0.5, np.float32)), make(np.ones(1 << 16, np.float32))
    with pytest.raises(ValueError, match="weight shares memory with the shadow"):
        fastema.ema_update_(shadow, src, weight=shadow[:1])
    with pytest.raises(ValueError, match="weight shares memory with the shadow"):
        fastema.ema_update_multi_(shadow.reshape(2, -1), src[: 1 << 15], weights=shadow[-2:])
    assert (np.asarray(shadow) == 0.5).all()
    fastema.ema_update_(shadow, src, weight=make(np.full(1, 0.5, np.float32)))      # its own array: taken
    assert (np.asarray(shadow) == 0.75).all()


def test_a_seed_or_step_past_its_range_is_refused_by_name_and_the_largest_taken():
    """step=2**63 raised numpy's OverflowError ("Python int too large to convert to C long") and
    seed=2**80 was taken, past the [0, 2**64) the faces' seed= documents."""
    shadow, src = torch.zeros(64, dtype=torch.bfloat16), torch.ones(64)
    for seed, step in ((2 ** 64, 0), (0, 2 ** 63)):
        with pytest.raises(ValueError, match=r"seed in \[0, 2\*\*64\) and step in \[0, 2\*\*63\)"):
            fastema.ema_update_(shadow, src, 0.5, rounding="stochastic", seed=seed, step=step)
    assert not shadow.any()
    fastema.ema_update_(shadow, src, 0.5, rounding="stochastic", seed=2 ** 64 - 1, step=2 ** 63 - 1)
    assert ((shadow == 0.5) | (shadow == 0.5 + 2 ** -9) | (shadow == 0.5 - 2 ** -9)).all()


@given(k=st.integers(1, 8), n=SIZES, sd=st.sampled_from(DTYPES), xd=st.sampled_from(DTYPES))
def test_multi_decay_equals_k_single_updates(k, n, sd, xd):
    decays = [0.5 + 0.5 * i / 8 for i in range(k)]
    shadow = torch.stack([rand(n, sd, 10 + i) for i in range(k)])
    src = rand(n, xd, 9)
    singles = [shadow[i].clone() for i in range(k)]
    for s, d in zip(singles, decays):
        fastema.ema_update_(s, src, decay=d)
    fastema.ema_update_multi_(shadow, src, decays)
    for i in range(k):
        assert torch.equal(shadow[i], singles[i])


def test_closed_form_constant_source():
    # A constant source x from shadow 0: after t steps shadow = x * (1 - decay**t).
    shadow = np.zeros(64, np.float32)
    src = np.full(64, 2.0, np.float32)
    for _ in range(50):
        fastema.ema_update_(shadow, src, decay=0.9)
    np.testing.assert_allclose(shadow, 2.0 * (1 - 0.9 ** 50), rtol=1e-6)


def test_stochastic_rounding_is_unbiased():
    # Each update is ~1/50 of a bfloat16 ulp: round-to-nearest never moves, stochastic
    # rounding moves by one ulp with probability ~1/50; the mean over 2**20 elements must
    # match the exact float32 result to within 5 standard errors.
    n = 1 << 20
    start = torch.full((n,), 1.0, dtype=torch.bfloat16)
    src = torch.full((n,), 1.0 + 2 ** -7 * 0.4, dtype=torch.float32)  # 0.4 ulp above
    decay = 0.95                                     # update = 0.05 * 0.4 ulp = 0.02 ulp
    nearest = start.clone()
    fastema.ema_update_(nearest, src, decay=decay)
    assert torch.equal(nearest, start)               # frozen
    sr = start.clone()
    fastema.ema_update_(sr, src, decay=decay, rounding="stochastic", seed=3, step=1)
    exact = 1.0 + (1 - decay) * 2 ** -7 * 0.4
    p = (exact - 1.0) / 2 ** -7                      # probability of rounding up
    mean = sr.double().mean().item()
    se = 2 ** -7 * np.sqrt(p * (1 - p) / n)
    assert abs(mean - exact) < 5 * se, (mean, exact, se)
    assert set(torch.unique(sr.float()).tolist()) == {1.0, 1.0 + 2 ** -7}


def test_stochastic_rounding_moves_a_frozen_shadow_over_time():
    n, steps, decay = 4096, 400, 0.999
    target = torch.full((n,), 1.0 + 2 ** -6, dtype=torch.float32)   # two bf16 ulps above
    rne = torch.ones(n, dtype=torch.bfloat16)
    sr = torch.ones(n, dtype=torch.bfloat16)
    ref = torch.ones(n, dtype=torch.float64)
    for t in range(steps):
        fastema.ema_update_(rne, target, decay=decay)
        fastema.ema_update_(sr, target, decay=decay, rounding="stochastic", seed=0, step=t)
        ref = decay * ref + (1 - decay) * target.double()
    assert torch.equal(rne, torch.ones(n, dtype=torch.bfloat16))       # round-to-nearest froze
    assert abs(sr.double().mean().item() - ref[0].item()) < 2e-4       # SR tracks the float64 EMA


def test_stochastic_rounding_is_reproducible():
    src = rand(10_000, "float32", 11)
    runs = []
    for seed, step in ((1, 5), (1, 5), (1, 6), (2, 5)):
        s = torch.zeros(10_000, dtype=torch.bfloat16)
        fastema.ema_update_(s, src, decay=0.3, rounding="stochastic", seed=seed, step=step)
        runs.append(s.view(torch.int16))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_same_dtype_round_trips_exactly(dtype):
    a, b = rand(70_001, dtype, 12), rand(70_001, dtype, 13)
    a0, b0 = a.clone(), b.clone()
    fastema.swap_(a, b)
    assert torch.equal(a, b0) and torch.equal(b, a0)
    fastema.swap_(a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)


@pytest.mark.parametrize("name", ["bfloat16", "float32", "float16"])
def test_an_array_in_the_other_byte_order_is_refused_and_nothing_written(name):
    """A byte-swapped ml_dtypes bfloat16 keeps its dtype's name: it was read as native (1, 2, 3
    came out as -5.8e-39, 5.9e-39, 3); every dtype in the other byte order is refused alike."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    native = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    swapped = np.array([1.0, 2.0, 3.0], native).astype(native.newbyteorder())
    assert not swapped.dtype.isnative and np.array_equal(swapped.astype(np.float32), [1, 2, 3])
    shadow = np.full(3, 7.0, np.float32)
    with pytest.raises(TypeError, match=r"src has dtype .*(other byte order|>f)"):
        fastema.ema_update_(shadow, swapped, 0.0)
    with pytest.raises(TypeError, match=r"shadow has dtype"):
        fastema.ema_update_(swapped, shadow, 0.5)
    assert np.array_equal(shadow, np.full(3, 7.0)) and np.array_equal(swapped.astype(np.float32), [1, 2, 3])


def test_swap_mixed_dtypes_needs_lossy():
    a, b = rand(100, "float32", 14), rand(100, "bfloat16", 15)
    a0, b0 = a.clone(), b.clone()
    with pytest.raises(ValueError, match="lossy=True"):
        fastema.swap_(a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    fastema.swap_(a, b, lossy=True)
    assert torch.equal(a, b0.float()) and torch.equal(b, a0.bfloat16())


@pytest.mark.parametrize("sd", DTYPES)
@pytest.mark.parametrize("xd", DTYPES)
def test_copy_converts_like_torch(sd, xd):
    src = rand(20_000, xd, 16, scale=100.0)
    dst = torch.empty(20_000, dtype=torch_dtype(sd))
    fastema.copy_(dst, src)
    ref = src.to(torch_dtype(sd))
    assert torch.equal(dst.view(torch.int16 if sd != "float32" else torch.int32),
                       ref.view(torch.int16 if sd != "float32" else torch.int32))


@pytest.mark.parametrize("xd", DTYPES)
def test_nonfinite_guard_skips_on_device(xd):
    shadow, src = rand(50_000, "float32", 17), rand(50_000, xd, 18)
    flag = torch.zeros(1, dtype=torch.int32)
    fastema.flag_nonfinite_(flag, src)
    assert flag.item() == 0
    before = shadow.clone()
    fastema.ema_update_(shadow, src, decay=0.5, skip_if=flag)
    assert not torch.equal(shadow, before)
    for bad in (float("nan"), float("inf"), float("-inf")):
        src2 = src.clone()
        src2[31_337] = bad
        flag.zero_()
        fastema.flag_nonfinite_(flag, src2)
        assert flag.item() == 1
        kept = shadow.clone()
        fastema.ema_update_(shadow, src2, decay=0.5, skip_if=flag)
        assert torch.equal(shadow, kept)


def test_numpy_arrays_work_like_tensors():
    shadow = np.linspace(-1, 1, 1001, dtype=np.float32)
    src = np.cos(np.arange(1001, dtype=np.float32))
    ref = torch.from_numpy(shadow.copy()).lerp_(torch.from_numpy(src), 0.1).numpy()
    fastema.ema_update_(shadow, src, decay=0.9)
    assert np.array_equal(shadow, ref)


def test_table_cache_does_not_leak_across_buffers():
    # Same size, different buffers: each call must read its own source.
    outs = []
    for v in (1.0, 2.0, 3.0):
        shadow = np.zeros(10, np.float32)
        fastema.ema_update_(shadow, np.full(10, v, np.float32), decay=0.0)
        outs.append(shadow[0])
    assert outs == [1.0, 2.0, 3.0]
    assert _launch.config.CPU_CHUNK > 0


# ------------------------------------------------------------------ bad input

def _untouched(*arrays):
    return [a.clone() if isinstance(a, torch.Tensor) else a.copy() for a in arrays]


@pytest.mark.parametrize("call,match", [
    (lambda s, x: fastema.ema_update_(s, x[:-1], decay=0.9), r"src has shape \(99,\) so shadow must have shape"),
    (lambda s, x: fastema.ema_update_(s, x.to(torch.complex64), decay=0.9), "dtype torch.complex64"),
    (lambda s, x: fastema.ema_update_(s.to(torch.complex64), x, decay=0.9), "dtype torch.complex64"),
    (lambda s, x: fastema.ema_update_(s, x.int(), decay=0.9), "dtype torch.int32"),
    (lambda s, x: fastema.ema_update_(s, x, decay=1.5), r"decay must be in \[0, 1\], got 1.5"),
    (lambda s, x: fastema.ema_update_(s, x, decay=-0.1), r"decay must be in \[0, 1\]"),
    (lambda s, x: fastema.ema_update_(s, x, decay=float("nan")), r"decay must be in \[0, 1\], got nan"),
    (lambda s, x: fastema.ema_update_(s, x, decay=torch.tensor(0.9)), "weight= with a float32"),
    (lambda s, x: fastema.ema_update_(s, x), "exactly one of decay= and weight="),
    (lambda s, x: fastema.ema_update_(s, x, decay=0.9, weight=0.1), "exactly one of"),
    (lambda s, x: fastema.ema_update_(s, x, weight=torch.tensor([0.1, 0.2])), "1 element"),
    (lambda s, x: fastema.ema_update_(s, x, weight=torch.tensor([0.1], dtype=torch.float64)), "float32"),
    (lambda s, x: fastema.ema_update_(s, x, decay=0.9, rounding="stochastic"), "bfloat16 shadows"),
    (lambda s, x: fastema.ema_update_(s, x, decay=0.9, rounding="up"), "'nearest' or 'stochastic'"),
    (lambda s, x: fastema.ema_update_(s, x, decay=0.9, skip_if=torch.zeros(1)), "int32"),
    (lambda s, x: fastema.ema_update_(s, [1.0] * 100, decay=0.9), "must be an array"),
    (lambda s, x: fastema.ema_update_(s.view(10, 10).t(), x.view(10, 10), decay=0.9), "laid out differently"),
    (lambda s, x: fastema.ema_update_(s[::2], x[::2], decay=0.9), "not dense"),
    (lambda s, x: fastema.ema_update_(s, s, decay=0.9), "share memory"),
    (lambda s, x: fastema.ema_update_multi_(s.view(1, 100), x, [0.9] * 9), "at most 8"),
    (lambda s, x: fastema.ema_update_multi_(s.view(2, 50), x[:50], [0.9]), r"shape \(1, 50\)"),
    (lambda s, x: fastema.ema_update_(s.to("meta"), x, decay=0.9), "meta"),
])
def test_bad_input_is_refused_and_changes_nothing(call, match):
    s, x = rand(100, "float32", 20), rand(100, "float32", 21)
    s0, x0 = _untouched(s, x)
    with pytest.raises((TypeError, ValueError), match=match):
        call(s, x)
    assert torch.equal(s, s0) and torch.equal(x, x0)


def test_read_only_numpy_shadow_is_refused():
    s = np.zeros(10, np.float32)
    s.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastema.ema_update_(s, np.ones(10, np.float32), decay=0.5)
    assert not s.any()


def test_device_mismatch_is_refused():
    s = np.zeros(10, np.float32)

    class FakeCuda:
        __cuda_array_interface__ = {"shape": (10,), "typestr": "<f4", "data": (1 << 40, False), "version": 3}

    with pytest.raises(ValueError, match="is on cpu but src is on cuda:0"):
        fastema.ema_update_(s, FakeCuda(), decay=0.5)
    assert not s.any()


def test_pair_groups_names_the_pairs_by_position_or_by_the_names_given():
    """Reliability round 4, L6: the pair checks name positions in the array API (``shadows[1]``) and
    the names a caller gives (a target network's parameters) otherwise; the wording is the same."""
    from fastema.pairs import pair_groups

    shadows, sources = [torch.zeros(4), torch.zeros(3, 4)], [torch.ones(4), torch.ones(4, 3).t()]
    with pytest.raises(ValueError, match=r"shadows\[1\] and sources\[1\] are laid out differently"):
        pair_groups(shadows, sources)
    with pytest.raises(ValueError, match=r"the target's 'w' and the online network's 'w' are laid out differently"):
        pair_groups(shadows, sources, (["the target's 'b'", "the target's 'w'"],
                                       ["the online network's 'b'", "the online network's 'w'"]))
    tied = [shadows[0], shadows[0]]
    with pytest.raises(ValueError, match=r"B is A again but with another source \(b is not a\)"):
        pair_groups(tied, [sources[0], torch.ones(4)], (["A", "B"], ["a", "b"]))


def test_first_shared_finds_a_byte_shared_across_two_lists_only():
    from fastema._backends import first_shared
    from fastema._backends.torch import span

    base = torch.zeros(16)
    a = [base[:4], base[4:8], torch.zeros(3)]
    assert first_shared(list(map(span, a)), list(map(span, [base[8:], torch.zeros(5)]))) is None
    assert first_shared(list(map(span, a)), list(map(span, [torch.zeros(2), base[7:9]]))) == (1, 1)
    assert first_shared(list(map(span, [base[7:9]])), list(map(span, a))) == (0, 1)
    assert first_shared(list(map(span, a[:2])), list(map(span, [base.view(4, 4).t()[1]]))) == (0, 0)  # strided
    assert first_shared([("cpu", 64, 8), ("cuda:0", 64, 8)], [("cuda:1", 64, 8)]) is None      # other devices
    assert first_shared([("cpu", 64, 8)], [("cpu", 0, 100), ("cpu", 72, 0)]) is None           # no memory


# ------------------------------------------------------------------ layout caches

def test_layout_cache_follows_length_and_dtype_at_one_address():
    # M6: the cache is keyed by address, dtype, shape and strides, so views at one address
    # get their own layout
    s, x = torch.zeros(1000), torch.ones(1000)
    fastema.ema_update_many_([s], [x], 0.5)
    fastema.ema_update_many_([s[:10]], [x[:10]], 0.5)
    assert torch.equal(s[:10], torch.full((10,), 0.75)) and torch.equal(s[10:], torch.full((990,), 0.5))
    t, y = torch.zeros(1000), torch.ones(1000)
    fastema.ema_update_many_([t[:10]], [y[:10]], 0.5)
    fastema.ema_update_many_([t], [y], 0.5)
    assert torch.equal(t[:10], torch.full((10,), 0.75)) and torch.equal(t[10:], torch.full((990,), 0.5))
    u, z = torch.zeros(1000), torch.ones(1000)
    fastema.ema_update_many_([u], [z], 0.5)
    ub, zb = u.view(torch.bfloat16), z.view(torch.bfloat16)
    ref = ub.float().lerp(zb.float(), 0.5).bfloat16()
    fastema.ema_update_many_([ub], [zb], 0.5)
    assert torch.equal(ub, ref)


@pytest.fixture(params=["torch", "streamed"])
def layout_checks(request):
    """The layout cache's check of a hit: torch's batched C++ guard (where this torch has one that
    passes the self-test), or fastema's own streamed comparison (any torch)."""
    import fastema._backends.torch as tb

    if request.param == "torch" and tb._tensor_guards() is None:
        pytest.skip("this torch has no batched tensor guard that passes the self-test")
    with tb.streamed_layout_checks() if request.param == "streamed" else contextlib.nullcontext():
        streamed = tb.backend.layout_guard([torch.zeros(3)]).__name__ == "same"   # the streamed check's
        assert streamed == (request.param == "streamed"), request.param
        fastema.clear_caches()
        yield request.param
        fastema.clear_caches()


def test_layout_cache_misses_for_the_same_memory_in_another_layout_or_shape(layout_checks):
    # H4: keyed by address, count and dtype, a transposed view or a same-count reshape of cached
    # memory hit the cache and was averaged in the cached storage order, where an uncached call refuses
    s, x = torch.zeros(4, 3), torch.arange(12.0).reshape(4, 3)
    fastema.ema_update_many_([s], [x], weight=0.5)
    s0 = s.clone()
    xt = x.view(3, 4).t()                              # x's memory, shape (4, 3), another order
    with pytest.raises(ValueError, match=r"laid out differently.*sources\[0\] strides \(1, 4\)"):
        fastema.ema_update_many_([s], [xt], weight=0.5)
    with pytest.raises(ValueError, match=r"sources\[0\] has shape \(3, 4\) so shadows\[0\] must have shape"):
        fastema.ema_update_many_([s], [x.view(3, 4)], weight=0.5)
    assert torch.equal(s, s0)                          # refused: nothing written
    st = s.view(3, 4).t()                              # both in the other layout: a new layout, averaged right
    ref = st.clone().lerp_(xt, 0.5)
    fastema.ema_update_many_([st], [xt], weight=0.5)
    assert torch.equal(st, ref)
    sr, xr = s.view(3, 4), x.view(3, 4)                # both reshaped: a new layout, averaged right
    ref = sr.clone().lerp_(xr, 0.25)
    fastema.ema_update_many_([sr], [xr], weight=0.25)
    assert torch.equal(sr, ref)
    ref = s.clone().lerp_(x, 0.5)                      # and the first layout again
    fastema.ema_update_many_([s], [x], weight=0.5)
    assert torch.equal(s, ref)
    h, y = torch.zeros(6, dtype=torch.float16), torch.ones(6, dtype=torch.float16)
    fastema.ema_update_many_([h], [y], weight=0.5)     # the same memory, shape and strides in another dtype
    hb, yb = h.view(torch.bfloat16), y.view(torch.bfloat16)
    ref = hb.float().lerp(yb.float(), 0.5).bfloat16()
    fastema.ema_update_many_([hb], [yb], weight=0.5)
    assert torch.equal(hb, ref)


def _counting_pair_groups(request) -> list:
    """The calls of the full layout check (``fastema.pairs.pair_groups``) for the rest of the test."""
    calls: list = []
    faults.held(request, watching(fastema.pairs.pair_groups, on_call=lambda args: calls.append(1)))
    return calls


def test_layout_cache_misses_for_a_lazily_negated_view_of_cached_memory(layout_checks):
    # A neg view (public through z.conj().imag) has x's address, dtype, shape and strides; its
    # memory holds x, not -x. Uncached it is refused; after caching x it must be refused too (the
    # streamed comparison, which decides when torch's guard says no, ignored the neg/conj bits)
    s, x = torch.zeros(4), torch.ones(4)
    fastema.ema_update_many_([s], [x], weight=1.0)
    with torch.inference_mode():                  # torch's guard says no here: the streamed one decides
        for view in (torch._neg_view(x), torch._neg_view(x)):
            with pytest.raises(TypeError, match="lazily negated or conjugated"):
                fastema.ema_update_many_([s], [view], weight=1.0)
    with pytest.raises(TypeError, match="lazily negated or conjugated"):
        fastema.ema_update_many_([s], [torch._neg_view(x)], weight=1.0)
    assert torch.equal(s, x)


def test_layout_cache_hit_needs_every_stride(layout_checks, request):
    # a size-1 dimension's stride changes no element's place, yet the check compares strides as
    # they are: the full check runs again (and accepts it)
    calls = _counting_pair_groups(request)
    c, z = torch.zeros(4, 1), torch.ones(4, 1)
    fastema.ema_update_many_([c], [z], weight=0.5)
    fastema.ema_update_many_([c], [z], weight=0.5)
    assert len(calls) == 1
    fastema.ema_update_many_([c], [z.as_strided((4, 1), (1, 4))], weight=0.5)
    assert len(calls) == 2 and torch.equal(c, torch.full((4, 1), 0.875))


def test_layout_cache_hits_for_the_same_tensors_in_another_inference_mode(layout_checks, request):
    # torch's guard compares dispatch keys, which inference_mode changes: the streamed comparison
    # then decides, so alternating modes still hit (no full check per call)
    calls = _counting_pair_groups(request)
    s, x = torch.zeros(3, 5), torch.ones(3, 5)
    fastema.ema_update_many_([s], [x], weight=0.5)
    with torch.inference_mode():
        fastema.ema_update_many_([s], [x], weight=0.5)
    fastema.ema_update_many_([s], [x], weight=0.5)
    assert calls == [1] and torch.equal(s, torch.full((3, 5), 0.875))


def _collections_during(fn, calls: int) -> int:
    import gc

    count = [0]

    def cb(phase, info):
        count[0] += phase == "start"

    gc.collect()
    gc.callbacks.append(cb)
    try:
        for _ in range(calls):
            fn()
    finally:
        gc.callbacks.remove(cb)
    return count[0]


def test_layout_cache_hit_leaves_the_garbage_collector_alone(layout_checks):
    # 2a: a key of torch.Size and stride tuples per tensor, built at every call and held in the
    # key, set off ~2 collections a call at 800 tensors (ema_update_many_ 1.6 -> 9 ms at 6000);
    # the key is ints now and the layout check frees what it reads at once
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    shadows, sources = [p.detach().clone() for p in model.parameters()], list(model.parameters())
    fastema.ema_update_many_(shadows, sources, weight=0.5)
    assert _collections_during(lambda: fastema.ema_update_many_(shadows, sources, weight=0.5), 20) <= 2


def test_single_pair_tables_are_layout_free_and_the_layout_is_checked_every_call():
    # The one-pair table cache (ema_update_, copy_, swap_) is keyed by addresses and a count: the
    # table is the same for every layout, and the layout check runs at every call before it is used.
    s, x = torch.zeros(4, 3), torch.arange(12.0).reshape(4, 3)
    fastema.ema_update_(s, x, weight=0.5)
    s0 = s.clone()
    with pytest.raises(ValueError, match="laid out differently"):
        fastema.ema_update_(s, x.view(3, 4).t(), weight=0.5)
    with pytest.raises(ValueError, match="must have shape"):
        fastema.copy_(s, x.view(3, 4))
    assert torch.equal(s, s0)
    st, xt = s.view(3, 4).t(), x.view(3, 4).t()
    ref = st.clone().lerp_(xt, 0.5)
    fastema.ema_update_(st, xt, weight=0.5)
    assert torch.equal(st, ref)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_layout_cache_keeps_no_model_alive():
    # M7: ModelEmaV3 / ema_update_many_ over models that are then deleted: their memory goes back
    # (at 3c5c42b the cache pinned the last 32 models' storages: +400 MiB here)
    import gc

    gc.collect()
    before = _rss_mib()
    for _ in range(10):
        m = nn.Linear(3200, 3200)                      # 40 MiB of weights, twice with the EMA copy
        ema = ModelEmaV3(m, decay=0.9)
        ema.update(m)
        with torch.no_grad():                          # its copy's parameters require grad
            fastema.ema_update_many_(list(ema.module.parameters()), list(m.parameters()), 0.5)
        del m, ema
        gc.collect()
    assert _rss_mib() - before < 150


def test_clear_caches_drops_layouts_and_keeps_results():
    s, x = torch.zeros(100), torch.ones(100)
    fastema.ema_update_many_([s], [x], 0.5)
    fastema.ema_update_(s, x, 0.5)
    assert len(fastema.pairs._PAIRS) and len(fastema.ops._GROUPS) and len(fastema.ops._KEPT)
    fastema.clear_caches()
    assert not len(fastema.pairs._PAIRS) and not len(fastema.ops._GROUPS) and not len(fastema.ops._KEPT)
    fastema.ema_update_many_([s], [x], 0.5)
    assert torch.equal(s, torch.full((100,), 0.875))
