"""CUDA kernels and the CUDA dispatch path.

Runs in the Numba CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1``, set before
numba is imported, so in its own process) and unchanged on a real GPU. Arrays stay
small: the simulator runs each thread in Python. Tunables are shrunk so that tails,
several blocks and the grid-stride loop over chunks all run on tiny inputs.
"""
import itertools
import os
import re

import numpy as np
import pytest
from numba import cuda

pytestmark = pytest.mark.cuda

if not (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from support import vectors  # noqa: E402
from support.calls import watching  # noqa: E402
from support.shipped import launch  # noqa: E402

import fastema  # noqa: E402
from fastema import _launch  # noqa: E402
from fastema.kernels import _bits, kinds  # noqa: E402
from fastema.kernels import cpu as ema_cpu  # noqa: E402
from fastema.kernels import cuda as ema_cuda  # noqa: E402
from fastema.kernels._bits import BF16, F16, F32  # noqa: E402
from fastema.kernels.layout import chunk_table, segment_offsets  # noqa: E402
from fastema.schedules import HalfLife, NumUpdates, PowerFunction, PowerWarmup  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
KINDS = (F32, BF16, F16)
UINT = {F32: np.uint32, BF16: np.uint16, F16: np.uint16}


class Watching:
    """The process's launch driver (numba's simulator, or cuda.core's on a GPU) with what the launch
    path asks of it watched: the raw stream of every launch (``streams``: numba's dispatcher in the
    simulator, fastema's own launch on a GPU), the values of every staged copy (``copies``);
    ``capture`` (True or False) overrides what the capture query says (the simulator has no graphs).
    """

    def __init__(self, inner):
        self.inner, self.streams, self.copies, self.capture = inner, [], [], None
        self.zero_flags, self.images = {}, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dispatch(self, kernel, index, raw, blocks, threads, args):
        self.streams.append(raw)
        self.inner.dispatch(kernel, index, raw, blocks, threads, args)

    def launch(self, func, blocks, threads, stream, params):
        self.streams.append(int(stream))
        self.inner.launch(func, blocks, threads, stream, params)

    def copy(self, device_array, values, raw):
        self.copies.append(values.copy())
        self.inner.copy(device_array, values, raw)

    def capturing(self, raw, index=None):
        return self.inner.capturing(raw, index) if self.capture is None else self.capture

    def any_capturing(self, raw, index):
        return self.inner.any_capturing(raw, index) if self.capture is None else self.capture


@pytest.fixture
def watched():
    """A :class:`Watching` driver given to the launch path for the test."""
    from fastema._launch.cuda import drivers

    with drivers.using(Watching(drivers.current())) as w:
        yield w


@pytest.fixture(autouse=True)
def small_launches():
    with _launch.config.tuned(CUDA_CHUNK=16, CUDA_THREADS=8,
                              CUDA_MAX_BLOCKS=3):            # fewer blocks than chunks: grid-stride
        yield


def random_bits(kind, n, rng, scale=1.0):
    v = (rng.standard_normal(n) * scale).astype(np.float32)
    if kind == F32:
        return v.view(np.uint32)
    return np.array([_bits.encode(b, kind) for b in v.view(np.uint32)], np.uint16)


def host_tables(counts, chunk=16):
    off = segment_offsets(counts)
    cs, cb = chunk_table(off, chunk)
    return off, cs, cb


def sources(kind, counts, rng):
    return [random_bits(kind, c, rng, 2.0) for c in counts]


def dev_addr(d):
    return d._ary.ctypes.data if SIM else d.device_ctypes_pointer.value


def cuda_sources(srcs):
    dev = [cuda.to_device(s) for s in srcs]
    return dev, np.array([dev_addr(s) for s in dev], np.int64)


def shadow_table(address, counts, kind):
    return _launch.flat_shadow(address, counts, 4 if kind == F32 else 2)


@pytest.mark.parametrize("sk", KINDS)
@pytest.mark.parametrize("xk", KINDS)
@pytest.mark.parametrize("rows", [1, 3])
def test_lerp_kernel_matches_cpu_kernel(sk, xk, rows):
    rng = np.random.default_rng(sk * 10 + xk)
    counts = [5, 0, 40, 1, 17]
    srcs = sources(xk, counts, rng)
    off, cs, cb = host_tables(counts)
    n = int(off[-1])
    shadow = random_bits(sk, rows * n, rng)
    weights = tuple(np.float32(w) for w in (0.1, 0.6, 1.0)[:rows])
    flag = np.zeros(1, np.int32)
    expected = shadow.copy()
    host_addr = np.array([s.ctypes.data for s in srcs], np.int64)
    cpu_kernel = ema_cpu.lerp_kernel(sk, xk, False, False)
    cpu_kernel(n, shadow_table(expected.ctypes.data, counts, sk), host_addr, off, cs, cb, weights, flag,
               np.uint32(0))
    dev_srcs, addr = cuda_sources(srcs)
    d = cuda.to_device(shadow)
    args = [cuda.to_device(a) for a in (shadow_table(dev_addr(d), counts, sk), addr, off, cs, cb)]
    launch(ema_cuda.lerp_kernel(sk, xk, False), 2, 8, n, *args, weights, cuda.to_device(flag),
           np.uint32(0))
    got = d.copy_to_host()
    assert np.array_equal(got, expected)


def test_stochastic_rounding_identical_to_cpu():
    rng = np.random.default_rng(5)
    counts = [50, 33]
    srcs = sources(F32, counts, rng)
    off, cs, cb = host_tables(counts)
    n = int(off[-1])
    shadow = random_bits(BF16, 2 * n, rng)
    w = (np.float32(0.01), np.float32(0.001))
    key = np.uint32(fastema.ops.sr_key(7, 123))
    flag = np.zeros(1, np.int32)
    expected = shadow.copy()
    host_addr = np.array([s.ctypes.data for s in srcs], np.int64)
    ema_cpu.lerp_kernel(BF16, F32, True, False)(n, shadow_table(expected.ctypes.data, counts, BF16), host_addr,
                                                off, cs, cb, w, flag, key)
    _, addr = cuda_sources(srcs)
    d = cuda.to_device(shadow)
    tabs = [cuda.to_device(a) for a in (shadow_table(dev_addr(d), counts, BF16), addr, off, cs, cb)]
    launch(ema_cuda.lerp_kernel(BF16, F32, True), 3, 8, n, *tabs, w, cuda.to_device(flag), key)
    assert np.array_equal(d.copy_to_host(), expected)


def test_stochastic_rounding_on_a_padded_gpu_shadow_equals_the_packed_cpu_shadow():
    """The GPU shadow is padded (each source 16-byte aligned, a longer row); the noise of an
    element stays its index in the packed (K, n) layout, so every row rounds as on the CPU."""
    rng = np.random.default_rng(8)
    counts = [50, 33]
    srcs = sources(F32, counts, rng)
    off, cs, cb = host_tables(counts)
    n = int(off[-1])
    starts, n_pad = np.array([0, 56]), 96                   # bfloat16: 8-element (16-byte) alignment
    packed = random_bits(BF16, 2 * n, rng)
    padded = np.zeros(2 * n_pad, np.uint16)
    for r in range(2):
        for s_, c in enumerate(counts):
            padded[r * n_pad + starts[s_]:r * n_pad + starts[s_] + c] = packed[r * n + off[s_]:r * n + off[s_] + c]
    w = (np.float32(0.01), np.float32(0.001))
    key = np.uint32(fastema.ops.sr_key(7, 123))
    flag = np.zeros(1, np.int32)
    host_addr = np.array([x.ctypes.data for x in srcs], np.int64)
    ema_cpu.lerp_kernel(BF16, F32, True, False)(n, shadow_table(packed.ctypes.data, counts, BF16), host_addr,
                                                off, cs, cb, w, flag, key)
    _, addr = cuda_sources(srcs)
    d = cuda.to_device(padded)
    tabs = [cuda.to_device(a) for a in (dev_addr(d) + starts * 2, addr, off, cs, cb)]
    launch(ema_cuda.lerp_kernel(BF16, F32, True), 3, 8, n_pad, *tabs, w, cuda.to_device(flag), key)
    out = d.copy_to_host()
    for r in range(2):
        for s_, c in enumerate(counts):
            assert np.array_equal(out[r * n_pad + starts[s_]:r * n_pad + starts[s_] + c],
                                  packed[r * n + off[s_]:r * n + off[s_] + c]), (r, s_)


@pytest.mark.parametrize("sk,xk,mode", [(F32, F32, kinds.EXCHANGE), (BF16, BF16, kinds.EXCHANGE),
                                        (F32, BF16, kinds.PACK), (F32, F16, kinds.EXCHANGE)])
def test_swap_and_copy_kernels_match_cpu(sk, xk, mode):
    rng = np.random.default_rng(3)
    counts = [9, 30]
    srcs = sources(xk, counts, rng)
    off, cs, cb = host_tables(counts)
    n = int(off[-1])
    shadow = random_bits(sk, 2 * n, rng)
    cpu_srcs = [s.copy() for s in srcs]
    cpu_shadow = shadow.copy()
    cpu_addr = np.array([s.ctypes.data for s in cpu_srcs], np.int64)
    cpu_tab = shadow_table(cpu_shadow.ctypes.data, counts, sk)
    ema_cpu.swap_kernel(sk, xk, mode, False)(n, cpu_tab, cpu_addr, off, cs, cb, 1)
    dev_srcs, addr = cuda_sources(srcs)
    d = cuda.to_device(shadow)
    tabs = [cuda.to_device(a) for a in (shadow_table(dev_addr(d), counts, sk), addr, off, cs, cb)]
    launch(ema_cuda.swap_kernel(sk, xk, mode), 2, 8, n, *tabs, 1)
    assert np.array_equal(d.copy_to_host(), cpu_shadow)
    for ds, cs_ in zip(dev_srcs, cpu_srcs):
        assert np.array_equal(ds.copy_to_host(), cs_)
    # copy: sources -> both rows, then row 0 -> sources
    no_flag = np.zeros(1, np.int32)
    launch(ema_cuda.copy_kernel(sk, xk, True), 2, 8, n, *tabs, 0, 2, cuda.to_device(no_flag))
    ema_cpu.copy_kernel(sk, xk, True, False)(n, cpu_tab, cpu_addr, off, cs, cb, 0, 2, no_flag)
    assert np.array_equal(d.copy_to_host(), cpu_shadow)


@pytest.mark.parametrize("xk", KINDS)
def test_nonfinite_kernel(xk):
    rng = np.random.default_rng(4)
    srcs = sources(xk, [20, 20], rng)
    off, cs, cb = host_tables([20, 20])
    bad = {F32: 0x7FC00000, BF16: 0x7F80, F16: 0xFC00}[xk]
    for poison in (False, True):
        if poison:
            srcs[1][13] = bad
        _, addr = cuda_sources(srcs)
        flag = cuda.to_device(np.zeros(1, np.int32))
        tables = [cuda.to_device(a) for a in (addr, off, cs, cb)]
        launch(ema_cuda.nonfinite_kernel(xk), 2, 8, *tables, flag)
        assert flag.copy_to_host()[0] == int(poison)


# ------------------------------------------------------------- through the public API

def test_ema_update_on_device_arrays_matches_cpu():
    rng = np.random.default_rng(6)
    shadow = rng.standard_normal(100).astype(np.float32)
    src = rng.standard_normal(100).astype(np.float32)
    expected = shadow.copy()
    fastema.ema_update_(expected, src, decay=0.9)
    d_shadow, d_src = cuda.to_device(shadow), cuda.to_device(src)
    fastema.ema_update_(d_shadow, d_src, decay=0.9)
    assert np.array_equal(d_shadow.copy_to_host(), expected)
    w = cuda.to_device(np.array([0.1], np.float32))                 # weight read on the device
    fastema.ema_update_(d_shadow, d_src, weight=w)
    fastema.ema_update_(expected, src, weight=0.1)
    assert np.array_equal(d_shadow.copy_to_host(), expected)


def test_clear_caches_drops_the_stream_cache_and_keeps_what_a_captured_graph_reads():
    """clear_caches() drops the stream objects and the single-pair tables, but keeps the per-device zero
    flag (the flag of every unguarded launch: a graph captured before reads it at every replay) and
    the tables of a call made during a capture (issue 37, C3)."""
    d_shadow, d_src = cuda.to_device(np.zeros(10, np.float32)), cuda.to_device(np.ones(10, np.float32))
    fastema.ema_update_(d_shadow, d_src, decay=0.5)                 # a zero flag made for the device
    flag = _launch.cuda.tables._zero_flag("cuda:0")
    fastema.clear_caches()
    assert _launch.cuda.tables._zero_flag("cuda:0") is flag
    assert _launch.cuda.tables.current().numba_stream.cache_info().currsize == 0
    assert not len(fastema.ops._GROUPS) and not len(fastema.ops._KEPT)
    fastema.ema_update_(d_shadow, d_src, decay=0.5)                 # and launches still work after it
    assert np.array_equal(d_shadow.copy_to_host(), np.full(10, 0.75, np.float32))


def test_flat_shadow_on_device_arrays():
    rng = np.random.default_rng(7)
    host = [rng.standard_normal(s).astype(np.float32) for s in (7, 40, 1, 25)]
    dev = [cuda.to_device(h) for h in host]
    flat = fastema.FlatShadow(dev, rows=2)
    ref = fastema.FlatShadow(host, rows=2)            # the same values, on the CPU
    for step in range(2):
        for h, d in zip(host, dev):
            h += 1.0
            d.copy_to_device(h)
        flat.update([0.5, 0.9], skip_nonfinite=True)
        ref.update([0.5, 0.9])
    for i in range(4):
        for r in range(2):
            assert np.array_equal(np.asarray(flat.view(i, r).copy_to_host()), ref.view(i, r))
    flat.swap()
    flat.swap()
    assert all(np.array_equal(d.copy_to_host(), h) for d, h in zip(dev, host))


def test_every_launch_goes_on_the_stream_current_at_that_call(watched):
    """The stream is the caller's at each call, never the one current when the shadow was made
    (a shadow made on the default stream and updated under ``torch.cuda.stream(side)`` or a
    graph capture raced with the side stream / ran uncaptured). The launch driver is handed the raw
    handle current then: numba's dispatcher in the simulator, fastema's own launch on a GPU
    (issue 37, B1)."""
    from fastema import _backends

    first, later = cuda.stream(), cuda.stream()
    handles = {first: 101, later: 202} if SIM else {s: int(s.handle) for s in (first, later)}
    current = [handles[first]]
    seen = watched.streams
    host = [np.arange(n, dtype=np.float32) for n in (5, 40)]
    dev = [cuda.to_device(h) for h in host]
    with _backends.streams_from(lambda framework, device: lambda: current[0]):
        flat = fastema.FlatShadow(dev)                     # copies on fastema's own upload stream
        many = [cuda.to_device(np.zeros_like(h)) for h in host]
        fastema.ema_update_many_(many, dev, decay=0.5)
        assert seen and all(s == handles[first] for s in seen)
        current[0] = handles[later]
        seen.clear()
        flat.update(0.9)
        flat.update(0.9, skip_nonfinite=True)
        flat.swap()
        flat.swap()
        fastema.ema_update_many_(many, dev, decay=0.5)     # cached layout: still the stream of now
        fastema.ema_update_(many[0], dev[0], decay=0.5)
    assert len(seen) == 7 and all(s == handles[later] for s in seen), seen   # the guard flag is zeroed by a memset
    assert np.array_equal(flat.view(1).copy_to_host(), host[1])
    current[0] = 0      # the getter outlives the block in flat's groups (a cycle): it must never name a dead stream


def test_address_changes_rewrite_the_device_table_in_place(watched):
    """A rebind writes the new addresses into the same device table on the stream (a captured
    graph keeps reading a live table; no allocation, no free), and copies nothing when the
    addresses did not change."""
    writes = watched.copies
    host = [np.arange(n, dtype=np.float32) for n in (5, 40, 3)]
    dev = [cuda.to_device(h) for h in host]
    flat = fastema.FlatShadow(dev)
    g = flat.layout.groups[0]
    table = g.tables.seg_addr
    for step in range(6):                                 # more rebinds than staging slots
        moved = [cuda.to_device(h + step + 1) for h in host]
        flat.update(0.0, sources=moved)                   # weight 1: the shadow becomes the sources
        assert g.tables.seg_addr is table
        assert [int(a) for a in writes[-1]] == [dev_addr(m) for m in moved]
        assert all(np.array_equal(flat.view(i).copy_to_host(), h + step + 1) for i, h in enumerate(host))
    assert len(writes) == 6
    flat.update(0.5, sources=[m[:] for m in moved])       # new objects, same memory: nothing copied
    assert len(writes) == 6
    assert np.array_equal(table.copy_to_host(), [dev_addr(m) for m in moved])


PLAN_ULPS = 4
"""On a GPU the plan's float64 powers (power warm-up, sigma_rel, half-life, update_every's compensation)
are libdevice's ``__nv_pow`` (2 ulp), on the host glibc's ``pow``: neither is correctly rounded, so a
GPU plan and a host plan may differ in the last bits (issue 37, B4). The bound: a call's weights
within PLAN_ULPS ulp, what accumulates over calls (the state's normalisers, a shadow) within PLAN_ULPS
ulp per call so far; counters, flags and rounding keys exact. The simulator runs the host's pow:
exact there. Graph replays against eager calls (GPU against GPU) stay exact."""


def _ulps(got, want) -> int:
    """The largest distance in units in the last place between two arrays of one float type, or of
    the bits of one (uint32: float32, uint16: bfloat16 / float16, same-signed values)."""
    if got.dtype.kind == "f":
        bits = {8: np.int64, 4: np.int32}[got.dtype.itemsize]
        got, want = got.view(bits), want.view(bits)
    a, b = got.astype(np.int64), want.astype(np.int64)
    return int(np.abs(a - b).max()) if a.size else 0


def _assert_plan(got, want, where, calls: int = 1):
    """GPU against host plan arrays (int32/int64: counters, flags, keys; else values or their bits): see
    :data:`PLAN_ULPS`."""
    if SIM or got.dtype in (np.int32, np.int64):
        assert np.array_equal(got, want), where
    else:
        assert _ulps(got, want) <= PLAN_ULPS * calls, (where, got, want)


@pytest.mark.parametrize("plan_kw", [dict(decay=[PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2, compensate=True,
                                           debias=True), dict(decay=NumUpdates(0.999)),
                                      dict(decay=[PowerFunction.of(0.05), PowerFunction.of(0.1)], update_every=3),
                                      dict(decay=HalfLife(50.0))])
def test_plan_kernel_matches_cpu(plan_kw):
    from fastema.average import Plan
    from fastema.average._device_plan import parameters
    from fastema.kernels import cpu as kcpu
    from fastema.kernels.kinds import S_NORMS

    plan = Plan(**plan_kw)
    params, decays = parameters(plan, (3 << 32) + 9)
    k = plan.rows
    host = dict(state=np.zeros(S_NORMS + k), w32=np.zeros(k, np.float32), w64=np.zeros(k), flag=np.zeros(1, np.int32),
                keys=np.zeros(3, np.int64))
    dev = {name: cuda.to_device(v) for name, v in host.items()}
    d_params, d_decays = cuda.to_device(params), cuda.to_device(decays)
    for call in range(7):
        given = 100 + call if call == 4 else -1
        kcpu.plan_kernel()(host["state"], params, decays, given, host["w32"], host["w64"], host["flag"], host["keys"])
        launch(ema_cuda.plan_kernel(), 1, 8, dev["state"], d_params, d_decays, np.int64(given),
               dev["w32"], dev["w64"], dev["flag"], dev["keys"])
        for name, v in host.items():
            _assert_plan(dev[name].copy_to_host(), v, (call, name), call + 1 if name == "state" else 1)


def test_the_bound_plan_step_and_nonfinite_scan_match_the_cpu():
    """``prepare("plan", ...)`` / ``prepare("nonfinite", ...)`` on the device (issue 37, D5): the plan arrays as the CPU
    plan kernel leaves them call after call, the flag set by a NaN in the sources."""
    from fastema.average import Plan
    from fastema.average._device_plan import parameters
    from fastema.kernels import cpu as kcpu
    from fastema.kernels.kinds import S_NORMS

    plan = Plan(decay=[PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2, debias=True)
    params, decays = parameters(plan, 11)
    host = dict(state=np.zeros(S_NORMS + 2), w32=np.zeros(2, np.float32), w64=np.zeros(2),
                flag=np.zeros(1, np.int32), keys=np.zeros(3, np.int64))
    dev = {name: cuda.to_device(v) for name, v in host.items()}
    dev.update(params=cuda.to_device(params), decays=cuda.to_device(decays))
    step = _launch.Group("cuda:0", None, 0, None).launch("plan", **{k: dev[k] for k in _launch.OPS["plan"].fixed})
    for call in range(5):
        given = 30 if call == 2 else -1
        step(given)
        kcpu.plan_kernel()(host["state"], params, decays, given, host["w32"], host["w64"], host["flag"], host["keys"])
        for name, v in host.items():
            _assert_plan(dev[name].copy_to_host(), v, (call, name), call + 1 if name == "state" else 1)
    srcs = [np.ones(n, np.float32) for n in (20, 33)]
    d = [cuda.to_device(x) for x in srcs]
    flat = fastema.FlatShadow(d)
    flag = cuda.to_device(np.zeros(1, np.int32))
    scan = _launch.prepare("nonfinite", flat.layout.groups[0], flag=flag)
    scan()
    assert flag.copy_to_host()[0] == 0
    srcs[1][30] = np.inf
    d[1].copy_to_device(srcs[1])
    scan()
    assert flag.copy_to_host()[0] == 1


@pytest.mark.parametrize("sk,xk,stochastic", [(F32, F32, False), (F32, BF16, False), (BF16, F32, True),
                                               (kinds.F64, kinds.F64, False)])
def test_fused_plan_and_lerp_equals_the_plan_kernel_then_the_lerp(sk, xk, stochastic):
    """One launch of plan_lerp_kernel over several blocks (grid-stride, fewer blocks than chunks)
    leaves the plan arrays, the done counter and the shadow exactly as the plan kernel followed by
    the device-key lerp, call after call: skipped calls (update_every), debiased warm-up weights,
    an explicit step, the rounding key of group 1 of 3; and as the CPU twin."""
    from fastema.average import Plan
    from fastema.average._device_plan import parameters
    from fastema.kernels.kinds import S_NORMS

    rng = np.random.default_rng(11 + sk)
    plan = Plan(decay=[PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2, debias=True)
    params, decays = parameters(plan, (5 << 32) + 3)
    counts = [37, 0, 64, 9]
    srcs = sources(xk, counts, rng) if xk != kinds.F64 else [rng.standard_normal(c) for c in counts]
    off, cs, cb = host_tables(counts)
    n = int(off[-1])
    shadow = random_bits(sk, 2 * n, rng) if sk != kinds.F64 else rng.standard_normal(2 * n)
    itemsize = shadow.itemsize
    host = dict(state=np.zeros(S_NORMS + 2), w32=np.zeros(2, np.float32), w64=np.zeros(2),
                flag=np.zeros(1, np.int32), keys=np.zeros(3, np.int64), done=np.zeros(1, np.int32))
    two = {name: {k: cuda.to_device(v) for k, v in host.items()} for name in ("fused", "apart")}
    cpu = {k: v.copy() for k, v in host.items()}
    p, dec = cuda.to_device(params), cuda.to_device(decays)
    _, addr = cuda_sources(srcs)
    shadows = {name: cuda.to_device(shadow) for name in two}
    cpu_shadow = shadow.copy()
    tables = {name: [cuda.to_device(a) for a in (_launch.flat_shadow(dev_addr(d), counts, itemsize), addr, off, cs, cb)]
              for name, d in shadows.items()}
    cpu_tables = (_launch.flat_shadow(cpu_shadow.ctypes.data, counts, itemsize),
                  np.array([s.ctypes.data for s in srcs], np.int64), off, cs, cb)
    fused, lerp = ema_cuda.plan_lerp_kernel(sk, xk, stochastic), ema_cuda.lerp_kernel(sk, xk, stochastic, True)
    wide = sk == kinds.F64
    for call in range(6):
        given = np.int64(40 + call if call == 3 else -1)
        f, a = two["fused"], two["apart"]
        launch(fused, 3, 8, n, *tables["fused"], f["state"], p, dec, given, f["w32"], f["w64"],
               f["flag"], f["keys"], f["done"], np.int64(1))
        launch(ema_cuda.plan_kernel(), 1, 8, a["state"], p, dec, given, a["w32"], a["w64"],
               a["flag"], a["keys"])
        launch(lerp, 3, 8, n, *tables["apart"], a["w64"] if wide else a["w32"], a["flag"],
               a["keys"][1:2])
        ema_cpu.plan_lerp_kernel(sk, xk, stochastic, False)(n, *cpu_tables, cpu["state"], params, decays, given,
                                                            cpu["w32"], cpu["w64"], cpu["flag"], cpu["keys"],
                                                            cpu["done"], 1)
        for name in host:
            assert np.array_equal(f[name].copy_to_host(), a[name].copy_to_host()), (call, name)   # GPU and GPU
            _assert_plan(f[name].copy_to_host(), cpu[name], (call, name), call + 1 if name == "state" else 1)
        assert f["done"].copy_to_host()[0] == 0
        got = shadows["fused"].copy_to_host()
        assert np.array_equal(got, shadows["apart"].copy_to_host()), call
        _assert_plan(got, cpu_shadow, (call, "shadow"), call + 1)
    assert not np.array_equal(got, shadow)                      # the due calls wrote


VECTOR_CASES = list(itertools.product([(64, 7, 40, 33, 3, 49), (64, 7, 40, 33, 3, 48)], (1, 2), (0, 1)))
"""n = 196, or 195 (rows after the first not 16-byte aligned); shift 1: every source a view one element in."""


def _vector_case(src_kind, counts, rows, shift, rng):
    """Run the float32-shadow lerp on the device and its CPU twin over one case; the two shadows."""
    srcs = [random_bits(src_kind, c + shift, rng) for c in counts]
    shadow = [random_bits(F32, rows * c, rng) for c in counts]
    flat_host = np.concatenate([np.stack(np.split(sh, rows)) for sh in shadow], axis=1)
    d_src = [cuda.to_device(x) for x in srcs]
    d_shadow = cuda.to_device(np.ascontiguousarray(flat_host))
    off, cs, cb = host_tables(counts)
    n = int(off[-1])
    seg_addr = np.array([dev_addr(d) + shift * d.dtype.itemsize for d in d_src], np.int64)
    shadow_addr = dev_addr(d_shadow) + off[:-1] * 4
    weights = (np.float32(0.25), np.float32(0.5))[:rows]
    flag = np.zeros(1, np.int32)
    tables = [cuda.to_device(a) for a in (shadow_addr, seg_addr, off, cs, cb, flag)]
    launch(ema_cuda.lerp_kernel(F32, src_kind, False), 3, 8, n, *tables[:5], weights, tables[5],
           np.uint32(0))
    host_shadow = np.ascontiguousarray(flat_host)
    host_src = [np.ascontiguousarray(x[shift:]) for x in srcs]
    ema_cpu.lerp_kernel(F32, src_kind, False, False)(
        n, host_shadow.ctypes.data + off[:-1] * 4, np.array([h.ctypes.data for h in host_src], np.int64),
        off, cs, cb, weights, np.zeros(1, np.int32), np.uint32(0))
    return d_shadow.copy_to_host(), host_shadow, n


@pytest.mark.skipif(not SIM, reason="counts the simulator's Python vector accesses; a GPU compiles them: "
                                    "test_vector_path_on_a_gpu_has_16_byte_accesses_and_matches_cpu")
@pytest.mark.parametrize("src_kind", KINDS)
def test_vector_path_matches_cpu_and_falls_back_where_unaligned(src_kind):
    """The float32-shadow lerp takes 16-byte shadow vectors (16- or 8-byte source vectors) where a
    chunk is aligned, element by element elsewhere (odd sizes shift later shadow segments, a view
    at an odd offset, rows of an odd length), and equals the CPU kernel bit for bit either way.
    The simulator's vector accesses fail on a misaligned address, as the hardware does. Counted
    where the simulator runs them as Python, its threads watched (``support.vectors``); a
    GPU compiles them (issue 37, B2)."""
    rng = np.random.default_rng(11)
    for counts, rows, shift in VECTOR_CASES:
        with vectors.counting() as used:
            got, want, n = _vector_case(src_kind, counts, rows, shift, rng)
        assert np.array_equal(got, want), (rows, shift)
        took_vectors = used["vectors"] > 0
        assert took_vectors == (shift == 0 and (rows == 1 or n % 4 == 0)), (counts, rows, shift)


@pytest.mark.skipif(not SIM, reason="counts the simulator's Python vector loads; on a GPU: "
                                    "test_vector_path_on_a_gpu_has_16_byte_accesses_and_matches_cpu")
def test_gpu_shadow_is_padded_so_every_source_takes_the_vector_path():
    """Odd tensor sizes would shift every later shadow segment off 16-byte alignment: on a GPU
    each source's shadow (and each row) starts aligned, the views still show the sources'
    shapes, and the update equals the CPU's packed shadow (simulator only: the vector loads are
    watched where the simulator runs them as Python, issue 37, B2)."""
    from fastema.kernels import _cuda_hw

    calls = []
    rng = np.random.default_rng(5)
    host = [rng.standard_normal(c).astype(np.float32) for c in (7, 33, 1, 64, 5)]
    dev = [cuda.to_device(h) for h in host]
    flat, ref = fastema.FlatShadow(dev, rows=2), fastema.FlatShadow(host, rows=2)
    g = flat.layout.groups[0]
    assert all(a % 16 == 0 for a in g.segments(g.buffer)) and g.n % 4 == 0 and g.n > sum(h.size for h in host)
    for h, d in zip(host, dev):
        h *= 3.0
        d.copy_to_device(h)
    loads = _cuda_hw.VECTORS["load4_u32"]
    with watching(loads, on_call=lambda arguments: calls.append(arguments["address"]), every_thread=True):
        flat.update([0.5, 0.75])
    ref.update([0.5, 0.75])
    for i in range(len(host)):
        for r in range(2):
            assert np.array_equal(flat.view(i, r).copy_to_host(), ref.view(i, r))
    # every source of 4 or more elements went through the vector path (its shadow and itself)
    assert {a - a % 16 for a in calls} >= {dev_addr(d) for d, h in zip(dev, host) if h.size >= 4}


@pytest.mark.skipif(SIM, reason="hardware: the shipped lerp's vector accesses (the simulator's twin counts them)")
@pytest.mark.parametrize("src_kind", KINDS)
def test_vector_path_on_a_gpu_has_16_byte_accesses_and_matches_cpu(src_kind):
    """On a GPU (the shipped kernels, where the simulator's counting closures cannot run): the
    float32-shadow lerp has 16-byte shadow loads and stores and 16- (float32) or 8-byte (16-bit)
    source loads in its shipped PTX (read, not compiled), and equals the CPU kernel bit for bit on
    aligned and misaligned cases alike; a FlatShadow's padded shadow starts every source 16-byte
    aligned and its update equals the CPU's (issue 37, B2)."""
    from fastema._launch.cuda import device_code

    rng = np.random.default_rng(11)
    for counts, rows, shift in VECTOR_CASES:
        got, want, n = _vector_case(src_kind, counts, rows, shift, rng)
        assert np.array_equal(got, want), (rows, shift)
    assert device_code.problem("cu13") is None, device_code.problem("cu13")
    name = f"lerp_kernel(0,{src_kind},0,0)["
    ptx = "\n".join(device_code.entry("cu13", k, "compute_80").code.decode()
                    for k in device_code.sets()["cu13"].index["variants"]
                    if k.startswith(name) and "UniTuple(float32 x 2)" in k)
    vector = r"global\.v4\.[bfu]"                 # 4 lanes of 32 bits (16 bytes) or of 16 bits (8)
    assert re.search(f"ld\\.{vector}32", ptx) and re.search(f"st\\.{vector}32", ptx)
    assert re.search(f"ld\\.{vector}{32 if src_kind == F32 else 16}", ptx)
    host = [rng.standard_normal(c).astype(np.float32) for c in (7, 33, 1, 64, 5)]
    dev = [cuda.to_device(h) for h in host]
    flat, ref = fastema.FlatShadow(dev, rows=2), fastema.FlatShadow(host, rows=2)
    g = flat.layout.groups[0]
    assert all(a % 16 == 0 for a in g.segments(g.buffer)) and g.n % 4 == 0
    for h, d in zip(host, dev):
        h *= 3.0
        d.copy_to_device(h)
    flat.update([0.5, 0.75])
    ref.update([0.5, 0.75])
    for i in range(len(host)):
        for r in range(2):
            assert np.array_equal(flat.view(i, r).copy_to_host(), ref.view(i, r))


def test_handed_over_sources_alternate_between_two_address_tables(watched):
    """JAX and TensorFlow hand over new arrays every step, usually at two alternating sets of
    addresses: the second table is made at construction, and a repeat switches tables with no
    copy; torch-like frameworks keep one table, rewritten in place."""
    writes = watched.copies
    a, b, c = ([cuda.to_device(np.full(n, v, np.float32)) for n in (8, 3)] for v in (1.0, 2.0, 3.0))
    addr = lambda xs: [dev_addr(x) for x in xs]  # noqa: E731
    t = _launch.tables(addr(a), [8, 3], [0, 0], "cuda:0", handed_over=True)
    assert len(t.staging.arrays) == 2
    seen = []
    for step, xs in enumerate([b, a, b, a, c, a]):
        t = _launch.update_addresses(t, addr(xs), "cuda:0")
        assert list(t.seg_addr.copy_to_host()) == addr(xs)
        seen.append(id(t.seg_addr))
    assert len(writes) == 2                                  # b once, c once; the repeats switch tables
    assert len(set(seen)) == 2
    one = _launch.tables(addr(a), [8, 3], [0, 0], "cuda:0")
    first = one.seg_addr
    for xs in (b, a):
        one = _launch.update_addresses(one, addr(xs), "cuda:0")
        assert one.seg_addr is first and list(first.copy_to_host()) == addr(xs)


class _Capture:
    """``capture["on"] = True``: the launch driver says every stream is capturing a CUDA graph (its
    capture query, ``cuStreamIsCapturing``, answered by :class:`Watching`: the simulator has no
    graphs)."""

    def __init__(self, driver):
        self.driver = driver
        driver.capture = False

    def __setitem__(self, key, on):
        self.driver.capture = on


@pytest.fixture
def capture(watched):
    return _Capture(watched)


def test_new_tables_during_a_capture_are_refused_and_a_captured_pairs_tables_are_never_freed(capture):
    """A new array pair (or shadow) during a CUDA graph capture would allocate and upload its tables, which
    a capture forbids: refused with the way out, nothing written. A pair used inside a capture keeps its
    tables for good: neither the pair cache's eviction nor fastema.clear_caches() frees what the graph
    reads at every replay; clear_caches() during a capture is refused (issue 37, C3)."""
    a, b = cuda.to_device(np.zeros(10, np.float32)), cuda.to_device(np.ones(10, np.float32))
    capture["on"] = True
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured.*once before the capture"):
        fastema.ema_update_(a, b, decay=0.5)
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        fastema.FlatShadow([b])
    assert not a.copy_to_host().any()
    capture["on"] = False
    fastema.ema_update_(a, b, decay=0.5)                  # the warm-up call, outside
    from fastema._launch.cuda.launch import CAPTURED

    pinned = len(CAPTURED)
    capture["on"] = True
    fastema.ema_update_(a, b, decay=0.5)                  # captured: its tables kept from now on
    assert len(CAPTURED) == pinned + 1
    tables = CAPTURED[-1]
    with pytest.raises(RuntimeError, match=r"fastema.clear_caches\(\) while a CUDA graph is being captured"):
        fastema.clear_caches()
    assert len(fastema.ops._GROUPS)
    capture["on"] = False
    fastema.clear_caches()
    assert not len(fastema.ops._GROUPS) and CAPTURED[-1] is tables
    assert int(tables.seg_addr.copy_to_host()[0]) == dev_addr(b)  # alive, still the pair's table


def test_following_moved_sources_during_a_capture_is_refused_with_nothing_changed(capture):
    """A rebind during a capture would record a copy of the new addresses from a pinned slot that is
    reused later (replays would read stale addresses) and may query an event, which a capture forbids:
    refused before anything changes; the same update after the capture follows the sources."""
    host = [np.arange(n, dtype=np.float32) for n in (5, 40)]
    dev = [cuda.to_device(h) for h in host]
    flat = fastema.FlatShadow(dev)
    g = flat.layout.groups[0]
    flat.update(0.5)
    before = g.tables.seg_addr.copy_to_host().copy()
    moved = [cuda.to_device(h + 1) for h in host]
    capture["on"] = True
    flat.update(0.5)                                      # no change of sources: captured as usual
    with pytest.raises(RuntimeError, match="following moved or new sources while a CUDA graph is being captured"):
        flat.update(0.0, sources=moved)
    assert flat.sources == dev and np.array_equal(g.tables.seg_addr.copy_to_host(), before)
    capture["on"] = False
    flat.update(0.0, sources=moved)                       # weight 1: the shadow becomes the moved sources
    assert all(np.array_equal(flat.view(i).copy_to_host(), h + 1) for i, h in enumerate(host))


def test_device_and_host_mixed_is_refused():
    d = cuda.to_device(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="cuda:0 but src is on cpu"):
        fastema.ema_update_(d, np.ones(10, np.float32), decay=0.5)
    assert not d.copy_to_host().any()


@pytest.mark.skipif(SIM, reason="hardware: torch CUDA tensors written on a side stream")
def test_torch_cuda_tensors_on_the_current_stream():
    import torch

    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=dt) for s, dt in
              [((1000,), torch.float32), ((33, 7), torch.bfloat16), ((5,), torch.float16)]]
    ref = [p.float().clone() for p in params]
    flat = fastema.FlatShadow(params)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for p in params:
            p.add_(1.0)
        flat.update(0.9)
        for r, p in zip(ref, params):
            r.lerp_(p.float(), 0.1)
    torch.cuda.synchronize()
    for r, v in zip(ref, flat.views().values()):
        torch.testing.assert_close(v, r, rtol=1e-6, atol=1e-6)
    shadow = torch.zeros(4096, device="cuda")
    src = torch.randn(4096, device="cuda")
    expected = shadow.clone().lerp_(src, 0.001)
    fastema.ema_update_(shadow, src, decay=0.999)
    assert torch.equal(shadow, expected)


def _busy_after(fn):
    """Run ``fn`` while the GPU is kept busy (~0.2 s); True when the GPU was still busy once
    ``fn`` returned, i.e. ``fn`` made no host sync. (torch's sync-debug mode cannot see the
    driver calls numba makes.)"""
    import torch

    torch.cuda._sleep(int(3e8))
    fn()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return busy


@pytest.mark.skipif(SIM, reason="hardware: a side stream's writes ordered before the update (two real streams)")
def test_update_on_a_side_stream_is_ordered_after_that_streams_writes():
    import torch

    p = torch.zeros(1 << 20, device="cuda")
    flat = fastema.FlatShadow([p])                       # made on the default stream
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(1e8))                      # the write below lands late
        p.fill_(1.0)
        flat.update(0.0)                                 # weight 1: the shadow becomes the source
    torch.cuda.synchronize()
    assert torch.equal(flat.view(0), torch.ones_like(p))


@pytest.mark.skipif(SIM, reason="hardware: torch's sync debug mode sees a real device's host syncs")
def test_no_host_sync_in_updates_rebinds_and_new_pairs():
    import torch

    params = [torch.randn(4096, device="cuda") for _ in range(10)]
    flat = fastema.FlatShadow(params)
    weight = torch.full((1,), 0.1, device="cuda")
    flat.update(weight=weight)
    flat.update(0.99, skip_nonfinite=True)               # compile outside the checks
    torch.cuda.synchronize()
    assert _busy_after(lambda: flat.update(0.99))
    assert _busy_after(lambda: flat.update(weight=weight))
    assert _busy_after(lambda: flat.update(0.99, skip_nonfinite=True))

    def rebinds():
        # A rebind writes the new addresses from a pinned staging slot on the stream; a slot is reused
        # once its copy has run. So CUDA_STAGING_SLOTS rebinds in a row behind a busy GPU make no host
        # wait, and the one after them, every slot's copy still queued, waits for the oldest: by
        # design (issue 37, B3), checked here up to the slots.
        for _ in range(_launch.config.CUDA_STAGING_SLOTS):
            params[0].data = torch.randn(4096, device="cuda")
            flat.update(0.99)

    assert _busy_after(rebinds)
    a, b = torch.zeros(1000, device="cuda"), torch.ones(1000, device="cuda")
    assert _busy_after(lambda: fastema.ema_update_(a, b, decay=0.5))    # a new pair
    torch.cuda.synchronize()
    assert torch.equal(a, torch.full_like(a, 0.5))


@pytest.mark.skipif(SIM, reason="hardware: a CUDA graph captured and replayed by the driver")
def test_cuda_graph_replays_read_the_sources_and_weight_of_each_replay():
    import torch

    params = [torch.randn(s, device="cuda") for s in (4096, 7, 1000)]
    flat = fastema.FlatShadow(params)
    weight = torch.full((1,), 0.1, device="cuda")
    flat.update(weight=weight)                           # compiled before the capture
    torch.cuda.synchronize()
    expected = [v.double() for v in flat.views().values()]
    torch._foreach_add_(params, 1.0)                     # the sources are not the shadow any more
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        flat.update(weight=weight)                       # recorded, not run
    torch.cuda.synchronize()
    for e, v in zip(expected, flat.views().values()):
        assert torch.equal(v.double(), e)
    for w in (0.5, 0.25, 0.125):
        torch._foreach_add_(params, 1.0)
        weight.fill_(w)
        g.replay()
        expected = [e + w * (p.double() - e) for e, p in zip(expected, params)]
        torch.cuda.synchronize()
        for e, v in zip(expected, flat.views().values()):
            torch.testing.assert_close(v.double(), e, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(SIM, reason="hardware: torch's sync debug mode sees a real device's host syncs")
def test_torch_ema_on_gpu_without_host_sync():
    import torch
    from torch import nn

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8)).cuda()
    ema = EMA(model, 0.9)                                 # device_step: on by default on a GPU
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    model(torch.randn(16, 64, device="cuda"))
    ema.update()
    torch.cuda.synchronize()

    def steps():
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            ema.update()
            for n, p in model.named_parameters():
                ref[n].lerp_(p.detach().float(), 0.1)

    assert _busy_after(steps)
    assert _busy_after(lambda: ema.swap()) and _busy_after(lambda: ema.swap())
    state = ema.state_dict()["averaged"]
    for n, r in ref.items():
        torch.testing.assert_close(state[n][0], r.cpu(), rtol=1e-5, atol=1e-6)
    # host copies, one contiguous storage a tensor (a GPU shadow's entries were views of one pinned copy)
    assert all(v.device.type == "cpu" and v.is_contiguous() and
               v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in state.values())


