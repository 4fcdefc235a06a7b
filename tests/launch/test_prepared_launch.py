"""The prepared "lerp" launch (``fastema._launch.prepare("lerp", ...)``): what a target network calls per
step. It must write exactly what ``_launch.launch("lerp", ...)`` writes for every kind, row count,
rounding and serial/parallel choice, follow the launch tunables and a fork's serial twins as
``launch`` does, and call no numba dispatcher after its first call (issue #23: no per-call type
resolution on the per-step path)."""
import contextlib

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.calls import watching

from fastema import FlatShadow, _launch
from fastema._launch import config
from fastema._launch.cpu import launch as B
from fastema._launch.cpu import pool as C
from fastema._launch.cpu import threads
from fastema.kernels import cpu as K

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@contextlib.contextmanager
def counted(kernel, calls: list):
    """For the ``with`` block, each call of the numba dispatcher ``kernel`` appends to ``calls`` (its
    class swapped for a counting subclass, put back after)."""
    class Counting(type(kernel)):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    original = type(kernel)
    kernel.__class__ = Counting
    try:
        yield
    finally:
        kernel.__class__ = original


def _sources(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(DTYPES[dtype]) for n in sizes], g


def _bits(t):
    return t.view(torch.uint8) if t.numel() else t


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
       kinds=st.sampled_from([("float32", "float32"), ("bfloat16", "float32"), ("float32", "bfloat16"),
                              ("float16", "float16"), ("float64", "float64"), ("bfloat16", "bfloat16")]),
       rows=st.integers(1, 3), serial_below=st.sampled_from([0, 1 << 15]), key=st.integers(0, 2 ** 32 - 8),
       seed=st.integers(0, 99))
def test_writes_what_launch_writes(sizes, kinds, rows, serial_below, key, seed):
    src_dtype, shadow_dtype = kinds
    sources, gen = _sources(sizes, src_dtype, seed)
    stochastic = shadow_dtype == "bfloat16"
    weights = tuple(0.5 - 0.1 * r for r in range(rows))
    with config.tuned(CPU_SERIAL_BELOW=serial_below, CPU_CHUNK=1024):  # work items, parallel or not
        a, b = (FlatShadow(sources, rows=rows, dtype=shadow_dtype) for _ in range(2))
        start = [a.view(i, 0).double().clone() for i in range(len(sources))]
        with torch.no_grad():
            for s in sources:
                s.add_(torch.randn(s.shape, generator=gen).to(s.dtype))
        runs = [_launch.prepare("lerp", g, stochastic=stochastic) for g in b.layout.groups]
        for step in range(3):
            k = key + step if stochastic else 0
            for g in a.layout.groups:
                _launch.launch("lerp", g, weights=weights, key=k, stochastic=stochastic)
            for run in runs:
                run(weights, k)
    for r in range(rows):
        for i in range(len(sources)):
            assert torch.equal(_bits(a.view(i, r)), _bits(b.view(i, r))), (r, i)
    if shadow_dtype == src_dtype and shadow_dtype in ("float32", "float64"):   # and it is the lerp
        for i, s in enumerate(sources):
            ref = start[i]
            for _ in range(3):
                ref = ref + weights[0] * (s.double() - ref)
            assert torch.allclose(b.view(i, 0).double(), ref, rtol=1e-6, atol=1e-6)


def test_no_numba_dispatcher_after_the_first_call():
    sources = [torch.randn(70_000), torch.randn(300), torch.randn(1)]
    fs = FlatShadow(sources, rows=2)
    (g,) = fs.layout.groups
    kernels = {par: K.lerp_kernel(g.shadow_kind, g.src_kind, False, par, False) for par in (False, True)}
    calls = []

    def counting(dispatcher):
        class Counting(type(dispatcher)):
            def __call__(self, *args, **kwargs):
                calls.append(self)
                return super().__call__(*args, **kwargs)
        return Counting

    originals = {par: type(k) for par, k in kernels.items()}
    ref = [s.double().clone() for s in sources]
    with torch.no_grad():
        for s in sources:
            s.mul_(-1)
    try:
        for k in kernels.values():
            k.__class__ = counting(k)                   # every call of the dispatcher is recorded
        run = _launch.prepare("lerp", g)
        run((0.1, 0.2))
        assert len(calls) == 1                          # the first call: the dispatcher (compiles if needed)
        for w in [(0.1, 0.2)] * 4 + [(0.3, 0.4)]:       # new weights of the same type: the same entry point
            run(w)
        assert len(calls) == 1, "a per-step launch went through the numba dispatcher"
        run(np.array([0.5, 0.5], np.float32))           # another weights type: the dispatcher once more
        assert len(calls) == 2
        fs.update([0.5, 0.5])                           # launch() itself still goes through the dispatcher
        assert len(calls) == 3
    finally:
        for par, k in kernels.items():
            k.__class__ = originals[par]
    for i, s in enumerate(sources):                     # what the entry points wrote: the lerp, float64 reference
        for r in range(2):
            want = ref[i].clone()
            for w in [(0.1, 0.2)] * 5 + [(0.3, 0.4), (0.5, 0.5), (0.5, 0.5)]:
                want = want + w[r] * (s.double() - want)
            assert torch.allclose(fs.view(i, r).double(), want, rtol=1e-5, atol=1e-6), (i, r)


