"""The boundary: framework arrays in, plain descriptions of memory out. The only place in
fastema that recognises array types.

One adapter per framework, each a :class:`Backend` (einops' ``AbstractBackend``: one class
with every method, one subclass per framework): :mod:`.numpy`, :mod:`.torch`, :mod:`.cudasim`,
:mod:`.cai` (the CUDA array interface: Numba device arrays, and CuPy with its current stream),
:mod:`.dlpack` (JAX, TensorFlow, Keras and any other DLPack producer). :func:`backend_of`
picks one, importing no framework (a framework's classes are looked up only when the framework
is already in ``sys.modules``). The functions here dispatch to it:

- :func:`describe`: a :class:`Buf` (storage kind, device, shape, address, layout) of an
  array or tensor, with every check the user can trip, before anything is written;
- :func:`empty`, :func:`zero_`, :func:`new_flag`: fastema's own buffers in the sources' framework;
- :func:`control_view`: a small control array (weights, flags) checked and viewed for a kernel;
- :func:`metric_values`, :func:`zeros`, :func:`kernel_view`, :func:`to_host`: the metric
  smoothers' values and state;
- :func:`stream_getter`: what a launch group calls to find the framework's current CUDA stream
  (:func:`streams_from`: another reader of it for a ``with`` block);
- :func:`device_of`, :func:`capturing`: where an array is, and whether its framework's stream
  there is being captured into a CUDA graph: what a face asks to choose a path by device (a
  device plan, a capture refusal), so that the adapter answers;
- :func:`using`: an adapter given for a ``with`` block, asked before the others and standing for
  its framework (the fake GPU of ``testkit``: torch's CPU tensors as on ``cuda:0``).

A new framework is one more :class:`Backend` subclass here and one line in :data:`_ORDER`.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterator

import numpy as np

from .._switch import Switch
from ..kernels.kinds import F64
from . import _buf, cai, cudasim, dlpack
from . import numpy as np_backend
from . import torch as torch_backend
from ._base import Backend, Unsupported, no_stream  # noqa: F401  (the protocol)
from ._buf import Buf, c_layout, device_name, layout, not_dense, unsupported_dtype  # noqa: F401  (the boundary's names)

SUPPORTED = _buf.SUPPORTED
READ_ONLY_HINTS = dlpack.READ_ONLY_HINTS

NUMPY = np_backend.backend
TORCH = torch_backend.backend
_ORDER = (NUMPY, TORCH, cudasim.backend, dlpack.frameworks, cai.cupy, cai.backend, dlpack.backend)  # first owner wins
_BY_NAME = {"numpy": NUMPY, "torch": TORCH, "cudasim": cudasim.backend, "cuda": cai.backend, "cupy": cai.cupy,
            "jax": dlpack.backend, "tensorflow": dlpack.backend, "keras": dlpack.backend, "dlpack": dlpack.backend}
_OWN_BUFFERS = ("numpy", "torch")   # fastema's buffers for their sources are their arrays (else NumPy or Numba)
_BY_TYPE: dict = {}             # type -> adapter, for the adapters whose ownership the type alone decides
                                # (Backend.BY_TYPE; dropped on the way in and out of using())
_order: list = list(_ORDER)     # backend_of()'s order now: the given ones (innermost first), then _ORDER
_named: dict = dict(_BY_NAME)   # backend_named()'s table now: a given adapter stands for its framework


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
    """The adapter of a :class:`Buf`'s ``framework`` (inside :func:`using`, the one given for it)."""
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
"""``using(backend)``: ``backend`` ahead of the other adapters for the ``with`` block: :func:`backend_of`
asks it first (what it owns is its), and it is the adapter of its framework (``backend.NAME``) wherever
fastema names one (:func:`backend_named`, the buffers it makes, :func:`stream_getter`,
:func:`capturing`). How the fake GPU of ``testkit`` is given (as ``_launch.cuda.drivers.using`` gives
its driver): an adapter of torch whose CPU tensors are on ``cuda:0``. What is made in the block
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


def _maker(framework: str, device: str) -> Backend:
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
            raise TypeError(f"{what} must be an array (NumPy, torch, CuPy, ...), got {type(x).__name__}; "
                            f"wrap Python numbers with np.asarray(..., dtype=np.float32)")
        raise TypeError(f"{what} must be a NumPy array, a torch tensor or an object with "
                        f"__cuda_array_interface__ or __dlpack__, got {type(x).__name__}")
    b = backend.describe(x, what)
    if b.kind == F64 and b.device != "cpu":
        raise TypeError(f"{what} is float64 on {b.device}: fastema averages float64 on the CPU only for now; "
                        f"keep float64 models on the CPU, or train in float32")
    return b


def overlaps(a: Buf, b: Buf) -> bool:
    """True when two buffers on the same device share any byte."""
    if a.device != b.device or not a.numel or not b.numel or not a.address or not b.address:
        return False
    return a.address < b.address + b.nbytes and b.address < a.address + a.nbytes


def disjoint(bufs: list, names: list) -> None:
    """ValueError naming two of ``bufs`` that share memory (tied or aliased tensors, the same
    tensor twice): an in-place update or swap would then touch those bytes twice."""
    spans = sorted((b.device, b.address, b.address + b.nbytes, i) for i, b in enumerate(bufs)
                   if b.numel and b.address)
    end, last = None, None
    for device, lo, hi, i in spans:
        if end is not None and device == end[0] and lo < end[1]:
            a, b = names[last], names[i]
            raise ValueError(f"{a} and {b} share memory (the same tensor twice, tied weights or a view of "
                             f"another source); pass each tensor once. Nothing was written.")
        if end is None or device != end[0] or hi > end[1]:
            end, last = (device, hi), i


def first_shared(a: list, b: list) -> tuple[int, int] | None:
    """``(i, j)`` of a span ``a[i]`` that shares a byte with a span ``b[j]``, or None: the check
    that one list of tensors writes nothing another reads (spans within one list may overlap).
    A span is ``(device, address, nbytes)`` (:func:`.torch.span` of a tensor of any dtype); empty
    ones and address 0 are skipped. One sort of both lists, then one sweep."""
    spans = sorted((dev, lo, lo + n, side, i) for side, spans in enumerate((a, b))
                   for i, (dev, lo, n) in enumerate(spans) if n and lo)
    reach: list = [None, None]                         # per list: (device, end, i) of its furthest-reaching span
    for dev, lo, hi, side, i in spans:
        other = reach[1 - side]
        if other is not None and other[0] == dev and lo < other[1]:
            return (i, other[2]) if side == 0 else (other[2], i)
        mine = reach[side]
        if mine is None or mine[0] != dev or hi > mine[1]:
            reach[side] = (dev, hi, i)
    return None


def empty(like: Buf, kind: int, shape: tuple):
    """A new C-contiguous array of ``kind`` and ``shape`` on ``like``'s device, in its framework
    (NumPy for CPU buffers of other frameworks, Numba device arrays on CUDA)."""
    return _maker(like.framework, like.device).empty(like, kind, shape)


def zero_(a) -> None:
    """Fill one of fastema's arrays with zeros on its device (stream-ordered, no sync, no kernel)."""
    (backend_of(a) or cai.backend).zero_(a)


