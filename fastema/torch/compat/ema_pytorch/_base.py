"""What ema-pytorch's classes share here: the errors raised where ema-pytorch asserts, its
per-tensor helpers (``inplace_copy`` / ``inplace_lerp``), the ``initted`` / ``step`` buffers with
their host mirror, the warm-up schedule of ``EMA`` and ``EMAPytree``, and the average step of every
class (one fastema launch per group)."""
from __future__ import annotations

import functools
import typing

import torch
from torch import nn

from .... import schedules as S
from ...._backends import device_of
from ....pairs import PairShadow
from ..._tensors.slots import bump_versions
from .._common import lerp_pairs


class AssertionValueError(AssertionError, ValueError):
    """Raised where ema-pytorch 0.8.3 asserts on an argument's value (``only_online`` with
    ``only_ema``, ``sigma_rel`` with ``gamma``, ...): an ``AssertionError``, as ema-pytorch raises,
    that is also the ``ValueError`` fastema raises for a bad value, so ``except`` either catches it.
    Unlike a bare ``assert``, it is raised under ``python -O`` too, with a message saying the fix."""


class AssertionTypeError(AssertionError, TypeError):
    """Raised where ema-pytorch 0.8.3 asserts on an argument's type (``ema_module_kwargs`` not a
    dict / list / tuple / set, ``param_or_buffer_names_no_ema`` not a set or a list): an
    ``AssertionError`` that is also a ``TypeError``."""


class AssertionRuntimeError(AssertionError, RuntimeError):
    """Raised where ema-pytorch 0.8.3 asserts on the object's state (a routed forward of
    ``EMAModuleWrapper`` before a lazy EMA copy is made): an ``AssertionError`` that is also the
    ``RuntimeError`` fastema raises on every other way to a copy not made yet."""


def _source_for(tgt: torch.Tensor, src: torch.Tensor, auto_move_device: bool, coerce_dtype: bool) -> torch.Tensor:
    """``src``, moved to ``tgt``'s device and cast to its dtype where asked (ema-pytorch's helpers)."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype and src.dtype != tgt.dtype:
        src = src.to(tgt.dtype)
    return src


def _inplace_copy(tgt: torch.Tensor, src: torch.Tensor, *, auto_move_device: bool = False,
                  coerce_dtype: bool = False) -> None:
    """ema-pytorch's per-tensor helper (the ``inplace_copy`` attribute): ``tgt.copy_(src)``, ``src``
    moved to ``tgt``'s device and cast to its dtype first when asked. The classes here do not
    use it: their copies and averages are batched."""
    tgt.copy_(_source_for(tgt, src, auto_move_device, coerce_dtype))


def _inplace_lerp(tgt: torch.Tensor, src: torch.Tensor, weight, *, auto_move_device: bool = False,
                  coerce_dtype: bool = False) -> None:
    """ema-pytorch's per-tensor helper (the ``inplace_lerp`` attribute): ``tgt.lerp_(src, weight)``,
    ``src`` moved / cast first when asked. The classes here average with fastema's kernels."""
    tgt.lerp_(_source_for(tgt, src, auto_move_device, coerce_dtype), weight)


def _device_options(ema, allow_different_devices: bool, coerce_dtype: bool) -> None:
    """ema-pytorch's ``allow_different_devices`` / ``coerce_dtype`` attributes and the helpers
    ``inplace_copy`` / ``inplace_lerp`` bound to them."""
    ema.allow_different_devices = allow_different_devices
    ema.coerce_dtype = coerce_dtype
    ema.inplace_copy = functools.partial(_inplace_copy, auto_move_device=allow_different_devices,
                                         coerce_dtype=coerce_dtype)
    ema.inplace_lerp = functools.partial(_inplace_lerp, auto_move_device=allow_different_devices,
                                         coerce_dtype=coerce_dtype)


def _lerp_towards(targets: list, sources: list, decay: float, cached: PairShadow | None = None) -> None:
    """``targets[i] <- lerp(targets[i], sources[i], 1 - decay)``: one fastema launch per (device,
    dtype) group (``cached``: the pairs' :class:`fastema.pairs.PairShadow` where the caller looked
    it up already), torch's own lerp for the pairs the kernels do not take (``_common.lerp_pairs``)."""
    if cached is not None:
        cached.update(weight=1.0 - decay)
        bump_versions(targets)                  # as ema-pytorch's _foreach_lerp_ does
    else:
        lerp_pairs(targets, sources, 1.0 - decay, names=("ema_tensors", "online_tensors"))


