"""FlatShadow: many tensors per launch, views, swap, stale addresses, a real training loop."""
import os

import numpy as np
import pytest
import torch
from reference import assert_close_to_reference, naive_ema
from torch import nn

import fastema


def mixed_sources(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (1,), (0,), (64, 33), (2, 2, 2), (20_000,)]
    out = {}
    for i, shape in enumerate(shapes):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out[f"t{i}.{str(dtype)[6:]}"] = torch.randn(shape, generator=g).to(dtype)
    return out


@pytest.mark.parametrize("dtype", ["float32", "same", "bfloat16"])
def test_update_equals_per_tensor_updates(dtype):
    src = mixed_sources()
    flat = fastema.FlatShadow(src, dtype=dtype)
    refs = {n: v.clone() if dtype == "same" else v.to(getattr(torch, dtype), copy=True) for n, v in src.items()}
    for step in range(3):
        for v in src.values():
            v.add_(0.1 * torch.randn(v.shape).to(v.dtype))
        flat.update(decay=0.9)
        for n, v in src.items():
            fastema.ema_update_(refs[n], v, decay=0.9)
    for n, view in flat.views().items():
        assert view.shape == src[n].shape
        assert torch.equal(view, refs[n]), n


def test_groups_and_views_share_the_flat_buffer():
    src = mixed_sources()
    flat = fastema.FlatShadow(src, dtype="same")
    assert len(flat.groups) == 3 and {g["src_dtype"] for g in flat.groups} == {"float32", "bfloat16", "float16"}
    v = flat.view("t0.float32")
    v.fill_(7.0)                                                     # a view, not a copy
    assert (flat.groups[0]["buffer"][0, :15] == 7.0).all()
    assert flat.nbytes == sum(t.numel() * t.element_size() for t in src.values())


def test_float32_default_shadow_is_exact_copy_of_half_sources():
    src = mixed_sources()
    flat = fastema.FlatShadow(src)
    for n, v in flat.views().items():
        assert v.dtype == torch.float32 and torch.equal(v, src[n].float())


def test_rows_hold_several_decays():
    src = mixed_sources()
    decays = [0.5, 0.9, 0.99]
    flat = fastema.FlatShadow(src, rows=3)
    singles = [fastema.FlatShadow(src) for _ in decays]
    for _ in range(4):
        for v in src.values():
            v.mul_(0.9).add_(0.5)
        flat.update(decays)
        for s, d in zip(singles, decays):
            s.update(d)
    for r, s in enumerate(singles):
        for n in src:
            assert torch.equal(flat.view(n, r), s.view(n))


def test_zero_init_and_debiasing_closed_form():
    x = torch.full((10,), 3.0)
    flat = fastema.FlatShadow([x], init="zeros")
    for _ in range(20):
        flat.update(0.8)
    np.testing.assert_allclose(flat.view(0).numpy(), 3.0 * (1 - 0.8 ** 20), rtol=1e-6)


@pytest.mark.parametrize("dtype,sources", [("float32", "float32"), ("float32", "bfloat16"),
                                           ("same", "float16"), ("bfloat16", "bfloat16")])
def test_swap_twice_restores_everything_bit_for_bit(dtype, sources):
    src = {n: v.to(getattr(torch, sources)) for n, v in mixed_sources(1).items()}
    flat = fastema.FlatShadow(src, dtype=dtype)
    for v in src.values():
        v.add_(1.0)
    flat.update(0.7)
    raw = {n: v.clone() for n, v in src.items()}
    shadow = {n: v.clone() for n, v in flat.views().items()}
    flat.swap()
    assert flat.swapped
    for n, v in src.items():                # the model now holds the shadow, rounded to nearest
        nearest = shadow[n].to(v.dtype).float()          # torch's round-to-nearest-even
        assert ((v.float() - shadow[n]).abs() <= (nearest - shadow[n]).abs()).all()
    with pytest.raises(RuntimeError, match="swap"):
        flat.update(0.5)
    flat.swap()
    assert not flat.swapped
    for n in src:
        assert torch.equal(src[n].view(torch.int16 if src[n].element_size() == 2 else torch.int32),
                           raw[n].view(torch.int16 if raw[n].element_size() == 2 else torch.int32)), n
        assert torch.equal(flat.view(n), shadow[n]), n


