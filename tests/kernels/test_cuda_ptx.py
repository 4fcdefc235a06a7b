"""Every CUDA kernel's shipped PTX holds what its kernel is for, without a GPU (issue 54: nothing is compiled).

The simulator runs the kernels' Python; this checks the other half: numba-cuda's real typing and
lowering, the bit-cast and pointer intrinsics included, on the PTX fastema ships (``kernels/device``,
the CUDA 13 set's PTX, built by ``python -m fastema warm --into`` for the argument types the launchers pass;
``test_device_code.py`` holds it to the current sources). A variant looked up here that is not shipped
fails: the launchers would compile it at a user's first update. The per-step streaming kernels' sm_90
cubins are held to stronger checks in ``test_sass.py``; this file covers what that one does not (the
other kind pairs, the array and four-row weights, the swaps, copies, smoothers, window and plan kernels).
"""
import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("reads the real target's code, not the simulator's", allow_module_level=True)
pytest.importorskip("numba.cuda")
from numba.cuda import types as T  # noqa: E402

from fastema._launch.cuda import device_code  # noqa: E402
from fastema._launch.shipped.variants import variant_key  # noqa: E402
from fastema.kernels import cuda as ema_cuda  # noqa: E402
from fastema.kernels import kinds as ema_cpu
from fastema.kernels._bits import BF16, F16, F32  # noqa: E402
from fastema.kernels._store.identity import VARIANTS  # noqa: E402

KINDS = (F32, BF16, F16)
A = lambda t: T.Array(t, 1, "C")  # noqa: E731
TABLES = (T.int64, A(T.int64), A(T.int64), A(T.int64), A(T.int32), A(T.int64))   # n, shadow, src, offsets, chunks


def compile_(fn, sig):
    """The shipped PTX of kernel ``fn`` (a factory's dispatcher) for argument types ``sig``."""
    problem = device_code.problem("cu13")
    assert problem is None, problem
    key = variant_key(VARIANTS[fn], sig)
    entry = device_code.entry("cu13", key, "compute_80")
    assert entry is not None, f"not shipped: {key}"
    ptx = entry.code.decode()
    assert f".entry {entry.name}(" in ptx
    return ptx


@pytest.mark.parametrize("sk", KINDS)
@pytest.mark.parametrize("xk", KINDS)
def test_lerp_compiles(sk, xk):
    """Every shadow and source kind pair, with its weights in a device array (the flat API's
    ``weights=``; the same loop as the host-tuple forms, which ``test_sass.py`` builds and links for
    the launches' own argument types: 1 and 2 rows, the device plan's weights); float32 shadows by 16-byte loads and
    stores, and 16- (float32) or 8-byte (16-bit) source loads; a 16-bit shadow with stochastic
    rounding too."""
    ptx = compile_(ema_cuda.lerp_kernel(sk, xk, False), TABLES + (A(T.float32), A(T.int32), T.uint32))
    assert "fma.rn.f32" in ptx
    if sk == F32:
        assert "ld.global.v4.u32" in ptx and "st.global.v4.u32" in ptx
        assert ("ld.global.v4.u32" if xk == F32 else "ld.global.v4.u16") in ptx
    if sk == BF16 and xk != BF16:                  # bf16 <- bf16 SR: test_sass.py builds it
        compile_(ema_cuda.lerp_kernel(sk, xk, True), TABLES + (A(T.float32), A(T.int32), T.uint32))


def test_lerp_compiles_with_four_rows_in_a_tuple():
    """The host weights of four decays in one pass, a tuple of four."""
    ptx = compile_(ema_cuda.lerp_kernel(F32, F32, False), TABLES + (T.UniTuple(T.float32, 4), A(T.int32), T.uint32))
    assert "fma.rn.f32" in ptx


