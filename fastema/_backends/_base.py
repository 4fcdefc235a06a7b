"""The one protocol every adapter implements (einops' ``AbstractBackend``): :class:`Backend`
lists every method the rest of fastema may call on an array of some framework; an adapter
overrides what its framework can do, and the defaults either give the framework-neutral
answer or raise :class:`Unsupported`, naming the adapter and the method."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from ._buf import Buf


class Unsupported(NotImplementedError):
    """An adapter was asked for something its framework does not offer (the caller turns it
    into a message for the user where a user can reach it)."""


class Road(NamedTuple):
    """The framework's own op for a pair whose every check passed (:meth:`Backend.lerp_road`), taken
    by ``ema_update_`` itself: where ``check(s, x)`` holds and ``address(s)``, ``address(x)`` are
    ``at_s``, ``at_x``, ``lerp(s, x, w)`` writes fastema's bits."""
    check: Callable[[Any, Any], bool]       # the guard: types, dtypes, shapes, strides, flags
    address: Callable[[Any], int]
    at_s: int
    at_x: int
    lerp: Callable[[Any, Any, float], Any]


def no_stream() -> int:
    """The stream getter of frameworks without a current CUDA stream: 0, the legacy default stream."""
    return 0


class Backend:
    """An adapter: how fastema reads, makes and moves one framework's arrays.

    Class attributes:
        NAME: the framework's name in :class:`Buf` and in ``(framework, device)`` pairs.
        HANDS_OVER: the framework hands over new source arrays every step, freed on its own
            streams (JAX, TensorFlow): two address tables to alternate between, and replaced
            sources retired only after fastema's launches that read them.
        STORAGE_MOVES: a source object's memory can be replaced under it (torch's
            ``param.data = new``): its address is re-read before every use and its storage kept
            alive (:meth:`addresses`, :meth:`keep_alive`, :meth:`signatures`).
        DEVICE_METRICS: :meth:`stack` keeps metric values on their device (no host transfer);
            a Python number next to such values is refused.
        BY_TYPE: :meth:`owns` is decided by an array's type alone, so ``backend_of`` remembers
            the adapter of a type it has seen (one dict lookup a call).
    """

    NAME = "?"
    HANDS_OVER = False
    STORAGE_MOVES = False
    DEVICE_METRICS = False
    BY_TYPE = False

    def __repr__(self) -> str:
        return f"<fastema backend {self.NAME!r}>"

    def _unsupported(self, what: str) -> Unsupported:
        return Unsupported(f"fastema's {self.NAME} adapter ({type(self).__name__}) has no {what}")

    # ------------------------------------------------------------ recognising and describing

    def owns(self, x) -> bool:
        """True when ``x`` is this framework's array (importing no framework)."""
        raise self._unsupported("owns()")

    def describe(self, x, what: str) -> Buf:
        """``x`` as a :class:`Buf`, or TypeError/ValueError naming ``what``."""
        raise self._unsupported("describe()")

    def address(self, x) -> int:
        """The address of ``x``'s first element."""
        raise self._unsupported("address()")

    def device_of(self, x) -> str:
        """fastema's name of the device ``x`` is on ("cpu", "cuda:N"): the one question fastema asks
        to choose a path by where an array is (a device plan, a capture refusal), so that the adapter
        decides it (by default: :meth:`describe`'s)."""
        return self.describe(x, "the array").device

    # ------------------------------------------------------------ sources kept by a shadow

    def addresses(self, objs: list) -> list:
        """The addresses of the sources ``objs`` now (read before every step if STORAGE_MOVES)."""
        return [self.address(x) for x in objs]

    def keep_alive(self, objs: list) -> list:
        """What must be held so that the sources' memory is not freed and reused under fastema."""
        return []

    def signatures(self, objs: list) -> list | None:
        """What each source must keep between two full checks (dtype, shape, strides), cheaply;
        None: nothing cheaper than describing them again."""
        return None

    def address_key(self, objs: list) -> tuple | None:
        """A key of ``objs``' addresses (all of this framework), cheaper than describing them and
        made of what the garbage collector does not track (ints), or None when there is none
        cheaper. An equal key says the same memory, not the same layout: a cached walk in storage
        order is right only when :meth:`layout_guard` says yes too."""
        return None

    def layout_guard(self, objs: list):
        """For a framework with an :meth:`address_key`: a callable, made once, that takes arrays at
        ``objs``' addresses and says (True/False) whether they have the dtypes, shapes and strides
        ``objs`` have now, cheaper than describing them. It keeps numbers, never an array."""
        raise self._unsupported("layout_guard()")

    # ------------------------------------------------------------ fastema's own arrays

    def empty(self, like: Buf, kind: int, shape: tuple):
        """A new C-contiguous array of storage ``kind`` and ``shape`` on ``like``'s device."""
        raise self._unsupported("empty()")

    def zeros(self, device: str, n: int, dtype):
        """``n`` zeros of NumPy ``dtype`` on ``device`` ("cpu" or "cuda:N")."""
        raise self._unsupported("zeros()")

    def zero_(self, a) -> None:
        """Fill ``a`` with zeros in place, in order on the framework's stream, without a sync."""
        raise self._unsupported("zero_()")

    def location(self, a) -> tuple:
        """``(framework, device)`` of one of fastema's state arrays (the key :meth:`zeros` takes)."""
        raise self._unsupported("location()")

    def kernel_view(self, a):
        """A kernel's view of ``a``, no copy: a NumPy array (host) or a Numba device array (CUDA)."""
        raise self._unsupported("kernel_view()")

    def strided(self, v, shape: tuple, order: tuple):
        """A view of the flat slice ``v`` with ``shape`` and canonical element strides ``order``
        (() for C order)."""
        if not order:
            return v.reshape(shape)
        raise self._unsupported("strided views")

    # ------------------------------------------------------------ small control and metric arrays

    def control(self, x, what: str, writable: bool) -> tuple:
        """``(device, dtype, size)`` of a small control array (weights, flags), for the caller's
        checks; refuses a read-only ``x`` that must be ``writable``."""
        raise self._unsupported("control arrays")

    def metric(self, x, what: str) -> tuple:
        """``(kind, flat kernel view of the bits, (framework, device), shape)`` of metric values."""
        raise self._unsupported("metric values")

    def metric_vector(self, x):
        """``x``, a vector of metric values, as the smoothers read it (no autograd history)."""
        raise self._unsupported("metric vectors")

    def stack(self, values, names):
        """One vector of the one-element metric arrays ``values`` (all of this framework; ``names``
        for messages): by default NumPy reads them (a host transfer)."""
        return np.asarray(values, dtype=np.float64)

    def concat(self, parts: list):
        """The arrays ``parts`` joined end to end."""
        return np.concatenate(parts)

    def where(self, cond, a, fill):
        """``a`` where ``cond``, else ``fill``."""
        raise self._unsupported("where()")

    # ------------------------------------------------------------ host transfers and streams

    def to_host(self, a) -> np.ndarray:
        """A NumPy copy of ``a``, read in order on the framework's stream."""
        raise self._unsupported("to_host()")

    def copy_from_host(self, dst, a: np.ndarray) -> None:
        """``dst[...] = a`` converted to ``dst``'s dtype, in order on the framework's stream."""
        raise self._unsupported("copy_from_host()")

    def capturing(self, device: str) -> bool:
        """Whether the framework's current stream on ``device`` is being captured into a CUDA graph
        now (False: a framework whose captures fastema does not see)."""
        return False

    def version_bump(self) -> Callable[[list], None] | None:
        """What tells this framework that fastema's kernels wrote a list of its arrays in place (one
        call, no sync), as its own in-place operations do; None where nothing is told (a NumPy or
        JAX array has no version)."""
        return None

    def inplace_refusal(self, x, what: str) -> str | None:
        """Why this framework refuses an in-place write of ``x`` now (torch: autograd's and
        inference mode's rules), in its words with the fix; None where it writes it."""
        return None

    def read_only_now(self, objs: list) -> int | None:
        """The index of the first of ``objs`` (described before, writable then) that may not be
        written now, or None: for frameworks whose arrays can turn read-only after they were
        described (NumPy's ``a.flags.writeable = False``); the others' writability is fixed."""
        return None

    def inplace_moded(self, x) -> bool:
        """Whether :meth:`inplace_refusal` of ``x`` may change with the framework's modes (torch:
        grad mode, inference mode) while ``x``'s :meth:`layout_guard` holds."""
        return False

    def lerp_road(self, s, x) -> Road | None:
        """The :class:`Road` where the framework's own op updates the checked pair ``s`` (written)
        from ``x`` with fastema's bits at nearest rounding for a weight below 0.5, while the same
        layouts and memory hold (torch: :mod:`.torch_lerp`); None: no road."""
        return None

    def stream_getter(self, device: str) -> Callable[[], Any]:
        """A zero-argument function returning the raw handle of the framework's current CUDA
        stream on ``device`` (0: the legacy default stream), called at every launch."""
        return no_stream
