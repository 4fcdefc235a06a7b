"""ema_update_ of a pair of one dtype at nearest rounding through torch's own lerp_ (issue 86 items 3
and 5): the same bits as fastema's kernel over dtypes, sizes (vector bodies and scalar tails) and
weights (fastema's own decay schedule's included), and every check of the full call kept: a pair
whose layout, autograd flags or memory moved takes the full call again, with its errors."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastema
from fastema import ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
        torch.float64: torch.int64}


class _Calls(TorchFunctionMode):
    """The torch functions called under it, by name (a function mode, which changes no tensor's
    dispatch keys: the road's guard checks them)."""

    def __init__(self):
        super().__init__()
        self.names: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _road_taken(shadow, src, decay) -> bool:
    """ema_update_ went through torch's lerp_ alone (fastema's kernel calls no torch function but
    ``detach`` for its view and reads no ``lerp_``)."""
    with _Calls() as calls:
        fastema.ema_update_(shadow, src, decay)
    return "lerp_" in calls.names


def _pair(n: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)
    x[:: 7] = s[:: 7]                                       # some equal: x - s == 0
    s[1:: 5], x[2:: 3], x[1:: 10] = -0.0, -0.0, 0.0          # signed zeros (test_lerp_zero_sign's corners)
    return s, x


def _schedule() -> list:
    """Decays as fastema's EMA takes them: the warm-up ``min(decay, (1 + t) / (10 + t))`` of
    0.9999 (below 0.5 at first: the kernel's), then fixed decays and the ends."""
    return [min(0.9999, (1 + t) / (10 + t)) for t in range(0, 400, 37)] + [0.9, 0.99, 0.5, 0.25, 0.0, 1.0,
                                                                           0.5000001, 0.75]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 16, 67])
def test_the_road_gives_the_kernels_bits(dtype, n):
    """Each step through torch's lerp_ (:func:`_road_taken`) against
    the same step through fastema's kernel (``weight=``: w = 1 - decay, the kernel's road), from the
    same values, over a trajectory, each step bit for bit."""
    from fastema._backends import torch_lerp

    if not torch_lerp._fma_on_cpu():
        pytest.skip("torch's CPU kernels here are not its AVX2 or AVX-512 ones: no road")
    s, x = _pair(n, dtype, n)
    ref = s.clone()
    fastema.ema_update_(s, x, 0.9)                        # the first call: the kernel, then the road kept
    fastema.ema_update_(ref, x, weight=1.0 - 0.9)
    for i, decay in enumerate(_schedule()):
        x.add_(0.5 if i % 2 else -0.25)
        road = decay > 0.5 and dtype in (torch.float32, torch.float64)   # w < 0.5: torch's FMA branch
        assert _road_taken(s, x, decay) == road
        fastema.ema_update_(ref, x, weight=1.0 - decay)
        assert torch.equal(s.view(BITS[dtype]), ref.view(BITS[dtype])), (dtype, n, decay)


def test_a_source_that_requires_grad_records_nothing():
    src = torch.nn.Parameter(torch.randn(16))
    s = torch.zeros(16)
    fastema.ema_update_(s, src, 0.9)
    assert _road_taken(s, src, 0.9)
    assert s.grad_fn is None and not s.requires_grad and torch.is_grad_enabled()
    assert s._version == 2


def test_what_moved_takes_the_full_call_with_its_errors():
    """A road is kept per pair of objects and guarded: another layout, a shadow that requires grad,
    memory moved under the same objects (``.data =``) each take fastema's full call, which refuses
    as it did before the road existed; other decays, weights, a flag or another rounding never
    take it."""
    s, x = torch.zeros(4, 4), torch.randn(4, 4)
    fastema.ema_update_(s, x, 0.9)
    assert _road_taken(s, x, 0.9)
    with pytest.raises(ValueError, match="decay"):
        fastema.ema_update_(s, x, 1.5)                            # the full call's check
    s.requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad"):
        fastema.ema_update_(s, x, 0.9)
    s.requires_grad_(False)
    assert _road_taken(s, x, 0.9)
    s.data = x.data                                               # the same memory as the source now
    with pytest.raises(ValueError, match="share memory"):
        fastema.ema_update_(s, x, 0.9)
    t = torch.zeros(4, 4)
    fastema.ema_update_(t, x, 0.9)
    assert _road_taken(t, x, 0.9)
    t.data = torch.zeros(4, 4).t()                                # another layout
    with pytest.raises(ValueError, match="laid out differently"):
        fastema.ema_update_(t, x, 0.9)


def test_no_road_for_two_dtypes():
    s, x = torch.zeros(16, dtype=torch.bfloat16), torch.randn(16)
    kept = len(ops._ROADS)
    fastema.ema_update_(s, x, 0.9)
    assert not _road_taken(s, x, 0.9) and len(ops._ROADS) == kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 64])
def test_no_road_for_half_precision_whose_nans_torch_writes_with_other_bits(dtype, n):
    # torch's lerp_ wrote a bfloat16 NaN as 0xffff from its vector path (the kernel: 0x7fc0) and a
    # float16 inf + w * (1 - inf) as 0xfe00 (the kernel: 0x7e00): a pair seen before (the road)
    # and a fresh one (the kernel) gave two results from the same call
    for start in (float("nan"), float("inf")):
        seen, fresh = torch.full((n,), start, dtype=dtype), torch.full((n,), start, dtype=dtype)
        x = torch.ones(n, dtype=dtype)
        fastema.ema_update_(seen, x, 0.9)
        fastema.ema_update_(fresh, x, 0.9)                    # its first call: fastema's kernel
        assert not _road_taken(seen, x, 0.9)
        fresh2 = fresh.clone()
        fastema.ema_update_(fresh2, x, 0.9)
        assert torch.equal(seen.view(BITS[dtype]), fresh2.view(BITS[dtype])), (dtype, start)


def test_a_source_view_made_anew_each_step_takes_the_road():
    """The road is found by the shadow and guarded by both tensors' layouts and memory, so a source
    that is a new view of the same memory at each call (``p.view(-1)``, ``p.detach()``) takes it, and
    a shadow updated from two sources in turn keeps every bit of the kernel's (the road of the one
    seen last; the other's calls take the kernel's kept launch)."""
    p = torch.randn(4, 4)
    s, ref = torch.zeros(16), torch.zeros(16)
    fastema.ema_update_(s, p.view(-1), 0.9)
    fastema.ema_update_(ref, p.view(-1), weight=1.0 - 0.9)
    views = [p.view(-1) for _ in range(3)]          # held: three objects, three identities
    for v in views:
        assert _road_taken(s, v, 0.9)
        fastema.ema_update_(ref, v, weight=1.0 - 0.9)
    assert torch.equal(s, ref)
    q = torch.randn(16)
    for i in range(4):
        src = q if i % 2 else p.view(-1)
        fastema.ema_update_(s, src, 0.75)
        fastema.ema_update_(ref, src, weight=1.0 - 0.75)
        assert torch.equal(s.view(torch.int32), ref.view(torch.int32)), i