@pytest.mark.parametrize("sk,xk,stochastic", [(F32, BF16, False), (BF16, BF16, True), (3, 3, False)])
def test_fused_plan_and_lerp_compiles(sk, xk, stochastic):
    """The one-launch update (plan and lerp) compiles: a shared-memory plan per block, one atomic
    completion count, and the vector path (float32 and 16-bit shadows) as in the plain lerp."""
    f64 = A(T.float64)
    plan = (f64, f64, f64, T.int64, A(T.float32), f64, A(T.int32), A(T.int64), A(T.int32), T.int64)
    ptx = compile_(ema_cuda.plan_lerp_kernel(sk, xk, stochastic), TABLES + plan)
    assert "atom.global.add" in ptx and ".shared" in ptx and "bar.sync" in ptx
    w = A(T.float64 if sk == 3 else T.float32)                      # a float64 kernel's weights are float64
    lerp = compile_(ema_cuda.lerp_kernel(sk, xk, stochastic, True), TABLES + (w, A(T.int32), A(T.int64)))
    assert ("ld.global.v4" in ptx) == ("ld.global.v4" in lerp) == (sk != 3)          # 3: float64, scalar


@pytest.mark.parametrize("sk", KINDS + (3,))                      # 3: float64
def test_bema_compiles(sk):
    f64 = sk == 3
    ptx = compile_(ema_cuda.bema_kernel(sk), TABLES + (T.float64 if f64 else T.float32, A(T.int32)))
    assert ("fma.rn.f64" if f64 else "fma.rn.f32") in ptx


@pytest.mark.parametrize("sk,xk,mode", [(F32, F32, ema_cpu.EXCHANGE), (F32, BF16, ema_cpu.PACK),
                                        (F32, BF16, ema_cpu.UNPACK), (F16, F32, ema_cpu.EXCHANGE)])
def test_swap_copy_nonfinite_compile(sk, xk, mode):
    """The swaps and copies by 16-byte vectors (and element by element: the tails)."""
    ptx = compile_(ema_cuda.swap_kernel(sk, xk, mode), TABLES + (T.int64,))
    assert "ld.global.v4.u32" in ptx and "st.global.v4.u32" in ptx
    for to_shadow in (True, False):
        ptx = compile_(ema_cuda.copy_kernel(sk, xk, to_shadow), TABLES + (T.int64, T.int64, A(T.int32)))
        assert "ld.global.v4.u32" in ptx and "st.global.v4.u32" in ptx
    compile_(ema_cuda.nonfinite_kernel(xk), TABLES[2:] + (A(T.int32),))


@pytest.mark.parametrize("kind", [F32, BF16, 3])                 # 3: float64 metric values
def test_smoother_kernels_compile(kind):
    from fastema.kernels import cuda as smooth_cuda

    y = A(T.float64 if kind == 3 else T.uint32 if kind == F32 else T.uint16)
    f64, i32 = A(T.float64), A(T.int32)
    for parts, weighted in ((3, False), (3, True), (1, False), (2, True)):
        ptx = compile_(smooth_cuda.streams_kernel(kind, parts, True, weighted),
                       (y, T.float64, f64, T.boolean, T.int64, T.float64, f64, f64, f64, i32, f64, f64, i32,
                        T.int64, T.int64, T.boolean))
        assert "ld.global.v2.f64" in ptx and "st.global.v2.f64" in ptx     # the pairs, one access each


@pytest.mark.parametrize("ring_kind", [F32, BF16])
def test_window_kernel_compiles(ring_kind):
    compile_(ema_cuda.window_kernel(ring_kind, BF16),
             TABLES + (A(T.int64), T.int64, T.boolean, T.int64, T.boolean))


def test_device_plan_and_device_key_kernels_compile():
    """The graph-safe path: the one-thread plan kernel, a lerp reading its weights and its
    stochastic-rounding key from device memory."""
    f64 = A(T.float64)
    ptx = compile_(ema_cuda.plan_kernel(), (f64, f64, f64, T.int64, A(T.float32), f64, A(T.int32), A(T.int64)))
    assert "pow" in ptx or "lg2" in ptx                       # the power warm-up is computed on the device
    compile_(ema_cuda.lerp_kernel(BF16, F32, True, True), TABLES + (A(T.float32), A(T.int32), A(T.int64)))
    compile_(ema_cuda.lerp_kernel(3, 3, False, True), TABLES + (f64, A(T.int32), A(T.int64)))
