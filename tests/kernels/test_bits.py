"""The scalar bit helpers, as compiled into the CPU kernels and as plain Python
(what the CUDA simulator runs): conversions equal torch/NumPy, packing is exact."""
import numpy as np
import pytest
import torch

import fastema
from fastema.kernels import _bits
from fastema.kernels._bits import BF16, F16, F32


def special_f32():
    v = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 65536,
                  2 ** -14, 2 ** -24, 2 ** -25, 1.5 * 2 ** -25, 3e-8, 1e-40, -1e-45,
                  np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny],
                 np.float32)
    return v


def random_f32(rng, n):
    bits = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    scaled = (rng.standard_normal(n) * 10.0 ** rng.integers(-12, 8, n)).astype(np.float32)
    return np.concatenate([bits.view(np.float32), scaled, special_f32()])


def test_float32_to_bfloat16_equals_torch(rng):
    x = random_f32(rng, 1_000_000)
    dst = torch.empty(x.size, dtype=torch.bfloat16)
    fastema.copy_(dst, x)                           # compiled encode(…, BF16)
    ref = torch.from_numpy(x).bfloat16()
    nan = np.isnan(x)          # torch's own NaN bits differ between its paths (0x7FC0, 0xFFFF)
    assert torch.isnan(dst[torch.from_numpy(nan)]).all()
    assert torch.equal(dst[torch.from_numpy(~nan)].view(torch.int16), ref[torch.from_numpy(~nan)].view(torch.int16))


def test_float32_to_float16_equals_numpy(rng):
    x = random_f32(rng, 1_000_000)
    dst = np.empty(x.size, np.float16)
    fastema.copy_(dst, x)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    nan = np.isnan(ref)
    assert np.isnan(dst[nan]).all()
    assert np.array_equal(dst[~nan].view(np.uint16), ref[~nan].view(np.uint16))


def test_every_nan_stores_one_16_bit_pattern_whatever_its_sign_and_payload():
    """A NaN the arithmetic makes (``inf - inf``) has its sign bit set on x86 and clear on an NVIDIA
    GPU (0xFFC00000 against 0x7FFFFFFF): a 16-bit shadow stores one pattern for every NaN (float16
    0x7E00, bfloat16 0x7FC0), so the GPU writes the CPU's bits (the H100 run of 2026-11-26 stored
    0x7E00 where the CPU stored 0xFE00). Compiled (``copy_``) and in plain Python (the simulator's)."""
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800001, 0xFFA00000],
                    np.uint32)
    for kind, dst, want in ((F16, np.empty(nans.size, np.float16), 0x7E00),
                            (BF16, torch.empty(nans.size, dtype=torch.bfloat16), 0x7FC0)):
        fastema.copy_(dst, nans.view(np.float32))
        compiled = (dst.view(torch.int16).numpy() if kind == BF16 else dst).view(np.uint16)
        python = [int(_bits.encode(b, kind)) for b in nans]
        assert compiled.tolist() == python == [want] * nans.size, (kind, compiled, python)
    with np.errstate(invalid="ignore"):                          # this machine's own NaN of inf - inf
        made = np.array([np.inf], np.float32) - np.array([np.inf], np.float32)
    assert int(_bits.encode(made.view(np.uint32)[0], F16)) == 0x7E00