def test_lossy_swap_needs_consent():
    src = [torch.randn(10, dtype=torch.float16)]
    flat = fastema.FlatShadow(src)
    before = src[0].clone()
    with pytest.raises(ValueError, match="lossy=True"):
        flat.swap()
    assert torch.equal(src[0], before) and not flat.swapped
    flat.swap(lossy=True)
    flat.swap(lossy=True)
    assert torch.equal(src[0], before)


def test_copy_to_sources_writes_the_average():
    src = [torch.randn(100), torch.randn(50, dtype=torch.bfloat16)]
    flat = fastema.FlatShadow(src)
    flat.update(0.0)
    for v in src:
        v.zero_()
    flat.copy_to_sources()
    assert torch.equal(src[0], flat.view(0)) and torch.equal(src[1], flat.view(1).bfloat16())


def test_replaced_storage_same_layout_is_followed():
    p = nn.Parameter(torch.zeros(1000))
    flat = fastema.FlatShadow([p])
    with torch.no_grad():
        p.data = torch.full((1000,), 4.0)   # new storage under the same Parameter
    flat.update(0.5)
    assert torch.equal(flat.view(0), torch.full((1000,), 2.0))


def test_storage_moved_after_an_update_is_followed_by_the_bound_launch():
    # update() binds each group's launch once (tables, weights); a move of a source's storage
    # replaces the tables, and the launch must be bound again, never the old address
    p = nn.Parameter(torch.zeros(1000))
    flat = fastema.FlatShadow([p, torch.zeros(70_000)])
    for _ in range(2):
        flat.update(0.5)
    with torch.no_grad():
        p.data = torch.full((1000,), 4.0)
    flat.update(0.5)
    assert torch.equal(flat.view(0), torch.full((1000,), 2.0))
    flat.update(0.5, rounding="nearest", skip_nonfinite=True)       # a flag: the plain launch, then bound again
    flat.update(0.5)
    assert torch.equal(flat.view(0), torch.full((1000,), 3.5))


@pytest.mark.parametrize("change", [lambda p: p.double(), lambda p: p.view(10, 100).t().contiguous().view(100, 10),
                                    lambda p: torch.zeros(999)])
def test_changed_source_is_refused_and_nothing_changes(change):
    p = nn.Parameter(torch.randn(1000))
    flat = fastema.FlatShadow([p])
    before = flat.view(0).clone()
    with torch.no_grad():
        p.data = change(p.data)
    with pytest.raises((ValueError, TypeError), match="make a new shadow|dtype torch.float64"):
        flat.update(0.5)
    assert torch.equal(flat.view(0), before)


def test_new_source_objects_are_adopted_or_refused():
    model = nn.Linear(4, 3)
    flat = fastema.FlatShadow(dict(model.named_parameters()))
    model.load_state_dict({"weight": torch.ones(3, 4), "bias": torch.ones(3)}, assign=True)
    flat.update(0.0, sources=dict(model.named_parameters()))
    assert torch.equal(flat.view("weight"), torch.ones(3, 4))
    before = flat.view("weight").clone()
    with pytest.raises(ValueError, match="make a new shadow"):
        flat.update(0.0, sources={"weight": torch.ones(5, 4), "bias": torch.ones(3)})
    assert torch.equal(flat.view("weight"), before)
    flat.update(0.0)                                   # still bound to the adopted model
    assert torch.equal(flat.view("bias"), torch.ones(3))


def test_skip_nonfinite_keeps_the_shadow():
    src = [torch.randn(100), torch.randn(30_000, dtype=torch.bfloat16)]
    flat = fastema.FlatShadow(src)
    flat.update(0.5, skip_nonfinite=True)
    assert flat.skipped["cpu"].item() == 0
    src[1][123] = float("nan")
    before = {n: v.clone() for n, v in flat.views().items()}
    flat.update(0.5, skip_nonfinite=True)
    assert flat.skipped["cpu"].item() == 1
    assert all(torch.equal(before[n], v) for n, v in flat.views().items())
    src[1][123] = 0.0
    flat.update(0.5, skip_nonfinite=True)
    assert flat.skipped["cpu"].item() == 0


