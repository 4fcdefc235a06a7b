"""torch tensors and parameters, CPU and CUDA, with the refusals for tensors whose
``data_ptr()`` is not where their elements are (sharded, partitioned, lazy, freed)."""
from __future__ import annotations

import contextlib
import functools
import operator
import sys
from typing import Iterator

import numpy as np

from ..kernels.kinds import BF16, F16, F32, F64
from . import cai, torch_lerp, versions
from ._base import Backend, no_stream
from ._buf import Buf, layout, not_dense, unsupported_dtype
from ._buf import device_name as _name

NAME = "torch"
_KINDS: dict = {}
_BITS = {F32: "uint32", BF16: "uint16", F16: "uint16", F64: "float64"}
_DTYPE_SHAPE = operator.attrgetter("dtype", "shape")
_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")
_GRAD = operator.attrgetter("requires_grad")


_STREAMED: list = []     # streamed_layout_checks()'s blocks


@contextlib.contextmanager
def streamed_layout_checks() -> Iterator[None]:
    """For the ``with`` block, the layout guards made (:meth:`Torch.layout_guard`) are fastema's own
    streamed comparison, as on a torch without a batched tensor guard that passes the self-test
    (both checks tested on one torch). A guard made before keeps its check; blocks nest."""
    _STREAMED.append(True)
    try:
        yield
    finally:
        _STREAMED.pop()


def kind_of(dtype) -> int | None:
    if not _KINDS:
        import torch

        _KINDS.update({torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.float64: F64})
    return _KINDS.get(dtype)


def dtype_of(kind: int):
    import torch

    return {F32: torch.float32, BF16: torch.bfloat16, F16: torch.float16, F64: torch.float64}[kind]


@functools.cache
def _plain_types():
    import torch

    return torch.Tensor, torch.nn.Parameter


def refuse_foreign(t, what: str) -> None:
    """Tensors whose data_ptr() is not where their elements are, or whose elements are elsewhere:
    refused by name, with what to do, before any address is taken."""
    if type(t) in _plain_types():
        if hasattr(t, "ds_id") or getattr(t, "_fsdp_flattened", False) or t.is_neg() or t.is_conj():
            _refuse_marked(t, what)
        return
    import torch

    from .. import _privates

    if _privates.get("torch.utils._python_dispatch:is_traceable_wrapper_subclass")(t):
        kind = type(t).__name__
        hint = ("its elements live in per-rank local shards (FSDP2 fully_shard, tensor parallel, "
                "distribute_module): pass the local shard (t.to_local()), or average the whole model with "
                "fastema.torch.EMA(model), which averages every rank's local shards") if kind == "DTensor" else \
            "it wraps other tensors (a quantised or sharded tensor subclass); pass the plain tensor it holds"
        raise TypeError(f"{what} is a {kind}, which fastema cannot read: {hint}. Nothing was written.")
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
        raise ValueError(f"{what} is an uninitialized parameter of a lazy module (nn.LazyLinear, ...): it has no "
                         f"shape or memory yet; run one forward pass before making the average")
    _refuse_marked(t, what)


def _refuse_marked(t, what: str) -> None:
    """ZeRO-3 and FSDP1 parameters, lazy negated/conjugated views: refused by name."""
    if hasattr(t, "ds_id") or hasattr(t, "ds_tensor"):
        raise TypeError(
            f"{what} is a DeepSpeed ZeRO-3 partitioned parameter (shape {tuple(t.shape)}, full shape "
            f"{tuple(getattr(t, 'ds_shape', ()))}): its elements are spread over the ranks, so fastema would "
            f"average nothing. fastema.torch.EMA(engine) averages every rank's ZeRO-3 partitions; here, pass the "
            f"partition (p.ds_tensor). Nothing was written.")
    if getattr(t, "_fsdp_flattened", False):
        raise TypeError(
            f"{what} is a parameter managed by FSDP1 (FullyShardedDataParallel): it is a rank-dependent "
            f"piece of a flat parameter. Use FSDP2 (torch.distributed.fsdp.fully_shard), or make the EMA "
            f"of an unwrapped copy of the model. Nothing was written.")
    if t.is_neg() or t.is_conj():
        raise TypeError(f"{what} is a lazily negated or conjugated view (is_neg/is_conj), whose memory does "
                        f"not hold its values; pass t.resolve_neg() / t.resolve_conj(). Nothing was written.")


_VIEWS_KEPT = 8
"""How many kernel views of metric values a backend keeps (:meth:`Torch.metric`)."""


def device_name(device) -> str:
    """fastema's name ("cpu", "cuda:N") of a torch.device."""
    return _name(device.type, device.index)