def new_flag(like: Buf):
    """A zeroed int32[1] flag on ``like``'s device, in ``like``'s framework (:func:`made_here`)."""
    flag = _maker(like.framework, like.device).zeros(like.device, 1, np.int32)
    mark_made_here(flag)
    return flag


_MADE_HERE: dict[int, weakref.ref] = {}     # id -> weak reference (not a WeakSet: its lookups compare
                                            # the referents with ==, an element-wise tensor compare and a sync)


def mark_made_here(x) -> None:
    """Record that fastema made the control array ``x`` (a skip flag) and keeps its memory: see
    :func:`made_here`. Arrays that take no weak reference are not recorded."""
    key = id(x)

    def forget(ref, key=key):
        if _MADE_HERE.get(key) is ref:
            del _MADE_HERE[key]

    try:
        _MADE_HERE[key] = weakref.ref(x, forget)
    except TypeError:
        pass


def made_here(x) -> bool:
    """True for a control array fastema made (:func:`new_flag`, a device plan's flag): nothing
    re-points its memory, so a launch may bind its kernel view once. A caller's array is viewed
    again at every launch (its ``.data`` may have been replaced since). Identity only: no value
    of ``x`` is read."""
    ref = _MADE_HERE.get(id(x))
    return ref is not None and ref() is x


def control_view(x, what: str, dtype, size: int, device: str, writable: bool):
    """A small control array (weights, flag) checked and viewed for the kernels: ``x`` must hold
    exactly ``size`` elements of ``dtype`` on ``device``."""
    dtype = np.dtype(dtype)
    backend = backend_of(x)
    try:
        if backend is None:
            raise Unsupported
        dev, dt, n = backend.control(x, what, writable)
    except Unsupported:
        raise TypeError(f"{what} must be a NumPy array or a tensor of {dtype} on {device}, "
                        f"got {type(x).__name__}") from None
    if dt != dtype or n != size:
        raise ValueError(f"{what} must hold {size} element(s) of {dtype}, got {n} of {dt}")
    if dev != device:
        raise ValueError(f"{what} is on {dev} but the buffers are on {device}; create it on {device}")
    view = backend.kernel_view(x)
    return view.reshape(-1) if isinstance(view, np.ndarray) else view


