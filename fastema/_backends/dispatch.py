"""The boundary's dispatch: which adapter (:class:`~._base.Backend`) owns an array
(:func:`backend_of`, by :data:`_ORDER`; :func:`backend_named` by framework), the adapters given for
a ``with`` block (:func:`using`), where an array is and whether its stream captures
(:func:`device_of`, :func:`capturing`), whose arrays fastema makes (:func:`maker`), a launch
group's current-stream function (:func:`stream_getter`, :func:`streams_from`) and
:func:`describe`. The package (:mod:`fastema._backends`) names them all.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from .._switch import Switch
from ..kernels.kinds import F64
from . import cai, cudasim, dlpack
from . import numpy as np_backend
from . import torch as torch_backend
from ._base import Backend, no_stream
from ._buf import Buf

NUMPY = np_backend.backend
TORCH = torch_backend.backend
_ORDER = (NUMPY, TORCH, cudasim.backend, dlpack.frameworks, cai.cupy, cai.backend,   # first owner
          dlpack.backend)                                                               # wins
_BY_NAME = {"numpy": NUMPY, "torch": TORCH, "cudasim": cudasim.backend, "cuda": cai.backend,
            "cupy": cai.cupy, "jax": dlpack.backend, "tensorflow": dlpack.backend,
            "keras": dlpack.backend, "dlpack": dlpack.backend}
_OWN_BUFFERS = ("numpy", "torch")   # fastema's buffers for their sources are their arrays
                                    # (else NumPy or Numba)
_BY_TYPE: dict = {}             # type -> adapter, for the adapters whose ownership the type alone
                                # decides
                                # (Backend.BY_TYPE; dropped on the way in and out of using())
_order: list = list(_ORDER)     # backend_of()'s order now: the given ones (innermost first),
                                # then _ORDER
_named: dict = dict(_BY_NAME)   # backend_named()'s table now: a given adapter stands for its
                                # framework


def backend_of(x) -> Backend | None:
    """The adapter that owns ``x``, or None."""
    backend = _BY_TYPE.get(type(x))
    if backend is not None:
        return backend
    for backend in _order:
        if backend.owns(x):
            if backend.BY_TYPE:                          # isinstance of a class: by type
                _BY_TYPE[type(x)] = backend
            return backend
    return None


def backend_named(framework: str) -> Backend:
    """The adapter of a :class:`Buf`'s ``framework`` (inside :func:`using`, the one given for
    it)."""
    return _named[framework]


def _given() -> None:
    """:func:`backend_of`'s order and :func:`backend_named`'s table made again from :data:`GIVEN`
    (in place), the caches of both dropped."""
    given = GIVEN.chosen
    _BY_TYPE.clear()
    stream_getter.cache_clear()
    _order[:] = [*reversed(given), *_ORDER]
    _named.clear()
    _named.update(_BY_NAME)
    _named.update((b.NAME, b) for b in given)


GIVEN: Switch[Backend] = Switch(changed=_given)
"""The adapters given to :func:`using`, innermost last (``GIVEN.chosen``)."""
using = GIVEN.using
"""``using(backend)``: ``backend`` ahead of the other adapters for the ``with`` block:
:func:`backend_of` asks it first (what it owns is its), and it is the adapter of its framework
(``backend.NAME``) wherever fastema names one (:func:`backend_named`, the buffers it makes,
:func:`stream_getter`, :func:`capturing`). How the fake GPU of ``testkit`` is given (as
``_launch.cuda.drivers.using`` gives its driver): an adapter of torch whose CPU tensors are on
``cuda:0``. What is made in the block
keeps what it was given (a layout group its adapter and stream getter). The type cache and the
stream getters kept are dropped on the way in and out; blocks nest."""


def device_of(x) -> str:
    """fastema's name of the device ``x`` is on ("cpu", "cuda:N"), as its adapter says
    (:meth:`Backend.device_of`): what a face asks to choose a path by device, so that an adapter
    given by :func:`using` decides it."""
    backend = backend_of(x)
    if backend is None:
        raise TypeError(f"fastema cannot read a {type(x).__name__}: pass an array or tensor")
    return backend.device_of(x)


def capturing(framework: str, device: str) -> bool:
    """Whether ``framework``'s current stream on ``device`` is being captured into a CUDA graph now
    (:meth:`Backend.capturing`; False on the CPU)."""
    return device != "cpu" and _named[framework].capturing(device)


def framework(x) -> str | None:
    """The name of ``x``'s framework ("numpy", "torch", ...), or None for anything else."""
    backend = backend_of(x)
    return None if backend is None else backend.NAME


def is_torch(x) -> bool:
    return TORCH.owns(x)


def maker(framework: str, device: str) -> Backend:
    """Whose arrays fastema makes for sources of ``framework`` on ``device``: the framework's own
    where fastema allocates in it (NumPy, torch), else NumPy on the host and Numba device arrays
    on a GPU (the simulator's under ``NUMBA_ENABLE_CUDASIM``)."""
    backend = _named[framework]
    if framework in _OWN_BUFFERS:
        return backend
    if device == "cpu":
        return NUMPY
    from numba.cuda.core import config

    return cudasim.backend if config.ENABLE_CUDASIM else cai.backend


_STREAM_READERS: list = []      # streams_from()'s, innermost last


@functools.lru_cache(maxsize=64)
def stream_getter(framework: str, device: str):
    """The function a launch group calls (at every launch) for the raw handle of ``framework``'s
    current CUDA stream on ``device`` (0: the legacy default stream); inside
    :func:`streams_from`, the one its reader gives."""
    if _STREAM_READERS:
        return _STREAM_READERS[-1](framework, device)
    return no_stream if device == "cpu" else _named[framework].stream_getter(device)


@contextlib.contextmanager
def streams_from(reader) -> Iterator[None]:
    """For the ``with`` block, :func:`stream_getter` gives ``reader(framework, device)``: a function
    returning the raw stream handle a launch goes on (a test's own streams, which the simulator
    has no framework to keep current). What is made in the block keeps the getter it was given
    (a shadow's launches read it at each call); the getters kept here are dropped on the way in
    and out. Blocks nest."""
    _STREAM_READERS.append(reader)
    stream_getter.cache_clear()
    try:
        yield
    finally:
        _STREAM_READERS.pop()
        stream_getter.cache_clear()


def describe(x, what: str) -> Buf:
    """Describe ``x`` as a :class:`Buf`, or raise ``TypeError``/``ValueError`` naming ``what``."""
    backend = backend_of(x)
    if backend is None:
        if isinstance(x, (bool, int, float, complex, list, tuple)):
            raise TypeError(f"{what} must be an array (NumPy, torch, CuPy, ...), got "
                            f"{type(x).__name__}; wrap Python numbers with np.asarray(..., "
                            f"dtype=np.float32)")
        raise TypeError(f"{what} must be a NumPy array, a torch tensor or an object with "
                        f"__cuda_array_interface__ or __dlpack__, got {type(x).__name__}")
    b = backend.describe(x, what)
    if b.kind == F64 and b.device != "cpu":
        raise TypeError(f"{what} is float64 on {b.device}: fastema averages float64 on the CPU "
                        f"only for now; keep float64 models on the CPU, or train in float32")
    return b
