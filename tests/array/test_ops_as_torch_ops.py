"""The array functions behave as torch ops (issue 77 item 5; reliability round 9, M1 M2 M3 M7 L2):

- M1: every torch tensor they write has its autograd version bumped, as torch's own in-place ops do, on a
  first call and on a cached one: a backward that saved the old values raises instead of using new ones
  (``ema_update_``, ``ema_update_multi_``, ``copy_``, ``swap_``, ``flag_nonfinite_``, ``ema_update_many_``
  and the drop-ins built on them);
- M2: ``ema_update_many_`` takes mixed NumPy/torch pairs as ``ema_update_`` does;
- M3: the pair cache's described key holds what a first call checks (writability, framework): a shadow
  made read-only, or an immutable array over memory an earlier shadow used, is refused on a later call;
- M7: no cache outlives the launch driver or the stand-in GPU it was made on (after a fake-GPU block the
  same CPU tensors are updated, not "hit" as on the fake ``cuda:0``);
- L2: NumPy arrays a cached call holds by weak reference resize again after ``fastema.clear_caches()``
  (documented: docs/guides/arrays.md).
Results against a float64 reference."""
import numpy as np
import pytest
import torch
from support.arrays import DLPackOnly

import fastema
from fastema import _launch, ops, pairs


@pytest.fixture(autouse=True)
def _fresh():
    fastema.clear_caches()
    yield
    fastema.clear_caches()


def _saved(t: torch.Tensor):
    """A pending backward that saved ``t`` (``w * t``): its ``backward()`` raises once ``t`` was written."""
    w = torch.ones_like(t, requires_grad=True)
    return (w * t).sum()


def _raises_modified(y) -> None:
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


CALLS = {
    "ema_update_": lambda s, x: fastema.ema_update_(s, x, 0.5),
    "ema_update_ rounding=stochastic": lambda s, x: fastema.ema_update_(s.bfloat16(), x, 0.5),
    "ema_update_multi_": lambda s, x: fastema.ema_update_multi_(s.view(1, -1), x, [0.5]),
    "weight=": lambda s, x: fastema.ema_update_(s, x, weight=torch.tensor([0.5])),
    "copy_": lambda s, x: fastema.copy_(s, x),
    "ema_update_many_": lambda s, x: fastema.ema_update_many_([s], [x], 0.5),
}


@pytest.mark.parametrize("name", [n for n in CALLS if "stochastic" not in n])
@pytest.mark.parametrize("call", ["first", "cached"])
def test_every_written_tensors_version_is_bumped(name, call):
    fn = CALLS[name]
    s, x = torch.zeros(8), torch.ones(8)
    if call == "cached":
        fn(s, x)                                           # the next call is a hit of the caches
    before = s._version
    y = _saved(s)
    fn(s, x)
    assert s._version > before, name
    _raises_modified(y)
    with torch.no_grad():                                  # as torch's own ops: under no_grad too
        before = s._version
        fn(s, x)
        assert s._version > before


@pytest.mark.parametrize("call", ["first", "cached"])
def test_swap_bumps_both_and_the_flag_of_flag_nonfinite_is_bumped(call):
    a, b = torch.zeros(8), torch.ones(8)
    flag, src = torch.zeros(1, dtype=torch.int32), torch.zeros(8)
    if call == "cached":
        fastema.swap_(a, b)
        fastema.flag_nonfinite_(flag, src)
    ya, yb, yf = _saved(a), _saved(b), _saved(flag.float())
    va, vb, vf = a._version, b._version, flag._version
    fastema.swap_(a, b)
    fastema.flag_nonfinite_(flag, src)
    assert a._version > va and b._version > vb and flag._version > vf
    _raises_modified(ya)
    _raises_modified(yb)
    yf.backward()                                          # a copy (float()) was saved: nothing to refuse


def test_a_numpy_shadow_of_a_torch_source_bumps_nothing_and_a_torch_shadow_of_numpy_is_bumped():
    n, t = np.zeros(8, np.float32), torch.ones(8)
    fastema.ema_update_(n, t, 0.5)
    s = torch.zeros(8)
    y = _saved(s)
    fastema.ema_update_(s, np.ones(8, np.float32), 0.5)
    _raises_modified(y)
    assert np.all(n == 0.5) and torch.equal(s, torch.full((8,), 0.5))


def test_the_drop_ins_on_the_pair_cache_bump_what_they_write():
    from fastema.torch.compat.swa_utils import get_ema_multi_avg_fn
    from fastema.torch.compat.timm import ModelEmaV3

    model = torch.nn.Linear(4, 3)
    ema = ModelEmaV3(model, decay=0.9)
    for _ in range(2):                                     # the first update pairs, the second is a hit
        p = next(ema.module.parameters())
        y = _saved(p.detach())
        ema.update(model)
        _raises_modified(y)
    update = get_ema_multi_avg_fn(0.9)
    shadows, params = [torch.zeros(5)], [torch.ones(5)]
    for _ in range(2):
        y = _saved(shadows[0])
        update(shadows, params, None)
        _raises_modified(y)