class _Counters(nn.Module):
    """ema-pytorch's ``initted`` / ``step`` buffers with a host mirror: on a GPU the counters are
    read from the device once, and again only after something else wrote or replaced the buffers
    (no ``.item()`` sync per update, where ema-pytorch reads both at every call); on the CPU,
    where a read costs no sync, at every update, as ema-pytorch does (so a write autograd does not
    see, through ``.data`` or NumPy, is followed too)."""

    _read_on_cpu = True          # (an instance's False: a device's road on the CPU, for the tests)

    def _init_counters(self) -> None:
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        self._host: list | None = None           # [step, initted] as Python values: no .item() per update
        self._seen: tuple | None = None          # the buffers (versions, addresses) _host was read from

    def _buffer(self, name: str) -> torch.Tensor:
        return typing.cast(torch.Tensor, self._buffers[name])

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None                        # step / initted changed: read them again once

    def _buffers_now(self) -> tuple | None:
        """Which ``step`` / ``initted`` tensors the module holds, their version counters (host
        integers that every in-place write bumps: ``ema.step.zero_()``, ``initted.fill_(False)``,
        a load) and addresses (``ema.step.data = t``), so a change is seen without reading the
        device; None for inference tensors (read at every update)."""
        buffers = typing.cast("dict[str, torch.Tensor]", self._buffers)   # (the per-update path:
        step, initted = buffers["step"], buffers["initted"]                 # no call per buffer)
        try:
            return step, initted, step._version, initted._version, step.data_ptr(), initted.data_ptr()
        except RuntimeError:                     # inference tensors keep no version: read every time
            return None

    def _counters(self) -> list:
        """``[step, initted]`` as Python values: on the CPU read at every update; on a device once,
        and again only after something else wrote them or replaced them (no ``.item()`` per update)."""
        buffers = typing.cast("dict[str, torch.Tensor]", self._buffers)
        step, initted = buffers["step"], buffers["initted"]
        if self._read_on_cpu and device_of(step) == "cpu" == device_of(initted):   # no sync: every
            self._host, self._seen = [int(step.numpy()), bool(initted.numpy())], None    # update, from memory
            return self._host
        seen = self._buffers_now()
        if self._host is None or seen is None or self._seen is None or seen[2:] != self._seen[2:] or \
                seen[0] is not self._seen[0] or seen[1] is not self._seen[1]:
            self._host = [int(self._buffer("step")), bool(self._buffer("initted"))]
            self._seen = seen
        return self._host

    def _wrote(self) -> None:
        """After this module's own write to a buffer: its new version is already in ``_host``."""
        if self._seen is not None:
            self._seen = self._buffers_now()

    def _advance(self) -> int:
        """``step += 1`` (device buffer and host mirror); returns the step before."""
        host = self._counters()
        before = host[0]
        host[0] += 1
        self._buffer("step").add_(1)
        self._wrote()
        return before

    def _mark_initted(self) -> None:
        self._counters()[1] = True
        self._buffer("initted").fill_(True)
        self._wrote()


class _Warmup(_Counters):
    """ema-pytorch's schedule of ``EMA`` and ``EMAPytree``: the first ``update()`` copies, each
    ``update_every``-th one copies until ``update_after_step`` and averages after it, with the
    warm-up decay of :meth:`get_current_decay`; ``beta == 1`` freezes the average."""

    def _init_warmup(self, beta: float, update_after_step: int, update_every: int, inv_gamma: float, power: float,
                     min_value: float) -> None:
        S.check_power_args(beta, min_value, inv_gamma, power, update_after_step,
                           names=("beta", "min_value", "inv_gamma", "power", "update_after_step"))
        S.check_count("update_every", update_every, 1)
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.update_every, self.update_after_step = update_every, update_after_step
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value

    def get_current_decay(self) -> float:
        """ema-pytorch's warm-up at the current step: 0 until ``update_after_step``, then
        ``clamp(1 - (1 + epoch / inv_gamma) ** -power, min_value, beta)``."""
        return self._decay_at(self._counters()[0])

    def _decay_at(self, step: int) -> float:
        """:meth:`get_current_decay` once the step counter reads ``step``."""
        epoch = max(step - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        # in float32 on host scalars, as ema-pytorch computes it on its step buffer: the same decay
        value = 1 - (1 + torch.tensor(float(epoch)) / self.inv_gamma) ** -self.power
        return float(value.clamp(min=self.min_value, max=self.beta).numpy())     # a CPU scalar of ours

    def _due_decay(self, step: int) -> float:
        """The decay of the average that ``update()`` makes at ``step`` (the count before it),
        refused before the step counts where the settings, changed after construction, give
        none in [0, 1]."""
        decay = self._decay_at(step + 1)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"the warm-up decay at step {step + 1} is {decay} (beta={self.beta!r}, "
                             f"inv_gamma={self.inv_gamma!r}, power={self.power!r}, min_value={self.min_value!r}): "
                             f"set inv_gamma and power to finite floats > 0, beta and min_value to floats in [0, 1]; "
                             f"the update was not made and the step did not count")
        return decay

    def _phase(self) -> tuple[int, str | None]:
        """The step count before this ``update()`` and what the update does at it: ``"init"`` (not
        initted yet: copy, then mark initted), ``"copy"`` (a due update up to ``update_after_step``),
        ``"average"`` (a due update after it), None (not due)."""
        step, initted = self._counters()
        if not initted:
            return step, "init"
        if step % self.update_every != 0:
            return step, None
        return step, "copy" if step <= self.update_after_step else "average"