@pytest.mark.skipif(SIM, reason="hardware: torch's sync debug mode sees a real device's host syncs")
@pytest.mark.parametrize("kw", [dict(decay=PowerWarmup(0.99), update_every=2),
                                dict(decay=[0.9, 0.999], debias=True, skip_nonfinite=True),
                                dict(decay=PowerWarmup(0.999), shadow_dtype="bfloat16", rounding="stochastic"),
                                dict(decay=[PowerFunction.of(0.05), PowerFunction.of(0.1)], update_every=2),
                                dict(decay=HalfLife(3.0))])
def test_torch_ema_captured_once_and_replayed_equals_eager_calls(kw):
    """EMA.update() captured in a CUDA graph and replayed N times equals N eager calls bit for
    bit: the warm-up schedule, update_every's skips and the stochastic-rounding key advance on
    the device at each replay."""
    import torch
    from torch import nn

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8)).cuda()
    graphed, eager = EMA(model, **kw), EMA(model, **kw)
    assert graphed.device_step
    params = list(model.parameters())
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        graphed.update()                                  # recorded, not run (kernels compiled at construction)
    torch.cuda.synchronize()
    assert graphed.state_dict()["updates"] == 0
    for step in range(7):
        with torch.no_grad():
            torch._foreach_add_(params, 0.01 * (step + 1))
            model[1].running_mean.add_(0.1)
        g.replay()
        eager.update()
        torch.cuda.synchronize()
    a, b = graphed.state_dict(), eager.state_dict()
    assert (a["updates"], a["calls"], a["norms"]) == (b["updates"], b["calls"], b["norms"])
    for part in ("averaged", "copied"):
        for name, t in b.get(part, {}).items():
            assert torch.equal(a[part][name], t), (part, name)