def metric_values(x, what: str):
    """``(kind, flat kernel view of the bits, (framework, device), shape)`` of metric values:
    a Python number, a NumPy array or a torch tensor (float64 allowed)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = np.asarray([x], np.float64)
    backend = backend_of(x)
    try:
        if backend is None:
            raise Unsupported
        return backend.metric(x, what)
    except Unsupported:
        raise TypeError(f"{what} must be a Python float, a NumPy array or a torch tensor, "
                        f"got {type(x).__name__}") from None


def metric_vector(x):
    """``x`` as one vector of metric values for a smoother, if its framework takes vectors
    (NumPy, torch), else None."""
    backend = backend_of(x)
    try:
        return None if backend is None else backend.metric_vector(x)
    except Unsupported:
        return None


def stack(values, names):
    """One vector of one-element metric values, all of one framework (NumPy reads the others)."""
    backend = backend_of(values[0])
    return (backend or NUMPY).stack(values, names)


def concat(parts: list):
    """``parts`` (fastema's state arrays, of one framework) joined end to end."""
    return backend_of(parts[0]).concat(parts)


def keeps_on_device(x) -> bool:
    """True when ``x``'s framework keeps metric values on their device (see :meth:`Backend.stack`)."""
    backend = backend_of(x)
    return backend is not None and backend.DEVICE_METRICS


def location(a) -> tuple:
    """``(framework, device)`` of a smoother's state array (NumPy on the host for anything else)."""
    backend = backend_of(a)
    return ("numpy", "cpu") if backend is None else backend.location(a)


def allocation(x) -> tuple[str, int, int] | None:
    """``(device, address, bytes)`` of the allocation that holds ``x`` (a torch tensor's whole
    storage, a NumPy array's base, a CUDA device array), for a face's memory accounting; None for
    anything else."""
    if is_torch(x):
        storage = x.untyped_storage()
        return device_of(x), storage.data_ptr(), storage.nbytes()
    if isinstance(x, np.ndarray):
        base = x if x.base is None else x.base
        if isinstance(base, np.ndarray):
            return "cpu", base.__array_interface__["data"][0], base.nbytes
        return "cpu", x.__array_interface__["data"][0], x.nbytes
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        device = getattr(getattr(x, "gpu_data", None), "device", None)
        index = getattr(getattr(x, "_numba_type_", None), "device", None)
        name = f"cuda:{getattr(device, 'id', index) or 0}"
        return name, cai["data"][0], int(getattr(x, "nbytes", 0) or getattr(x, "alloc_size", 0))
    return None


def address_key(objs: list) -> tuple | None:
    """A cheap key of ``objs``' addresses (see :meth:`Backend.address_key`), or None."""
    if not objs:
        return ()
    backend = backend_of(objs[0])
    return None if backend is None else backend.address_key(objs)


def version_bump(x):
    """The function that tells ``x``'s framework that fastema's kernels wrote a list of its arrays in
    place (torch: autograd's version counters), or None where nothing is told (:meth:`Backend.version_bump`)."""
    backend = backend_of(x)
    return None if backend is None else backend.version_bump()


def bump_versions(objs: list) -> None:
    """Tell each array's framework that fastema's kernels wrote ``objs`` in place, as its own in-place
    operations do (torch: autograd's version counters, so that a pending backward that saved one raises
    rather than using the new values; nothing for NumPy, JAX...). One call where every array is of one
    type (the usual case); no sync."""
    if not objs:
        return
    if len(set(map(type, objs))) == 1:
        bump = version_bump(objs[0])
        if bump is not None:
            bump(objs)
        return
    for x in objs:                                        # several frameworks: one array at a time
        bump = version_bump(x)
        if bump is not None:
            bump([x])


def layout_guard(objs: list):
    """A check that arrays at ``objs``' addresses (equal :func:`address_key`) still have their
    dtypes, shapes and strides (see :meth:`Backend.layout_guard`)."""
    return backend_of(objs[0]).layout_guard(objs) if objs else _none_again


def _none_again(objs: list) -> bool:
    return not objs


def zeros(where: tuple, n: int, dtype):
    """``n`` zeros of NumPy ``dtype`` in ``where = (framework, device)``."""
    return _maker(*where).zeros(where[1], n, dtype)


def kernel_view(a):
    """A kernel's view (NumPy or Numba device array) of one of fastema's state arrays."""
    return backend_of(a).kernel_view(a)


def to_host(a) -> np.ndarray:
    """A NumPy copy of an array fastema made (NumPy, torch, or a Numba device array); a torch
    tensor is read in order on torch's current stream."""
    return (backend_of(a) or cai.backend).to_host(a)


def where(cond, a, fill):
    """``a`` where ``cond``, else ``fill``, in ``a``'s framework (NumPy or torch)."""
    return backend_of(a).where(cond, a, fill)


def copy_from_host(dst, a: np.ndarray) -> None:
    """``dst[...] = a`` (converted to ``dst``'s dtype) for a NumPy array, a torch tensor (on
    torch's current stream) or a Numba device array."""
    (backend_of(dst) or cai.backend).copy_from_host(dst, a)


def strided(v, shape, order):
    """A view of the flat slice ``v`` with ``shape`` and canonical element strides ``order``
    (() for C order): the shadow of a channels_last source is laid out as the source is."""
    return backend_of(v).strided(v, shape, order)