def _numpy_dtype(t) -> np.dtype:
    return np.dtype(str(t.dtype).replace("torch.", ""))


class Torch(Backend):
    """torch tensors on the CPU and on CUDA GPUs. Where a tensor is, for fastema, is one question
    (:meth:`device_of`); a GPU's memory is viewed by :meth:`raw_view` and fastema's own arrays for a
    device are made on :meth:`torch_device` (a subclass answering otherwise stands a GPU in: the fake
    GPU of ``testkit``, given to :func:`fastema._backends.using`)."""

    NAME = NAME
    STORAGE_MOVES = True          # param.data = new swaps the storage under a Parameter
    DEVICE_METRICS = True
    BY_TYPE = True

    def __init__(self):
        self._views: dict = {}
        """``(device, address, elements, bits dtype) -> kernel view`` of metric values on a GPU, the
        last :data:`_VIEWS_KEPT`: a smoother's values are a new tensor at every update, at one of a few
        addresses (the caching allocator's), and a view made afresh each time (a Numba device array:
        ~20 us) is most of an update's host work. A kept view owns no memory: it is handed out only for
        a tensor the caller holds at that address now, in that layout and dtype (the same memory,
        described the same)."""

    def owns(self, x) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    def device_of(self, t) -> str:
        """fastema's name of ``t``'s device: "cpu", "cuda:N" (``is_cpu`` is a flag; ``device.type``
        makes a string)."""
        if t.is_cpu:
            return "cpu"
        dev = t.device
        return _name(dev.type, dev.index)

    def torch_device(self, device: str) -> str:
        """The torch device fastema makes its own arrays for ``device`` on."""
        return device

    def raw_view(self, address: int, numel: int, dtype: np.dtype, owner):
        """The kernels' view of ``numel`` elements of ``dtype`` at ``address`` on a GPU (``owner``'s
        memory; None: a view kept without its owner, see :meth:`metric`)."""
        return cai.raw_view(address, numel, dtype, owner)

    def capturing(self, device: str) -> bool:
        """torch's query: its current stream is being captured into a CUDA graph."""
        if device == "cpu":
            return False
        import torch

        return torch.cuda.is_current_stream_capturing()

    def describe(self, t, what: str) -> Buf:
        import torch

        refuse_foreign(t, what)
        kind = kind_of(t.dtype)
        if kind is None:
            raise unsupported_dtype(what, t.dtype)
        if t.layout != torch.strided:
            raise TypeError(f"{what} is a {t.layout} tensor; fastema works on dense (strided) tensors")
        if not (t.is_cpu or t.is_cuda):
            raise ValueError(f"{what} is on {t.device}; fastema runs on the CPU and on CUDA GPUs "
                             f"(a meta tensor has no memory: materialise the model first)")
        device = self.device_of(t)
        contiguous = t.is_contiguous()
        order = () if contiguous else layout(t.shape, t.stride())
        if order is None:
            raise not_dense(what, t.shape, t.stride())
        numel = t.numel()
        address = t.data_ptr()
        if numel:
            if address == 0:
                raise ValueError(
                    f"the storage of {what} was freed (address 0 with {numel} elements: an FSDP unsharded "
                    f"parameter or untyped_storage().resize_(0)); point it at live memory, or make the EMA over "
                    f"tensors that own their storage. Nothing was written.")
            span = numel if contiguous else 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride()))
            need = (t.storage_offset() + span) * t.element_size()
            have = t.untyped_storage().nbytes()
            if have < need:
                raise ValueError(
                    f"the storage of {what} holds {have} bytes but the tensor needs {need} (it was resized in "
                    f"place, e.g. untyped_storage().resize_()); restore its storage or make a new EMA. "
                    f"Nothing was written.")
        return Buf(t, kind, device, tuple(t.shape), address, True, NAME, order)

    def address(self, x) -> int:
        return x.data_ptr()

    # ------------------------------------------------------------ sources kept by a shadow

    def addresses(self, objs: list) -> list:
        return list(map(_tensor().data_ptr, objs))          # C-level: ~0.1 us a tensor

    def keep_alive(self, objs: list) -> list:
        return [x.untyped_storage() for x in objs]

    def signatures(self, objs: list) -> list:
        """(dtype, shape) and strides of each tensor (C-level maps: ~0.3 us a tensor)."""
        return list(zip(map(_DTYPE_SHAPE, objs), map(_tensor().stride, objs)))

    def address_key(self, objs: list) -> tuple | None:
        """Every tensor's address (one C-level map, ~0.05 us a tensor), or None when one is not a
        tensor with memory. A tuple of ints: the garbage collector does not track it, so a key per
        call costs no collections. Equal keys say the same memory, not the same layout (see
        :meth:`layout_guard`)."""
        try:
            return tuple(map(_tensor().data_ptr, objs))
        except (TypeError, RuntimeError):   # not a tensor; a tensor subclass with no storage of its own
            return None

    def layout_guard(self, objs: list):
        """A check that tensors at ``objs``' addresses still have ``objs``' types, dtypes, shapes and
        strides now (an address alone is not enough: ``a.view(3, 4).t()`` is ``a``'s memory in another
        order, ``a.view(3, 4)`` another shape of the same elements). It is torch's own batched C++
        check of dtype, shape, strides, device, ``requires_grad`` and dispatch keys (an inference
        tensor's are not a normal one's) when this torch has one that passes a self-test (~0.05 us a
        tensor); else (or when that one says no, e.g. under another ``inference_mode``) the
        comparison streams each tensor's values, ``requires_grad`` and ``is_inference()`` too, against
        numbers kept here, freeing every temporary at once (~0.2 us a tensor). No tensor is kept."""
        T = _tensor()
        n = len(objs)
        types, dtypes = tuple(map(type, objs)), tuple(map(_DTYPE, objs))
        shapes, strides = tuple(map(tuple, map(_SHAPE, objs))), tuple(map(T.stride, objs))   # plain tuples of ints:
        # untracked by the garbage collector after its first pass, however long they are kept

        devices = tuple(map(T.get_device, objs))           # -1: the CPU
        lazy = any(map(T.is_neg, objs)) or any(map(T.is_conj, objs))   # never cached: describe() refuses them
        autograd = tuple(map(_GRAD, objs)), tuple(map(T.is_inference, objs))   # what torch's in-place rules read

        def same(ts: list) -> bool:
            return (len(ts) == n and not lazy and all(map(operator.is_, map(type, ts), types))
                    and all(map(operator.is_, map(_DTYPE, ts), dtypes))
                    and all(map(operator.eq, map(T.stride, ts), strides))
                    and all(map(operator.eq, map(_SHAPE, ts), shapes))
                    and all(map(operator.eq, map(T.get_device, ts), devices))
                    and not any(map(T.is_neg, ts)) and not any(map(T.is_conj, ts))   # lazy negation/conjugate
                    and (tuple(map(_GRAD, ts)), tuple(map(T.is_inference, ts))) == autograd)

        guards = None if _STREAMED else _tensor_guards()
        if guards is None:
            return same
        try:
            fast = guards(*objs, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
        except Exception:                   # a torch whose guard takes other arguments: the streamed check
            return same
        return lambda ts: (len(ts) == n and fast(*ts)) or same(ts)

    # ------------------------------------------------------------ fastema's own arrays

    def empty(self, like, kind: int, shape: tuple):
        import torch

        return torch.empty(shape, dtype=dtype_of(kind), device=like.obj.device)

    def zeros(self, device, n: int, dtype):
        import torch

        return torch.zeros(n, dtype=getattr(torch, np.dtype(dtype).name), device=self.torch_device(device))

    def zero_(self, a) -> None:
        a.zero_()

    def location(self, a) -> tuple:
        return NAME, self.device_of(a)

    def kernel_view(self, a):
        """A NumPy view (the CPU) or a device view (a GPU: :meth:`raw_view`) of a contiguous tensor,
        no copy (bfloat16 as its bits, uint16, on a GPU)."""
        if self.device_of(a) == "cpu":
            return a.detach().numpy()
        dt = np.dtype(np.uint16) if str(a.dtype) == "torch.bfloat16" else _numpy_dtype(a)
        return self.raw_view(a.data_ptr(), a.numel(), dt, a)

    def strided(self, v, shape, order):
        return v.as_strided(shape, order) if order else v.reshape(shape)

    # ------------------------------------------------------------ control and metric arrays

    def control(self, x, what: str, writable: bool):
        name = str(x.dtype).replace("torch.", "")
        dt = np.dtype(name) if name in ("float32", "float64", "int32", "int64") else name
        return self.device_of(x), dt, x.numel()

    def metric(self, x, what: str):
        if x.is_cuda:                                     # (is_cuda, is_cpu: flags; device.type makes a string)
            device = f"cuda:{x.device.index}"
        elif x.is_cpu:
            device = self.device_of(x)                    # the CPU (where the adapter says CPU tensors are)
        else:
            raise ValueError(f"{what} is on {x.device}; smoothers run on the CPU and on CUDA GPUs "
                             f"(a meta tensor has no values)")
        kind = kind_of(x.dtype)
        if kind is None:
            raise TypeError(f"{what} has dtype {x.dtype}; smoothers take floating values")
        if device != "cpu" and x.is_contiguous():         # its elements in order where it starts: no view
            return kind, self._metric_view(x, _BITS[kind], device), (NAME, device), tuple(x.shape)
        # imported here, not on a GPU's per-update path (the view above)
        import torch

        flat = x.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()                      # a temporary: its view owns it
        bits = flat.view(getattr(torch, _BITS[kind]))
        return kind, self.kernel_view(bits), (NAME, device), tuple(x.shape)

    def _metric_view(self, t, bits: str, device: str):
        """The kernel view of the contiguous tensor ``t``'s elements, flat, as ``bits`` (its dtype's
        unsigned bits, or float64), kept (see ``_views``)."""
        views = self._views
        key = (device, t.data_ptr(), t.numel(), bits)
        view = views.get(key)
        if view is None:
            if len(views) >= _VIEWS_KEPT:
                del views[next(iter(views))]              # the oldest
            view = views[key] = self.raw_view(key[1], key[2], np.dtype(bits), None)
        return view

    def metric_vector(self, x):
        return x.detach()

    def stack(self, values, names):
        """One float64 vector of one-element tensors on one device (one stays as it is)."""
        import torch

        devices = {v.device for v in values}
        if len(devices) != 1:
            raise ValueError(f"the metric tensors are on several devices {sorted(map(str, devices))}; "
                             f"put them on one")
        for n, v in zip(names, values):
            if v.numel() != 1:
                raise ValueError(f"metric {n!r} has {v.numel()} elements; a tracker takes one value per "
                                 f"metric (use fastema.Smoother for per-element streams)")
        if len(values) == 1:
            return values[0].detach().reshape(1)
        return torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])

    def concat(self, parts: list):
        import torch

        return torch.cat(parts)

    def where(self, cond, a, fill):
        import torch

        return torch.where(cond, a, torch.full_like(a, fill))

    # ------------------------------------------------------------ host transfers and streams

    def to_host(self, a) -> np.ndarray:
        return a.detach().cpu().numpy().copy()

    def copy_from_host(self, dst, a: np.ndarray) -> None:
        import torch

        dst.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(dst.dtype))

    def version_bump(self):
        """autograd's version counters of the tensors bumped (:func:`.versions.bump_versions`)."""
        return versions.bump_versions()

    def inplace_refusal(self, x, what: str) -> str | None:
        """torch's refusal of an in-place write of ``x`` now (:func:`.versions.refusal`)."""
        return versions.refusal(x, what)

    def inplace_moded(self, x) -> bool:
        return versions.moded(x)

    def lerp_road(self, s, x):
        """torch's own ``lerp_`` for the pair where it gives fastema's bits (:mod:`.torch_lerp`)."""
        return torch_lerp.road(s, x, None if _STREAMED else _tensor_guards())

    def stream_getter(self, device: str):
        """torch's current stream on ``device``: one C call per launch (~0.3 us)."""
        if device == "cpu":
            return no_stream
        from .. import _privates

        return functools.partial(_privates.get("torch._C:_cuda_getCurrentRawStream"),
                                 int(device.split(":")[1]))


