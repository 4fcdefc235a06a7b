"""The element bodies of checkpoint merging, written once for every target: the weighted sum of
K inputs, ``out = sum_i w[i] * x_i``, accumulated in order.

- :func:`merge_term` / :func:`merge_term_wide`: one input's term, ``acc <- fma(w, x, acc)``,
  rounded once (float32, or float64 for the wide twin); inputs are added in their order, so the
  sum is the same whether the K inputs arrive in one launch or one launch at a time (the
  accumulator kept between launches in its own dtype);
- :func:`merge_bits` / :func:`merge_store_wide`: the sum stored as the output's kind, to nearest
  even (float32 bits -> bfloat16 or float16), or stochastically (bfloat16) with the noise of the
  element's index under a key (:func:`._bits.sr_noise`, the noise the EMA kernels use).

Plain Python: :func:`bind` compiles them for one target with their global names (``decode``,
``encode``, ``fma``, ...) bound to that target's compiled versions (the namespace
:func:`._target.bind` made), as :mod:`._elementwise`'s bodies are; called from Python they run
as they read (the tests' reference).
"""
import types

import numpy as np

from ._bits import decode, encode, encode_bf16_sr, sr_noise
from ._intrinsics import python_versions
from .kinds import F64

_hw = python_versions()                       # replaced per target by bind()
as_float, as_bits, fma = _hw["as_float"], _hw["as_bits"], _hw["fma"]


def merge_term(acc, p, j, w, kind):
    """``acc + w * x`` rounded once (FMA), ``x`` element ``j`` of ``p`` (storage ``kind``, not
    float64) read exactly as float32; ``acc`` and ``w`` float32."""
    return fma(w, as_float(decode(p[j], kind)), acc)


def merge_term_wide(acc, p, j, w, kind):
    """:func:`merge_term` in float64 (``acc`` and ``w`` float64; ``x`` read exactly)."""
    x = p[j] if kind == F64 else np.float64(as_float(decode(p[j], kind)))
    return fma(w, x, acc)


def merge_bits(acc, kind, stochastic, key, index):
    """The stored bits of the float32 sum ``acc`` as ``kind``: to nearest even, or with
    ``stochastic`` (bfloat16 only) rounded up with the probability of the discarded fraction,
    by the noise of ``index`` under ``key``."""
    b = as_bits(acc)
    if stochastic:
        return encode_bf16_sr(b, sr_noise(key, index))
    return encode(b, kind)


def merge_store_wide(q, j, acc, kind, stochastic, key, index):
    """``q[j] <-`` the float64 sum ``acc`` as ``kind``: exactly for float64, else through float32
    (to nearest even), then as :func:`merge_bits`."""
    if kind == F64:
        q[j] = acc
    else:
        q[j] = merge_bits(np.float32(acc), kind, stochastic, key, index)


NAMES = ("merge_term", "merge_term_wide", "merge_bits", "merge_store_wide")


def bind(device_function, compiled: types.SimpleNamespace) -> types.SimpleNamespace:
    """The bodies of :data:`NAMES`, compiled by ``device_function`` over ``compiled`` (a target's
    namespace from :func:`._target.bind`: its ``decode``, ``encode``, ``fma``... are the ones the
    bodies call)."""
    namespace = {k: v for k, v in globals().items() if not k.startswith("__")}
    namespace.update(vars(compiled))
    out = {}
    for name in NAMES:
        fn = globals()[name]
        clone = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__, fn.__closure__)
        clone.__qualname__, clone.__module__, clone.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        out[name] = namespace[name] = device_function(clone)
    return types.SimpleNamespace(**out)
