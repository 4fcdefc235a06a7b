"""The boundary: framework arrays in, plain descriptions of memory out. The only place in
fastema that recognises array types.

One adapter per framework, each a :class:`Backend` (einops' ``AbstractBackend``: one class
with every method, one subclass per framework): :mod:`.numpy`, :mod:`.torch`, :mod:`.cudasim`,
:mod:`.cai` (the CUDA array interface: Numba device arrays, and CuPy with its current stream),
:mod:`.dlpack` (JAX, TensorFlow, Keras and any other DLPack producer). :func:`backend_of`
picks one, importing no framework (a framework's classes are looked up only when the framework
is already in ``sys.modules``). The functions the package names dispatch to it, by concern:
:mod:`.dispatch` (which adapter, and what it answers), :mod:`.allocations` (fastema's own arrays),
:mod:`.views` (views and copies for the kernels) and :mod:`.spans` (where arrays' bytes are):

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

A new framework is one more :class:`Backend` subclass here and one line in
:data:`.dispatch._ORDER`.
"""
from __future__ import annotations

from . import _buf, dlpack
from ._base import Backend, Road, Unsupported, no_stream  # noqa: F401  (the protocol)
from ._buf import (  # noqa: F401  (the boundary's names)
    Buf,
    c_layout,
    device_name,
    layout,
    not_dense,
    unsupported_dtype,
)
from .allocations import (  # noqa: F401  (fastema's own arrays)
    allocation,
    empty,
    made_here,
    mark_made_here,
    new_flag,
    zero_,
    zeros,
)
from .dispatch import (  # noqa: F401  (which adapter, and what it answers)
    GIVEN,
    NUMPY,
    TORCH,
    backend_named,
    backend_of,
    capturing,
    describe,
    device_of,
    framework,
    is_torch,
    stream_getter,
    streams_from,
    using,
)
from .spans import (  # noqa: F401  (where arrays' bytes are)
    address_key,
    bump_versions,
    disjoint,
    first_shared,
    layout_guard,
    overlaps,
    version_bump,
)
from .views import (  # noqa: F401  (views and copies for the kernels)
    concat,
    control_view,
    copy_from_host,
    foreign,
    keeps_on_device,
    kernel_view,
    location,
    metric_values,
    metric_vector,
    stack,
    strided,
    to_host,
    where,
)

SUPPORTED = _buf.SUPPORTED
READ_ONLY_HINTS = dlpack.READ_ONLY_HINTS