@pytest.mark.parametrize("order", ["numpy shadows, torch sources", "torch shadows, numpy sources"])
def test_ema_update_many_takes_mixed_numpy_and_torch_pairs_as_ema_update_does(order):
    rng = np.random.default_rng(1)
    base = [rng.standard_normal(n).astype(np.float32) for n in (5, 17)]
    src = [rng.standard_normal(n).astype(np.float32) for n in (5, 17)]
    if order.startswith("numpy"):
        shadows, sources = [b.copy() for b in base], [torch.from_numpy(x.copy()) for x in src]
    else:
        shadows, sources = [torch.from_numpy(b.copy()) for b in base], [x.copy() for x in src]
    ref = [b.astype(np.float64) for b in base]
    for decay in (0.9, 0.5, 0.9):                          # a first call, then hits
        fastema.ema_update_many_(shadows, sources, decay)
        ref = [r + (1 - decay) * (x.astype(np.float64) - r) for r, x in zip(ref, src)]
    for s, r in zip(shadows, ref):
        got = s.numpy() if isinstance(s, torch.Tensor) else s
        assert np.allclose(got, r, rtol=1e-6, atol=1e-6)
    one = base[0].copy()
    for decay in (0.9, 0.5, 0.9):
        fastema.ema_update_(one, torch.from_numpy(src[0].copy()), decay)
    first = shadows[0].numpy() if isinstance(shadows[0], torch.Tensor) else shadows[0]
    assert np.array_equal(first, one)                      # the same bits as the single-pair function


def test_a_shadow_made_read_only_after_a_described_call_is_refused_and_not_written():
    a, src = np.zeros(64, np.float32), DLPackOnly(torch.ones(64))      # no cheap key: a described one
    fastema.ema_update_many_([a], [src], 0.5)
    a.flags.writeable = False
    with pytest.raises(ValueError, match=r"shadows\[0\] is read-only"):
        fastema.ema_update_many_([a], [src], 0.5)
    assert np.all(a == 0.5)                                # as ema_update_ refuses it


def test_an_immutable_jax_array_over_a_used_shadows_memory_is_refused():
    jnp = pytest.importorskip("jax.numpy")
    buf = np.zeros(64 + 16, np.float32)                    # 64-byte aligned: JAX takes it without a copy
    at = (-buf.ctypes.data % 64) // 4
    b = buf[at:at + 64]
    src = jnp.ones(64, dtype=jnp.float32)
    fastema.ema_update_many_([b], [src], 0.5)
    j = jnp.from_dlpack(b)                                 # JAX's (immutable) array over b's memory
    if fastema._backends.describe(j, "j").address != fastema._backends.describe(b, "b").address:
        pytest.skip("this JAX copied the array: no shared memory to write")
    with pytest.raises(ValueError, match="immutable|read-only"):
        fastema.ema_update_many_([j], [src], 0.5)
    assert np.all(b == 0.5)


def test_the_described_key_holds_writability_and_framework():
    a = np.zeros(8, np.float32)
    key = pairs._described_key([a])
    a.flags.writeable = False
    assert pairs._described_key([a]) != key
    assert pairs._described_key([torch.from_numpy(np.zeros(8, np.float32))])[0][-1] == "torch"


def test_after_a_fake_gpu_block_the_same_cpu_tensors_are_updated():
    pytest.importorskip("numba.cuda.dispatcher")
    from testkit.fake_gpu import fake_gpu

    s, x = torch.zeros(64), torch.ones(64)
    with fake_gpu(record=False):
        fastema.ema_update_many_([s], [x], 0.5)            # the fake cuda:0: nothing written
        fastema.ema_update_(s, x, 0.5)
    assert torch.equal(s, torch.zeros(64))
    fastema.ema_update_many_([s], [x], 0.5)                # the CPU: written
    assert torch.equal(s, torch.full((64,), 0.5))
    fastema.ema_update_(s, x, 0.5)
    assert torch.equal(s, torch.full((64,), 0.75))
    with fake_gpu(record=False):                           # and back: nothing of the CPU's launches
        fastema.ema_update_many_([s], [x], 0.5)
        fastema.ema_update_(s, x, 0.5)
    assert torch.equal(s, torch.full((64,), 0.75))


def test_the_caches_forget_what_another_launch_driver_made():
    pytest.importorskip("numba.cuda.dispatcher")
    from fastema._launch.cuda import drivers
    from testkit.fake_driver import FakeDriver

    s, x = torch.zeros(8), torch.ones(8)
    fastema.ema_update_(s, x, 0.5)
    fastema.ema_update_many_([s], [x], 0.5)
    assert len(ops._KEPT) and len(pairs._PAIRS)
    with drivers.using(FakeDriver(record=False)):
        assert _launch.CHOSEN_DRIVERS
        fastema.ema_update_(s, x, 0.5)                     # kept before: not this driver's
        assert len(ops._KEPT) == 1 and len(ops._GROUPS) == 1   # made anew (the CPU's, under this driver)
    assert torch.equal(s, torch.full((8,), 0.875))


def test_numpy_arrays_resize_again_once_the_caches_are_cleared():
    """L2: a cached NumPy pair holds its arrays by weak reference (what lets a hit check that the very
    arrays are passed again at ~15 ns, and keeps a resize from moving memory under a kept launch); NumPy
    refuses to resize an array that has one, so ``fastema.clear_caches()`` is the documented way to
    resize a shadow in place after the array functions used it."""
    a, b = np.zeros(8, np.float32), np.ones(8, np.float32)
    fastema.ema_update_(a, b, 0.5)
    fastema.ema_update_many_([a], [b], 0.5)
    fastema.clear_caches()
    a.resize((16,), refcheck=False)
    assert a.shape == (16,) and np.all(a[:8] == 0.75)
    fastema.ema_update_(a, np.ones(16, np.float32), 0.5)   # the resized array, checked as a first call
    assert np.all(a[:8] == 0.875) and np.all(a[8:] == 0.5)