def span(t) -> tuple:
    """``(device, address, bytes from it to the last element)`` of a tensor of any dtype and layout
    (dense or not): the bytes its elements may touch, for :func:`fastema._backends.first_shared`."""
    n = t.numel()
    extent = 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride())) if n else 0
    return _name(t.device.type, t.device.index), t.data_ptr(), extent * t.element_size()


@functools.cache
def _tensor():
    import torch

    return torch.Tensor


@functools.cache
def _tensor_guards():
    """torch's batched check of tensors' dtype, shape, strides, device and dispatch keys against
    those it was made with (Dynamo's ``TensorGuards``, private to torch), or None when this torch has
    none, or has one that does not tell a transposed, reshaped, retyped or restrided view of a probe
    from the probe (a fast path only: :meth:`Torch.layout_guard` falls back to its own comparison)."""
    from .. import _privates

    TensorGuards = _privates.find("torch._C._dynamo.guards:TensorGuards")
    if TensorGuards is None:
        return None
    try:
        import torch

        probe, column = torch.zeros(4, 4), torch.zeros(4, 1)
        g = TensorGuards(probe, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        c = TensorGuards(column, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        others = (probe.t(), probe.view(2, 8), probe.view(16), probe.view(torch.int32), probe[:2], probe.unsqueeze(0))
        sound = g.check(probe) and c.check(column) and not any(g.check(o) for o in others) and \
            not c.check(column.as_strided((4, 1), (1, 4))) and not g.check(torch.zeros(4, 4, dtype=torch.float64))
    except Exception:
        return None
    return TensorGuards if sound else None


backend = Torch()