@pytest.mark.parametrize("kind,dtype", [(F16, np.float16), (BF16, None)])
def test_every_16_bit_pattern_widens_exactly(kind, dtype):
    h = np.arange(65536, dtype=np.uint16)
    if kind == F16:
        src, ref = h.view(np.float16), h.view(np.float16).astype(np.float32)
    else:
        src = torch.from_numpy(h.view(np.int16)).view(torch.bfloat16)
        ref = src.float().numpy()
    dst = np.empty(65536, np.float32)
    fastema.copy_(dst, src)
    nan = np.isnan(ref)
    assert np.isnan(dst[nan]).all()
    assert np.array_equal(dst[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_python_helpers_match_compiled(rng):
    # The simulator runs the plain-Python helpers; they must agree with the compiled ones.
    x = random_f32(rng, 3000)
    for kind, dst in ((BF16, torch.empty(x.size, dtype=torch.bfloat16)), (F16, np.empty(x.size, np.float16))):
        fastema.copy_(dst, x)
        compiled = (dst.view(torch.int16).numpy() if kind == BF16 else dst).view(np.uint16)
        python = np.array([_bits.encode(b, kind) for b in x.view(np.uint32)], np.uint16)
        assert np.array_equal(compiled, python)
        widened = np.array([_bits.decode(h, kind) for h in python], np.uint32)
        back = np.empty(x.size, np.float32)
        fastema.copy_(back, dst)
        assert np.array_equal(back.view(np.uint32), widened)
    assert all(_bits.decode(b, F32) == b and _bits.encode(b, F32) == b for b in x.view(np.uint32)[:50])


def test_pack_unpack_round_trip_and_rounding(rng):
    e = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    e[:6] = [0x7F7FFFFF, 0x7F800000, 0x3F808000, 0x3F818000, 0x7FC00001, 0xFF800001]
    r = rng.integers(0, 2 ** 16, e.size).astype(np.uint16)
    for ei, ri in zip(e[:20000], r):
        slot, out = _bits.pack_bf16(ei, ri)
        e2, r2 = _bits.unpack_bf16(slot, out)
        assert r2 == ri
        ef = np.uint32(ei).view(np.float32)
        if np.isnan(ef):
            assert np.isnan(np.uint32(e2).view(np.float32))
            assert np.isnan((np.uint32(out) << 16).view(np.float32))
        else:
            assert e2 == ei
            if abs(ef) < 3.38e38:
                # out is a nearest bfloat16: no farther than torch's round-to-nearest-even
                o = float((np.uint32(out) << 16).view(np.float32))
                rne = float((np.uint32(_bits.encode(ei, BF16)) << 16).view(np.float32))
                assert abs(o - float(ef)) <= abs(rne - float(ef))


def test_sr_noise_is_deterministic_and_spread():
    a = np.array([_bits.sr_noise(np.uint32(7), i) for i in range(4096)], np.uint32)
    b = np.array([_bits.sr_noise(np.uint32(7), i) for i in range(4096)], np.uint32)
    c = np.array([_bits.sr_noise(np.uint32(8), i) for i in range(4096)], np.uint32)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    low = a & 0xFFFF
    # uniform on [0, 65536): mean 32767.5, sd of the mean 18918/sqrt(4096) ~ 296
    assert abs(low.mean() - 32767.5) < 5 * 296
    assert len(np.unique(a)) == a.size


def _lowbias32(x: int) -> int:
    """One round of C. Wellons' lowbias32 on Python integers: the reference the kernels' uint64 arithmetic
    (masked to 32 bits) must equal."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _noise_reference(key: int, index: int) -> int:
    """Stochastic rounding's noise as fastema has always drawn it: lowbias32 of the index's high half
    (plus the golden ratio), XOR its low half and the key, lowbias32 again."""
    return _lowbias32(_lowbias32((index >> 32) + 0x9E3779B9) ^ (index & 0xFFFFFFFF) ^ key)


def test_sr_noise_bits_are_the_reference_and_split_into_its_two_rounds(rng):
    """The noise (CPU-compiled and plain Python, as the simulator runs it) equals a pure-integer reference
    of the two-round hash, also around multiples of 2**32 and for rows far apart (kinds.NOISE_ROW); and
    ``sr_noise_last(sr_noise_first(high), key, low)`` is it, which the CUDA vector path uses to hash the
    first round once for 8 lanes."""
    from fastema.kernels import cpu as K
    from fastema.kernels.kinds import NOISE_ROW

    edges = [(h << 32) + d for h in (1, 2, 7, 255) for d in (-9, -1, 0, 1, 8)]
    indices = [int(i) for i in rng.integers(0, 1 << 50, 300)] + edges + [3 * NOISE_ROW + 5, 0, (1 << 63) - 1]
    for key in (0, 1, 0x9E3779B1, 0xFFFFFFFF):
        for i in indices:
            want = _noise_reference(key, i)
            k, x = np.uint32(key), np.int64(i)
            assert int(K.E.sr_noise(k, x)) == int(_bits.sr_noise(k, x)) == want, (key, i)
            first = _bits.sr_noise_first(np.uint64(i >> 32))
            assert int(_bits.sr_noise_last(first, k, np.uint64(i & 0xFFFFFFFF))) == want, (key, i)
            first = K.E.sr_noise_first(np.uint64(i >> 32))
            assert int(K.E.sr_noise_last(first, k, np.uint64(i & 0xFFFFFFFF))) == want, (key, i)