@pytest.mark.parametrize("ring_kind", [F32, BF16])
def test_window_kernel_matches_cpu(ring_kind):
    rng = np.random.default_rng(11)
    counts, window = [9, 30], 3
    off, cs, cb = host_tables(counts)
    n = int(off[-1])
    rb = 4 if ring_kind == F32 else 2
    cpu_sh, cpu_ring = np.zeros(3 * n, np.float32), np.zeros(window * n, UINT[ring_kind])
    d_sh, d_ring = cuda.to_device(cpu_sh), cuda.to_device(cpu_ring)
    cpu_tabs = (shadow_table(cpu_sh.ctypes.data, counts, F32), _launch.flat_shadow(cpu_ring.ctypes.data, counts, rb))
    dev_ring_tab = cuda.to_device(_launch.flat_shadow(dev_addr(d_ring), counts, rb))
    for push in range(7):
        srcs = [rng.standard_normal(c).astype(np.float32) for c in counts]
        slot, full, count = push % window, push >= window, min(push + 1, window)
        recompute = slot == window - 1
        host_addr = np.array([s.ctypes.data for s in srcs], np.int64)
        ema_cpu.window_kernel(ring_kind, F32, False)(n, cpu_tabs[0], host_addr, off, cs, cb, cpu_tabs[1], slot,
                                                     full, count, recompute)
        _, addr = cuda_sources(srcs)
        tabs = [cuda.to_device(a) for a in (shadow_table(dev_addr(d_sh), counts, F32), addr, off, cs, cb)]
        launch(ema_cuda.window_kernel(ring_kind, F32), 2, 8, n, *tabs, dev_ring_tab, slot, full,
               count, recompute)
    np.testing.assert_array_equal(d_ring.copy_to_host(), cpu_ring)
    np.testing.assert_allclose(d_sh.copy_to_host(), cpu_sh, rtol=2e-7, atol=1e-7)


