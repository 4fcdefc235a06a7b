"""torch_ema's ``ExponentialMovingAverage`` (``torch_ema``, 0.3) on fastema's kernels.

Deviations (documented on the class): the parameters are kept alive (the kernels read them by
address; torch_ema holds weak references); ``to(device)`` must name the parameters' device, and
a ``to`` that casts or moves any shadow tensor makes them all anew (one flat buffer);
``load_state_dict`` refuses mismatched shapes, a NaN ``decay`` and a negative ``num_updates``
before loading anything.
"""
from __future__ import annotations

import contextlib
import copy as _copy
import numbers
import weakref
from typing import Iterable

import torch
from torch import nn

from ... import _backends
from ... import schedules as S
from ...flat import FlatShadow
from ...ops import ema_update_many_
from ._common import check_loaded

__all__ = ["ExponentialMovingAverage"]


class _PlainShadow:
    """torch_ema's own shadow, for what fastema's kernels cannot hold (:func:`_held`): no
    parameters, meta ones (no memory: every operation checks shapes only, as in torch_ema),
    complex ones, a slice, or one tensor listed twice (tied weights). The parts of
    :class:`FlatShadow`'s interface this module uses, computed as torch_ema computes them."""

    def __init__(self, params: list, shadows: list | None = None):
        self.sources = params
        self._shadows = [p.clone().detach() for p in params] if shadows is None else shadows

    def views(self) -> dict:
        return dict(enumerate(self._shadows))

    def update(self, decay: float) -> None:
        for s, p in zip(self._shadows, self.sources):
            s.sub_((s - p).mul_(1.0 - decay))

    def copy_to_sources(self) -> None:
        for s, p in zip(self._shadows, self.sources):
            p.data.copy_(s.data)


def _held(params: list) -> bool:
    """Whether a :class:`FlatShadow` takes ``params`` where torch_ema's arithmetic would: not where
    there are none, or a meta one (no memory), a complex one, a slice (not dense), or two sharing
    a byte (one tensor listed twice). Anything else goes to :class:`FlatShadow`, which refuses by
    name what neither takes (a DTensor: its local shards, ``to_local()``)."""
    if not params:
        return False
    if any(type(p) not in (torch.Tensor, nn.Parameter) for p in params):
        return True                                # (a subclass: FlatShadow says what to do)
    if any(p.is_meta or p.is_complex() or _backends.layout(p.shape, p.stride()) is None for p in params):
        return False
    spans = sorted((str(p.device), p.data_ptr(), p.data_ptr() + p.numel() * p.element_size())
                   for p in params if p.numel())
    return all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))


def _shadow(params: list, dtype: str = "same"):
    """fastema's flat shadow of ``params``; torch_ema's own for what it cannot hold (see
    :class:`_PlainShadow`)."""
    if not _held(params):
        plain = _PlainShadow(params)
        if dtype != "same":
            plain._shadows = [s.to(dtype=getattr(torch, dtype)) if s.is_floating_point() else s
                              for s in plain._shadows]
        return plain
    return FlatShadow(params, dtype=dtype)


def _check_decay(decay, name: str) -> None:
    """torch_ema's check of a decay (``Decay must be between 0 and 1``), NaN refused too (torch_ema's
    ``decay < 0 or decay > 1`` lets it through, and its updates then write NaN)."""
    if not isinstance(decay, numbers.Real) or not 0.0 <= float(decay) <= 1.0:
        where = "" if name == "decay" else f" ({name}: nothing was loaded)"
        raise ValueError(f"Decay must be between 0 and 1 (a float), got {decay!r}{where}")