def test_skip_nonfinite_reads_no_padding_past_valid():
    """``valid=``: a padded source's tail (a ZeRO-3 partition's, which DeepSpeed never writes) is
    averaged but never scanned: a NaN there skips nothing; one in the values does, also after the
    source moved (the scan's tables follow it). Found in round 10: the per-step scan read the padding."""
    src = {"a": torch.randn(37), "b": torch.randn(20, dtype=torch.bfloat16), "c": torch.randn(5)}
    src["a"][30:] = float("nan")                       # the padding
    flat = fastema.FlatShadow(src, valid={"a": 30, "c": 0})
    src["c"][:] = float("inf")                         # all padding
    expect = flat.views()["a"][:30].double() * 0.5 + src["a"][:30].double() * 0.5
    flat.update(0.5, skip_nonfinite=True)
    assert flat.skipped["cpu"].item() == 0
    torch.testing.assert_close(flat.views()["a"][:30].double(), expect, rtol=1e-6, atol=1e-7)
    src["a"][29] = float("nan")                        # a value
    before = {n: v.clone() for n, v in flat.views().items()}
    flat.update(0.5, skip_nonfinite=True)
    assert flat.skipped["cpu"].item() == 1
    for n, v in flat.views().items():                  # nothing moved (the padding's NaN neither)
        torch.testing.assert_close(v, before[n], rtol=0, atol=0, equal_nan=True)
    moved = src["a"].clone()                           # a new address: the scan follows it
    moved[29] = 0.0
    flat.update(0.5, skip_nonfinite=True, sources={**src, "a": moved})
    assert flat.skipped["cpu"].item() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                    reason="needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")
def test_the_gpu_scan_reads_no_padding_past_valid():
    """The GPU layout (16-byte padded shadow, a source with no values) scans each source up to ``valid``."""
    from numba import cuda

    from fastema._launch import config

    a = np.random.default_rng(0).standard_normal(37).astype(np.float32)
    a[30:] = np.nan
    src = {"a": cuda.to_device(a), "b": cuda.to_device(np.ones(9, np.float16)),
           "c": cuda.to_device(np.full(5, np.inf, np.float32))}
    with config.tuned(CUDA_THREADS=32):                # the simulator runs every thread in Python
        flat = fastema.FlatShadow(src, valid={"a": 30, "c": 0})
        for poisoned, skipped in ((None, 0), (29, 1)):
            if poisoned is not None:
                a[poisoned] = np.nan
                src["a"].copy_to_device(a)
            flat.update(0.5, skip_nonfinite=True)
            flag = next(iter(flat.skipped.values()))
            assert int(flag.copy_to_host()[0]) == skipped, poisoned


@pytest.mark.parametrize("valid, match", [({"z": 1}, "not sources"), ({"a": 38}, "from 0 to its 37"),
                                          ({"a": -1}, "from 0 to"), ({"a": 2.0}, "an int"), ({"a": True}, "an int"),
                                          ([30], "a mapping name -> count")])
def test_valid_refuses_what_is_not_a_count_of_a_source(valid, match):
    with pytest.raises(TypeError if isinstance(valid, list) else ValueError, match=match):
        fastema.FlatShadow({"a": torch.zeros(37)}, valid=valid)


def test_valid_names_a_list_of_sources_by_position():
    """A list's sources are named "0", "1"...: ``valid={1: n}`` names the second (an int key was
    read as no name at all, and the padding scanned: round 10, session 4)."""
    src = [torch.zeros(4), torch.zeros(10)]
    src[1][6:] = float("nan")
    for valid in ({1: 6}, {"1": 6}):
        flat = fastema.FlatShadow(src, valid=valid)
        flat.update(0.5, skip_nonfinite=True)
        assert flat.skipped["cpu"].item() == 0, valid


