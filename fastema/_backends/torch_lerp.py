"""torch's own ``lerp_`` for the one pair it updates with fastema's bits (issue 86 items 3 and 5).

``ema_update_(shadow, src, decay)`` of a dense float32 or float64 pair with nearest rounding is
``shadow.lerp_(src, 1 - decay)``: fastema's kernels compute torch's lerp (``kernels/_elementwise``
``lerp32``: from ``shadow`` with one FMA where ``|w| < 0.5``, else from ``src``; float64 in
float64), so both give the same bits where ``w < 0.5`` (a decay above 0.5:
``fastema.ops._ROADS``; from 0.5 up torch's CPU scalar tail may give a zero result's other sign,
``tests/array/test_lerp_zero_sign.py``), on the CPU where torch's kernels are its AVX2 or AVX-512
ones (their scalar tails contract to an FMA too; the default build's may not). torch's op then
costs what it costs: no launch group, no parameter block, no stream read, no capture query. Not
for bfloat16 or float16: the kernels compute those in float32 too, but write every NaN as one quiet
NaN, where torch's op writes other bits (``0xffff`` from its vector path, a NaN input's payload).

A shadow gets the road at its first call, after fastema's every check passed and its own kernel
wrote the pair (:func:`road`); a later call with that shadow object (the cache's key) takes it where
its guard holds: both tensors with the type, dtype, shape, strides, device, ``requires_grad`` and
dispatch keys of that first pair (torch's batched C++ check, Dynamo's ``TensorGuards``, as the layout
guard of :mod:`.torch` uses it) at its addresses (other objects of that memory and layout too, a
view made anew each step: the same call; not the storage's bytes: a storage resized in place under
its tensor, to fewer bytes and back at its address, is refused by the full call, and written past its
end by this road and by torch's own ops, which do not look either). Anything else is fastema's full
call, which checks again and says what is wrong in its own words. ``ema_update_`` takes the road in
its own frame, the guard then the op, where Dynamo is not tracing it: of 16 float32 elements on the
CPU it counts about 1.67x the instructions of ``lerp_`` alone (the gates' figures: 22.3K against
13.4K), where a Python function with its signature that calls ``lerp_`` and checks nothing is 1.1x;
the guard is most of the rest (its C++ check of two tensors 2.8K, the two addresses 1.75K), then
finding the road (1.5K) and ``torch.compiler.is_dynamo_compiling`` (0.45K). No cheaper sound guard
was found (2026-11-29): Dynamo's newer guard tree (a ``RootGuardManager`` with two tensor-match
guards) counts 3.7K, and each attribute read of a tensor from Python (``dtype``, ``shape``,
``requires_grad``, ``device``) 0.45-1.2K; the signature's keyword-only defaults alone cost 0.82K of
the call. A source that requires grad is read with grad mode off for the op (fastema's kernel
records nothing either)."""
from __future__ import annotations

import functools
from typing import Any

from ._base import Road


@functools.cache
def _calls() -> tuple:
    """``(lerp, lerp with grad mode off)``, bound once."""
    import torch

    lerp_, grad_on, set_grad = torch.Tensor.lerp_, torch.is_grad_enabled, torch._C._set_grad_enabled

    def quiet(s, x, w) -> None:
        if not grad_on():
            lerp_(s, x, w)
            return
        set_grad(False)
        try:
            lerp_(s, x, w)
        finally:
            set_grad(True)
    return lerp_, quiet


@functools.cache
def _fma_on_cpu() -> bool:
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def road(s, x, guards: Any) -> Road | None:
    """The :class:`~._base.Road` of a pair that fastema's checks passed (``s`` written, ``x`` read;
    ``guards``: torch's ``TensorGuards``, None where this torch has no sound one): its guard, both
    addresses, and ``lerp(s, x, w)`` (grad mode off where ``x`` requires grad); or None where
    torch's op would not give fastema's bits or its checks might say otherwise later (two dtypes,
    bfloat16 or float16, whose NaNs torch's op writes with other bits, a tensor subclass, a shadow
    whose in-place write torch's modes may refuse, a CPU kernel of torch's without FMA)."""
    import torch

    plain = (torch.Tensor, torch.nn.Parameter)
    if (guards is None or s.dtype is not x.dtype or s.dtype not in (torch.float32, torch.float64)
            or type(s) not in plain or type(x) not in plain
            or s.requires_grad or s.is_inference() or torch.is_inference_mode_enabled()
            or (s.is_cpu and not _fma_on_cpu())):
        return None
    ptr = torch.Tensor.data_ptr
    check = guards(s, x, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
    return Road(check, ptr, ptr(s), ptr(x), _calls()[1 if x.requires_grad else 0])