@pytest.mark.skipif(SIM, reason="hardware: CuPy device arrays written on a side stream")
def test_cupy_arrays_on_cupys_current_stream():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) for s in (1000, (33, 7), 5)]
    params = [cp.asarray(h) for h in host]
    ref = [h.astype(np.float64) for h in host]
    flat = fastema.FlatShadow(params)
    side = cp.cuda.Stream(non_blocking=True)
    with side:                                               # fastema launches on CuPy's current stream
        for p in params:
            p += 1.0
        flat.update(0.9)
    side.synchronize()
    for r, h, v in zip(ref, host, flat.views().values()):
        np.testing.assert_allclose(v.copy_to_host(), 0.9 * r + 0.1 * (h + 1.0), rtol=1e-6, atol=1e-6)
    shadow, src = cp.zeros(4096, cp.float32), cp.asarray(rng.standard_normal(4096).astype(np.float32))
    fastema.ema_update_(shadow, src, decay=0.999)
    np.testing.assert_allclose(cp.asnumpy(shadow), 0.001 * cp.asnumpy(src).astype(np.float64), rtol=1e-6)


@pytest.mark.skipif(SIM, reason="hardware: JAX GPU arrays under jit")
def test_jax_ema_on_gpu_arrays():
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this JAX has no GPU backend")
    import jax.numpy as jnp

    from fastema.jax import EMA

    params = {"w": jnp.ones((300, 7)), "b": jnp.zeros(33, jnp.bfloat16)}
    ema = EMA(params, 0.9)
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x + 1, p))
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for _ in range(50):                                   # new arrays every step: old ones are freed
        params = step(params)
        ema.update(params)
        ref = {k: 0.9 * ref[k] + 0.1 * np.asarray(params[k], np.float64) for k in ref}
    shadow = ema.shadow()
    assert {k: (v.dtype, v.shape, v.devices()) for k, v in shadow.items()} == \
        {k: (v.dtype, v.shape, v.devices()) for k, v in params.items()}
    np.testing.assert_allclose(np.asarray(shadow["w"]), ref["w"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(shadow["b"], np.float64), ref["b"], rtol=2 ** -7)


@pytest.mark.skipif(SIM, reason="hardware: torch.compile's reduce-overhead records CUDA graphs")
def test_offloaded_ema_on_a_gpu_equals_the_synchronous_one_and_does_not_wait():
    """offload="cpu" on a GPU model: pack on a side stream after the optimizer's writes, D2H into
    pinned slots, fold on the worker; bit-exact against the synchronous host-planned EMA, the
    update returns while the GPU is still busy, and the swap goes through the host slot."""
    import torch
    from torch import nn

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda().bfloat16()
    sync = EMA(model, [0.99, 0.9], device_step=False)
    off = EMA(model, [0.99, 0.9], offload="cpu")
    assert all(s.is_pinned() for ring in off._avg._ring_of.values() for s in ring.slots)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(6):
        torch.cuda._sleep(int(1e7))                       # the optimizer's writes land late
        model(torch.randn(32, 64, device="cuda").bfloat16()).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        sync.update()
        off.update()
    a, b = sync.state_dict()["averaged"], off.state_dict()["averaged"]
    assert all(torch.equal(a[k].cpu(), b[k]) for k in a)
    fresh = EMA(model, 0.9, offload="cpu")
    assert _busy_after(fresh.update)
    x = torch.randn(4, 64, device="cuda").bfloat16()
    with sync.average_parameters():
        want = model(x)
    with off.average_parameters():
        got = model(x)
    assert torch.equal(got, want)


@pytest.mark.compiles                             # torch.compile: inductor and Triton, many seconds
@pytest.mark.skipif(SIM, reason="hardware: torch.compile's reduce-overhead records CUDA graphs")
@pytest.mark.parametrize("shadow_dtype, rounding", [("float32", "nearest"), ("bfloat16", "stochastic")])
def test_compiled_step_with_reduce_overhead_replays_equal_eager(shadow_dtype, rounding):
    """torch.compile(mode="reduce-overhead"): the step with ema.update() inside is recorded into
    CUDA graphs and replayed; the device plan advances at every replay (power warm-up), so the
    average equals an eager EMA of the same weights, bit for bit."""
    import torch
    from torch import nn

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda().bfloat16()
    kw = dict(shadow_dtype=shadow_dtype, rounding=rounding, seed=5)
    decays = [PowerWarmup(0.99), PowerWarmup(0.9)]
    inside, eager = EMA(model, decays, **kw), EMA(model, decays, **kw)
    params = list(model.parameters())

    def step(direction):
        with torch.no_grad():
            torch._foreach_add_(params, direction)
            inside.update()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for i in range(8):
        compiled([torch.full_like(p, 0.01 * (i % 3)) for p in params])
        eager.update()
    torch.cuda.synchronize()
    a, b = inside.state_dict(), eager.state_dict()
    assert (a["updates"], a["calls"]) == (b["updates"], b["calls"]) == (8, 8)
    for k in a["averaged"]:
        assert torch.equal(a["averaged"][k], b["averaged"][k]), k


@pytest.mark.compiles
@pytest.mark.skipif(SIM, reason="hardware: torch.compile's reduce-overhead records CUDA graphs")
def test_reduce_overhead_really_captures_and_replays_a_cuda_graph():
    """torch.compile(mode="reduce-overhead") with ema.update() inside records a CUDA graph and replays it:
    cudagraph trees skip (and run eagerly, which an equality check cannot tell) any graph that mutates an
    input that is not static (a parameter, a buffer, or a tensor marked with mark_static_address), and
    fastema's update mutates its shadow and device plan. No skip may be counted, and the replays equal
    eager calls bit for bit (issue 37, B5)."""
    import torch
    from torch import nn
    from torch._dynamo.utils import counters

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda()
    inside, eager = EMA(model, PowerWarmup(0.99)), EMA(model, PowerWarmup(0.99))
    params = list(model.parameters())

    def step():
        with torch.no_grad():
            torch._foreach_add_(params, 0.01)
            inside.update()

    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(6):
        compiled()
        eager.update()
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    a, b = inside.state_dict(), eager.state_dict()
    assert (a["updates"], a["calls"]) == (b["updates"], b["calls"]) == (6, 6)
    for k in a["averaged"]:
        assert torch.equal(a["averaged"][k], b["averaged"][k]), k


@pytest.mark.compiles
@pytest.mark.skipif(SIM, reason="hardware: torch.compile's reduce-overhead records CUDA graphs")
def test_the_plain_update_written_in_a_reduce_overhead_graph_replays_equal_eager():
    """The plain case (float32 model and shadow, nearest rounding, the plan on the GPU: issue 86 item 2)
    is written in the compiled graph: no fastema operator in the generated code; the step is recorded
    into a CUDA graph (no cudagraph skip) and replayed, the device plan's counters and warm-up decays
    advanced at every replay. Inductor's CUDA lerp is one FMA, as torch's eager lerp_ and fastema's
    kernel: the average equals an eager EMA of the same weights bit for bit, and the counters read back
    from the device (updates, calls, state_dict) equal eager's."""
    import torch
    from torch import nn
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from fastema.torch import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).cuda()
    decays = [PowerWarmup(0.99), PowerWarmup(0.9)]
    inside, eager = EMA(model, decays), EMA(model, decays)
    params = list(model.parameters())

    def step(direction):
        with torch.no_grad():
            torch._foreach_add_(params, direction)
            inside.update()

    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    code = ""
    for i in range(8):
        direction = [torch.full_like(p, 0.01 * (i % 3 + 1)) for p in params]
        if i == 0:
            code = "\n".join(run_and_get_code(compiled, direction)[1])
        else:
            compiled(direction)
        eager.update()
    torch.cuda.synchronize()
    assert "fastema" not in code and "torch.ops." not in code.split("def call(")[-1]
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert (inside.updates, inside.calls, inside.decay) == (eager.updates, eager.calls, eager.decay)
    a, b = inside.state_dict(), eager.state_dict()
    assert (a["updates"], a["calls"]) == (b["updates"], b["calls"]) == (8, 8)
    for k in a["averaged"]:
        assert torch.equal(a["averaged"][k], b["averaged"][k]), k