_DTYPE_NAMES = {None: "same", torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def _kept_dtype(shadows: list, params: list) -> str:
    """The :class:`FlatShadow` dtype that rebuilds ``shadows`` (of ``params``) in their own dtypes
    (``to(device)`` keeps a float64 average float64, as torch_ema does)."""
    have = [s.dtype for s in shadows]
    for name in _DTYPE_NAMES.values():
        if have == [p.dtype if name == "same" or p.dtype == torch.float64 else getattr(torch, name) for p in params]:
            return name
    raise ValueError(f"the shadow's dtypes {have} no longer follow the parameters' {[p.dtype for p in params]} "
                     f"(cast after construction): pass the shadow dtype, ema.to(device, dtype=...); nothing moved")


class ExponentialMovingAverage:
    """torch_ema's ``ExponentialMovingAverage(parameters, decay, use_num_updates=True)``.

    ``shadow_params`` are views into one flat buffer per (device, dtype), in the
    parameters' own dtype (as in torch_ema), laid out as the parameters are (channels_last
    stays channels_last). As in torch_ema, ``average_parameters()`` stores the raw
    weights, copies the averages in and restores on exit, so ``shadow_params`` keep the
    averages inside the block. Parameters passed to ``update``, ``copy_to``, ``store`` or
    ``restore`` act for that call only; without them the parameters given at
    construction are used. For an in-place swap with no stored copy, use
    :class:`fastema.torch.EMA`.

    Differences from torch_ema: the kernels read the parameters by address, so this
    class keeps them alive (torch_ema holds weak references and raises once they are
    collected); ``to(device)`` must name the parameters' device (the shadow lives beside
    them), and a ``to`` that casts or moves any shadow tensor makes all of them anew (they share
    one flat buffer; torch_ema keeps those already in place; where nothing changes both keep
    all); ``load_state_dict`` refuses a state dict whose shapes do not match these
    parameters, before anything is loaded (torch_ema fails later, in ``copy_to``). A NaN
    ``decay`` (here and in a state dict) and a negative ``num_updates`` are refused by name:
    torch_ema takes them, and its updates then write NaN into the average (``min(nan, ...)``
    is NaN) or use a decay below 0 (``(1 + n) / (10 + n)`` for ``n < 0``), which fastema's
    update refuses.

    What fastema's kernels cannot hold is taken as torch_ema takes it: no parameters, meta ones
    (no memory), complex ones, a slice (not dense) or one tensor listed twice (an encoder's and a
    decoder's shared embedding). The shadow is then torch_ema's own list of clones, computed as
    torch_ema computes it. A parameter cast, moved or laid out anew after construction
    (``model.to(torch.bfloat16)``) is refused by name at the next update, where torch_ema goes on
    with its copies in their old dtype: make the EMA after the cast. ``load_state_dict`` casts the
    shadow and stored copies to the parameters' dtypes, as torch_ema does.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float, use_num_updates: bool = True):
        _check_decay(decay, "decay")
        params = [p for p in parameters]
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self._flat = _shadow(params)
        self._refs = [weakref.ref(p) for p in params]
        self._stored: FlatShadow | list | None = None     # store(): a flat copy, or clones of what it got

    @property
    def collected_params(self) -> list[torch.Tensor] | None:
        if isinstance(self._stored, FlatShadow):
            return list(self._stored.views().values())
        return self._stored

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        return list(self._flat.views().values())

    def _params(self, parameters):
        if parameters is None:
            params = [r() for r in self._refs]
            if any(p is None for p in params):
                raise ValueError("(One of) the parameters with which this ExponentialMovingAverage was initialized "
                                 "no longer exists (was garbage collected); please either provide `parameters` "
                                 "explicitly or keep the model to which they belong from being garbage collected.")
            return params
        params = list(parameters)
        if len(params) != len(self._refs):
            raise ValueError("Number of parameters passed as argument is different from number of shadow "
                             "parameters maintained by this ExponentialMovingAverage")
        return params

    def _own(self, params: list) -> bool:
        """True when ``params`` are the tracked parameters (the fast path of one flat launch)."""
        return all(a is b for a, b in zip(params, self._flat.sources))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """``shadow -= (1 - decay) * (shadow - param)`` with torch_ema's num_updates warm-up."""
        params = self._params(parameters)
        decay = self.decay
        if self.num_updates is not None:
            decay = S.NumUpdates(decay)(self.num_updates + 1)
        if parameters is None or self._own(params):
            self._flat.update(decay)
        elif isinstance(self._flat, _PlainShadow):
            _PlainShadow(params, self.shadow_params).update(decay)
        else:                                    # other parameters, for this call only
            ema_update_many_(self.shadow_params, params, decay)
        if self.num_updates is not None:
            self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        params = self._params(parameters)
        if parameters is None or self._own(params):
            self._flat.copy_to_sources()
        else:
            for s, p in zip(self.shadow_params, params):
                p.data.copy_(s.data)

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Save the current parameters (a copy, as torch_ema) for :meth:`restore`; whatever is
        given is stored, in its own dtype."""
        params = self._params(parameters)
        if isinstance(self._stored, FlatShadow):
            try:
                self._stored.rebind(params)
                self._stored.copy_from_sources()
                return
            except (TypeError, ValueError):
                pass                             # other shapes or dtypes: store them as they are
        try:
            self._stored = FlatShadow(params, dtype="same")
        except (TypeError, ValueError):
            self._stored = [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        stored = self.collected_params
        if stored is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        params = self._params(parameters)
        if isinstance(self._stored, FlatShadow) and all(a is b for a, b in zip(params, self._stored.sources)):
            self._stored.copy_to_sources()
        else:
            for c, p in zip(stored, params):
                p.data.copy_(c.data)

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[torch.Tensor] | None = None):
        """Averaged weights in, raw weights back on exit (also when the block raises)."""
        params = self._params(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def to(self, device=None, dtype=None) -> None:
        """torch_ema's ``to``: floating shadow (and stored) copies cast to ``dtype`` where it is
        given (float64 included) and kept in their own dtype where not; ``device`` must be the
        parameters' own device (after ``model.to(device)``). Tensors nothing changes are kept, so
        a ``state_dict()`` taken before goes on following the updates."""
        params = self._params(None)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be float64, float32, bfloat16 or float16, got {dtype}")
        if device is not None and any(p.device != torch.device(device) for p in params):
            raise ValueError(f"the parameters are on {params[0].device}, not {device}: fastema keeps the shadow "
                             f"beside the parameters; move the model first, then call ema.to({device!r})")
        target = None if device is None else torch.device(device)

        def moved(t: torch.Tensor) -> bool:
            return (target is not None and t.device != target) or \
                (dtype is not None and t.is_floating_point() and t.dtype != dtype)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)

        old = self.shadow_params
        if isinstance(self._flat, _PlainShadow):
            self._flat._shadows = [cast(s) for s in old]
        elif any(moved(s) for s in old):
            flat = _shadow(params, dtype=_DTYPE_NAMES[dtype] if dtype is not None else _kept_dtype(old, params))
            with torch.no_grad():
                for new, o in zip(flat.views().values(), old):
                    new.copy_(o)
            self._flat = flat
        stored = self.collected_params
        if stored is not None and any(moved(c) for c in stored):
            self._stored = [cast(c) for c in stored]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": self.shadow_params,
                "collected_params": self.collected_params}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch_ema's format; everything is checked before anything is loaded."""
        state_dict = _copy.copy(state_dict)
        decay = state_dict["decay"]
        _check_decay(decay, "state_dict['decay']")
        num_updates = state_dict["num_updates"]
        if num_updates is not None and not isinstance(num_updates, int):
            raise ValueError("Invalid num_updates")
        if num_updates is not None and num_updates < 0:
            raise ValueError(f"state_dict['num_updates'] is {num_updates}, expected None or an int >= 0 "
                             f"(the updates made): a damaged checkpoint; nothing was loaded")
        shadow = state_dict["shadow_params"]
        if not isinstance(shadow, list) or not all(isinstance(p, torch.Tensor) for p in shadow):
            raise ValueError("shadow_params must be a list of tensors")
        if len(shadow) != len(self._refs):
            raise ValueError(f"shadow_params has {len(shadow)} tensors, this EMA tracks {len(self._refs)}")
        flat, mine = self._flat, self.shadow_params
        params = list(self._flat.sources)        # (kept alive: the weak references hold)
        if any(m.dtype != p.dtype for m, p in zip(mine, params)):
            flat = _shadow(params)               # as torch_ema casts the loaded shadow to the parameters' dtypes
            mine = list(flat.views().values())   # (after to(dtype=...)); made anew: nothing changes if refused
        for i, (s, m) in enumerate(zip(shadow, mine)):
            check_loaded(f"shadow_params[{i}]", s, m)
        collected = state_dict["collected_params"]
        if collected is not None:
            if not isinstance(collected, list) or len(collected) != len(mine) or \
                    not all(isinstance(c, torch.Tensor) for c in collected):
                raise ValueError("collected_params must be None or a list of one tensor per parameter")
            for i, (c, m) in enumerate(zip(collected, mine)):
                check_loaded(f"collected_params[{i}]", c, m)
        with torch.no_grad():
            for s, m in zip(shadow, mine):
                m.copy_(s)
            self._stored = None if collected is None else [c.detach().to(m.device, m.dtype, copy=True)
                                                           for c, m in zip(collected, mine)]
        self._flat = flat
        self.decay, self.num_updates = decay, num_updates