def test_follows_a_forks_serial_twins_and_the_tunables():
    sources = [torch.randn(150_000), torch.randn(150_000)]      # 300k elements: over the serial threshold (256k)
    fs = FlatShadow(sources)
    (g,) = fs.layout.groups
    run = _launch.prepare("lerp", g)
    seen: list = []
    # the first call of each variant goes through C.run (the dispatcher), the later ones through the
    # kept entry point; threads.run_on runs a parallel twin
    with watching(C.run, on_call=lambda a: seen.append(("dispatcher", a["parallel"]))), \
            watching(threads.run_on, on_call=lambda a: seen.append("parallel twin")):
        run((0.1,))
        with C.serial_twins():                       # a child forked after OpenMP: the serial twin
            run((0.1,))
        run((0.1,))                                      # the parallel entry point, reused
        with config.tuned(CPU_SERIAL_BELOW=1 << 30):     # a tunable grown after preparation
            run((0.1,))                                  # the serial entry point, reused
    assert seen == [("dispatcher", True), "parallel twin", ("dispatcher", False), "parallel twin"]
    assert set(run._calls) == {(True, (np.float32, 1), B._HOST_KEY), (False, (np.float32, 1), B._HOST_KEY)}


def test_empty_group_launches_nothing():
    fs = FlatShadow([torch.zeros(0)])
    for g in fs.layout.groups:
        _launch.prepare("lerp", g)((0.5,))
    assert fs.view(0).numel() == 0


def test_a_callers_flag_is_viewed_again_at_every_call():
    """Only flags fastema made are bound once: a caller's ``skip_if`` flag whose memory is replaced
    between calls (``flag.data = ...``) is read where it is now, by the lerp and the copy alike."""
    src = [torch.randn(100)]
    fs = FlatShadow(src)
    before = fs.view(0).clone()
    flag = torch.zeros(1, dtype=torch.int32)
    with torch.no_grad():
        src[0].add_(1.0)
    fs.update(0.5, skip_if={"cpu": flag})
    assert not torch.equal(fs.view(0), before)           # flag 0: updated
    kept = fs.view(0).clone()
    flag.data = torch.ones(1, dtype=torch.int32)         # new memory under the same object
    with torch.no_grad():
        src[0].add_(1.0)
    fs.update(0.5, skip_if={"cpu": flag})
    fs.copy_from_sources(skip_if={"cpu": flag})
    assert torch.equal(fs.view(0), kept)                 # skipped: the new memory was read
    own = fs.scan_nonfinite()                            # fastema's own flag: bound once, still right
    fs.update(0.5, skip_if=own)
    assert not torch.equal(fs.view(0), kept)


def test_a_model_averages_buffer_copy_is_bound_once():
    """EMA(device_step=True) copies its floating buffers (BatchNorm statistics) behind the plan's
    flag at every call: after the first call no copy launch goes through the numba dispatcher, and the
    copies are the buffers' values (the host-planned EMA's, bit for bit)."""
    from fastema.torch import EMA

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    dev, host = EMA(m, decay=0.9, device_step=True), EMA(m, decay=0.9, device_step=False)
    (g,) = dev._copy.layout.groups
    k = K.copy_kernel(g.shadow_kind, g.src_kind, True, False)
    calls: list = []
    with counted(k, calls):
        for step in range(5):
            with torch.no_grad():
                m[1].running_mean.add_(1.0)
            m(torch.randn(8, 4))
            dev.update()
            host.update()
    assert len(calls) <= 1, "a per-step buffer copy went through the numba dispatcher"
    for name, t in host.state_dict()["copied"].items():
        assert torch.equal(dev.state_dict()["copied"][name], t), name


def test_the_plan_step_and_the_nonfinite_scan_bound_once_write_what_launch_writes():
    """``prepare("plan", ...)`` and ``prepare("nonfinite", ...)`` (issue 37, D5: the per-step ``plan`` and ``nonfinite``
    launches went through the dispatcher at every call, ~90 us each on the 11-22 GPU): after the first
    call no numba dispatcher, and the plan arrays and flags end as ``launch("plan"/"nonfinite")`` leaves
    them, call after call, with skipped calls (update_every) and an explicit step."""
    from fastema.average import Plan
    from fastema.average._device_plan import parameters
    from fastema.kernels.kinds import S_NORMS
    from fastema.schedules import PowerWarmup

    plan = Plan(decay=[PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2, debias=True)
    params, decays = parameters(plan, 7)

    def arrays():
        return dict(state=np.zeros(S_NORMS + 2), params=params.copy(), decays=decays.copy(),
                    w32=np.zeros(2, np.float32), w64=np.zeros(2), flag=np.zeros(1, np.int32),
                    keys=np.zeros(3, np.int64))

    group = _launch.Group("cpu", None, 0, None)
    bound, ref = arrays(), arrays()
    run = _launch.prepare("plan", group, **{k: bound[k] for k in _launch.OPS["plan"].fixed})
    calls: list = []
    with counted(K.plan_kernel(), calls):
        for call in range(6):
            given = 50 + call if call == 3 else -1
            run(given)
            _launch.launch("plan", group, given=given, **ref)
            for name in ref:
                assert np.array_equal(bound[name], ref[name]), (call, name)
        assert len(calls) == 1 + 6                      # run's first call, then launch() every call
    sources = [torch.randn(40_000), torch.randn(300)]
    fs = FlatShadow(sources)
    (g,) = fs.layout.groups
    flag = np.zeros(1, np.int32)
    scan = _launch.prepare("nonfinite", g, flag=flag)
    scan()
    assert flag[0] == 0
    with torch.no_grad():
        sources[1][7] = float("nan")
    scan()
    assert flag[0] == 1