def test_numpy_sources():
    src = [np.arange(10, dtype=np.float32), np.ones((3, 3), np.float16)]
    flat = fastema.FlatShadow(src)
    src[0] += 10
    flat.update(0.5)
    np.testing.assert_array_equal(flat.view(0), np.arange(10) + 5.0)
    assert isinstance(flat.view(1), np.ndarray) and flat.view(1).dtype == np.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(rows=0), "rows must be"), (dict(rows=9), "rows must be"), (dict(dtype="float8"), "dtype must be"),
    (dict(init="ones"), "init must be"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastema.FlatShadow([torch.zeros(3)], **kwargs)


def test_bad_update_changes_nothing():
    src = [torch.randn(10)]
    flat = fastema.FlatShadow(src, rows=2)
    before = flat.groups[0]["buffer"].clone()
    for kwargs in (dict(decay=0.9), dict(decay=[0.9, 1.1]), dict(decay=[0.9, 0.9], rounding="stochastic"),
                   dict(decay=[0.9, 0.9], sources=[torch.randn(10), torch.randn(10)])):
        with pytest.raises((ValueError, TypeError)):
            flat.update(**kwargs)
    with pytest.raises(IndexError):
        flat.copy_to_sources(row=2)
    assert torch.equal(flat.groups[0]["buffer"], before)


def test_training_loop_matches_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(256, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    params = dict(model.named_parameters())
    flat = fastema.FlatShadow(params)
    ref = {n: p.detach().double().clone() for n, p in params.items()}
    decay = 0.95
    for step in range(200):
        idx = torch.randint(0, 256, (32,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        flat.update(decay)
        for n, p in params.items():
            ref[n] = naive_ema(ref[n], p.detach().double(), decay)
    for n, v in flat.views().items():
        assert_close_to_reference(v.double().numpy(), ref[n].numpy(), "float32",
                                  100 * np.abs(ref[n].numpy()) + 1e-3)   # 200 steps of float32 rounding
    # the averaged weights really are a model: swap them in and evaluate
    with torch.no_grad():
        raw_loss = nn.functional.mse_loss(model(x), y).item()
        flat.swap()
        ema_loss = nn.functional.mse_loss(model(x), y).item()
        flat.swap()
        assert nn.functional.mse_loss(model(x), y).item() == raw_loss
    assert np.isfinite(ema_loss) and ema_loss < 1.0


def test_adopt_refuses_what_it_can_check_and_changes_nothing():
    # adopt() is the bridges' cheap way to follow new sources: a wrong count, a null or non-integer
    # address is refused before any table changes, and the shadow keeps reading the old sources.
    src = [np.ones(4, np.float32), np.full(3, 2.0, np.float32)]
    flat = fastema.FlatShadow(src)
    new = [np.full(4, 5.0, np.float32), np.full(3, 6.0, np.float32)]
    for addresses, match in (([new[0].ctypes.data], "2 sources"), ([new[0].ctypes.data, 0], "address 0"),
                             ([new[0].ctypes.data, 1.5], "address 1.5")):
        with pytest.raises(ValueError, match=match):
            flat.adopt(new, addresses)
    assert flat.sources[0] is src[0]
    flat.update(0.0)                                   # still the old sources
    assert np.array_equal(flat.view(0), src[0]) and np.array_equal(flat.view(1), src[1])
    flat.adopt(new, [a.ctypes.data for a in new])
    flat.update(0.0)
    assert np.array_equal(flat.view(0), new[0]) and np.array_equal(flat.view(1), new[1])


# ------------------------------------------------------------------ refused sources

@pytest.mark.parametrize("make,match", [
    (lambda: [torch.zeros(3)._neg_view()], "negated or conjugated"),
    (lambda: [], "sources is empty"),
    (lambda: torch.zeros(3), "must be a sequence"),
])
def test_flat_shadow_refuses_bad_sources(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastema.FlatShadow(make())


def test_flat_shadow_rows_must_be_an_int_not_a_bool():
    with pytest.raises(ValueError, match="rows must be an int"):
        fastema.FlatShadow([torch.zeros(3)], rows=True)


def test_meta_tensors_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="meta tensor has no memory"):
        fastema.FlatShadow([torch.zeros(3, device="meta")])


def test_overlapping_sources_are_refused_and_identical_pairs_averaged_once():
    x = torch.zeros(1000)
    with pytest.raises(ValueError, match="share memory"):
        fastema.FlatShadow([x, x])
    with pytest.raises(ValueError, match="share memory"):
        fastema.FlatShadow([x[:600], x[400:]])
    s, y = torch.zeros(1 << 16), torch.randn(1 << 16)
    ref = s.clone()
    for _ in range(4):                                 # the same pair twice: averaged once, no race
        fastema.ema_update_many_([s, s], [y, y], 0.5)
        ref.lerp_(y, 0.5)
    assert torch.equal(s, ref)
    with pytest.raises(ValueError, match="another source"):
        fastema.ema_update_many_([s, s], [y, torch.randn(1 << 16)], 0.5)
    with pytest.raises(ValueError, match="share memory"):
        fastema.ema_update_many_([s[:100], s[50:150]], [y[:100], y[:100]], 0.5)


# reliability review M3
def test_flat_shadow_of_the_same_tensor_twice_is_refused():
    x = torch.zeros(1000)
    with pytest.raises(ValueError, match="share memory"):
        fastema.FlatShadow([x, x])


def _read_only_sources():
    ro = np.arange(1.0, 4.0, dtype=np.float32)
    ro.flags.writeable = False
    yield "a read-only NumPy array", ro, "pass writable arrays"
    jnp = pytest.importorskip("jax.numpy")
    yield "a JAX array", jnp.arange(1.0, 4.0), "fastema.jax.EMA"


@pytest.mark.parametrize("make", ["FlatShadow", "WindowShadow"])
def test_a_swap_or_copy_into_read_only_sources_is_refused_and_writes_nothing(make):
    """The array functions refuse to write a read-only array (a JAX array, a TensorFlow tensor); the
    flat shadows' swap() and copy_to_sources() wrote into them (the JAX array read back swapped).
    NumPy and JAX here; a TensorFlow tensor is refused through the same flag (its framework's)."""
    for what, src, hint in _read_only_sources():
        shadow = fastema.FlatShadow([src], init="zeros") if make == "FlatShadow" else \
            fastema.WindowShadow([src], 2)
        kept = np.array(src).copy()
        held = np.array(shadow.view(0)).copy()
        for call in (shadow.swap, shadow.copy_to_sources):
            with pytest.raises(ValueError, match=rf"writes the sources, and source '0' is read-only: .*{hint}"):
                call()
            assert np.array_equal(np.array(src), kept) and np.array_equal(np.array(shadow.view(0)), held), what


@pytest.mark.parametrize("make", ["FlatShadow", "WindowShadow"])
def test_a_numpy_source_made_read_only_after_construction_is_refused_by_swap_and_copy(make):
    """NumPy's writability is read when the shadow is made (and at a rebind): an array made read-only
    afterwards was written by swap() and copy_to_sources(). It is read again before they write."""
    a, b = np.arange(1.0, 5.0, dtype=np.float32), np.arange(1.0, 4.0, dtype=np.float32)
    shadow = fastema.FlatShadow([a, b], init="zeros") if make == "FlatShadow" else fastema.WindowShadow([a, b], 2)
    b.flags.writeable = False
    for call in (shadow.swap, shadow.copy_to_sources):
        with pytest.raises(ValueError, match=r"writes the sources, and source '1' is read-only: pass writable"):
            call()
        assert np.array_equal(a, np.arange(1.0, 5.0)) and np.array_equal(b, np.arange(1.0, 4.0))
    b.flags.writeable = True
    shadow.swap()                                   # writable again: taken, and back
    shadow.swap()
    assert np.array_equal(a, np.arange(1.0, 5.0)) and np.array_equal(b, np.arange(1.0, 4.0))
