"""PyTorch model EMA over fastema's flat kernels.

``fastema.torch.EMA(model, decay)`` keeps averaged copies of a model's weights in
flat buffers (one per device and dtype) and updates all of them with one kernel
launch per buffer, with no host sync. Drop-in classes for torch_ema, timm and
``torch.optim.swa_utils`` live in :mod:`fastema.torch.compat`.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import operator
import os
import warnings
import weakref
from typing import ContextManager, Sequence

import torch
from torch import nn

from .._backends.torch import refuse_foreign as _refuse_foreign_torch
from . import _compile, _sharded
from .. import posthoc, schedules
from .._average import ModelSwap, check_header
from .._files import atomic_write as _atomic_write
from .._bridge import PlanReader, check_shadow_settings, make_plan
from .._device_plan import DevicePlan
from ..flat import FlatShadow, WindowShadow
from ..ops import resolve_weights, stochastic_rounding

__all__ = ["EMA", "PostHocEMA", "WindowAverage", "normalize_name", "registration_hooks"]

FORMAT = "fastema.torch.EMA"
VERSION = 2                                  # 2: sharded averages saved as DTensors; reads version 1 too
_PREFIXES = ("module.", "_orig_mod.")        # DistributedDataParallel, torch.compile


def normalize_name(name: str) -> str:
    """Strip the wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of torch.compile)."""
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p):], True
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None)
                                                      if type(model).__name__ in ("DistributedDataParallel",
                                                                                  "DataParallel",
                                                                                  "DeepSpeedEngine") else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# Models are watched for parameters, buffers or submodules registered after the EMA
# was made (load_state_dict(assign=True), module.weight = nn.Parameter(...),
# model[0] = nn.Linear(...)): torch calls these global hooks, which mark the EMA
# stale; update() then re-reads the model. The per-step cost is one flag check.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_HOOKS: list = []                 # handles of the process-wide registration hooks, while installed
_HOOKS_WANTED = True


def registration_hooks(enabled: bool) -> None:
    """Install (``True``, the default) or remove (``False``) fastema's process-wide hooks.

    fastema registers three global torch hooks (``register_module_parameter_registration_hook``
    and the buffer and module twins) at the first model average; each call only sets a flag
    on the averages watching that module. Without them an average still follows tensors
    and submodules replaced in the model (at every update it also checks each module on the way
    to a tracked tensor), but an average made before ``DDP(model)`` is no longer restarted from
    rank 0's weights: make it after the wrap.
    """
    global _HOOKS_WANTED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    _HOOKS_WANTED = enabled
    if enabled:
        _install_hooks()
    else:
        while _HOOKS:
            _HOOKS.pop().remove()


def _install_hooks() -> None:
    if _HOOKS or not _HOOKS_WANTED:
        return
    from torch.nn.modules import module as M

    _HOOKS.extend([M.register_module_parameter_registration_hook(_on_registration),
                   M.register_module_buffer_registration_hook(_on_registration),
                   M.register_module_module_registration_hook(_on_registration)])


def _on_registration(module, name, value):
    emas = _WATCHED.get(module)
    if emas:
        for ema in emas:
            ema._stale = True
    if name == "module" and isinstance(value, nn.Module) and type(module).__name__ == "DistributedDataParallel":
        _wrapped_in_ddp(value)
    return None


def _wrapped_in_ddp(model: nn.Module) -> None:
    # DistributedDataParallel(model) broadcasts rank 0's weights into the model in place right
    # after this registration. An average made before that holds this rank's own initial
    # weights, so the ranks' averages would differ for good: start them over from the
    # broadcast weights at the model's first forward (DDP's forward calls it before any
    # training), or at the next read if that comes first. After updates were made, the
    # averages are kept and a warning says the ranks may differ.
    fresh = []
    for m in model.modules():
        for ema in list(_WATCHED.get(m, ())):
            if ema in fresh:
                continue
            if ema._fresh():
                ema._resync = True
                fresh.append(ema)
            else:
                warnings.warn(f"{type(ema).__name__} was made and updated before the model was wrapped in "
                              f"DistributedDataParallel, which replaced this rank's weights with rank 0's; the "
                              f"ranks' averages may differ. Make the average after DDP(model).", RuntimeWarning,
                              stacklevel=4)
    if not fresh:
        return
    handle = []

    def restart(module, args):
        handle.pop().remove()
        for ema in fresh:
            if ema._resync:
                ema._resync = False
                ema._restart(module)

    handle.append(model.register_forward_pre_hook(restart))


def _watch(model: nn.Module, ema) -> None:
    _install_hooks()
    for m in model.modules():
        _WATCHED.setdefault(m, weakref.WeakSet()).add(ema)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _patterns(what: str, value) -> tuple[str, ...]:
    """``exclude=`` / ``copy=`` as a tuple of fnmatch patterns; a single str is one pattern."""
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a list of name patterns, e.g. {what}=['head.*'], "
                        f"got {type(value).__name__}") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must hold name patterns (str), got {bad[0]!r}")
    return patterns


def _storage_key(t: torch.Tensor):
    """Where a tensor's elements are: equal keys mean the same memory in the same layout (a tied
    or aliased tensor under another name). None for a tensor with no memory to compare."""
    if not t.numel() or t.device.type == "meta" or type(t) not in (torch.Tensor, nn.Parameter):
        return None
    return t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride()


def _local_key(t: torch.Tensor):
    """:func:`_storage_key` of the memory a (possibly sharded) tensor's rank holds."""
    return _storage_key(_sharded.local_tensor(t) if _sharded.is_sharded(t) else t)


def _device_name(t: torch.Tensor) -> str:
    return "cpu" if t.device.type == "cpu" else f"{t.device.type}:{t.device.index}"


def _match_names(saved: dict, wanted: Sequence[str]) -> tuple[dict, list[str]]:
    """``wanted name -> saved value``: exact names first, then names with DDP / torch.compile
    prefixes stripped (checkpoints of a wrapped model). Returns ``(matched, unused saved keys)``."""
    matched = {n: saved[n] for n in wanted if n in saved}
    unused = [k for k in saved if k not in matched]
    for k in list(unused):
        n = normalize_name(k)
        if n != k and n in wanted and n not in matched:
            matched[n] = saved[k]
            unused.remove(k)
    return matched, unused


class _ModelAverage:
    """What every model-level average shares: which tensors are averaged or copied, the flat
    shadow, following a changed model, swap / copy-out / export, and checkpoints. Subclasses
    make the shadow and define ``update()``, ``_restart()`` and their extra checkpoint state."""

    _format = ""

    def __init__(self, model: nn.Module, make_shadow, *, buffers: str, exclude: Sequence[str],
                 copy: Sequence[str]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers must be 'copy', 'average' or 'ignore', got {buffers!r}")
        self.buffers = buffers
        self.exclude, self.copy_patterns = _patterns("exclude", exclude), _patterns("copy", copy)
        self.model = model
        self._int_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (model's, copy)
        self._fsdp = _sharded.fsdp_modules(_unwrap(model))   # FSDP2 modules, resharded before any read
        self._engine = model if type(model).__name__ == "DeepSpeedEngine" else None
        self._specs: dict[str, _sharded.Spec] = {}          # name -> layout of a DTensor's local shard
        _sharded.reshard(self._fsdp)
        averaged, copied = self._select(_unwrap(model))
        if not averaged:
            raise ValueError("the model has no floating-point parameters to average "
                             "(check exclude= and copy=)")
        self._names = (list(averaged), list(copied))
        self._address = _sharded.local_address if self._specs else _DATA_PTR
        inner = _unwrap(model)
        self._zero3 = [p for p in inner.parameters() if _sharded.is_zero3(p)]
        self._avg = make_shadow(averaged)
        self._copy = FlatShadow(copied, dtype="same") if copied else None
        if self._copy is not None:                     # no memory in both groups (a buffer viewing a weight)
            _disjoint_groups(self._avg, self._copy)
        self.cadence = self._cadence()          # counts update() calls
        self._stale = False
        self._resync = False                    # the model was wrapped in DDP after construction
        self._backup = None                     # raw weights during a lossy swap (float16 models)
        self._swap = ModelSwap(self._exchange, "the EMA weights are swapped into the model (the shadow holds the "
                                               "raw weights then); call it outside average_parameters() or after swap()")
        self._slots = self._owner_slots()
        self._addresses = self._addresses_now()
        self._handle = _compile.register(self)  # what the compiled operators find this average by
        self._ops = self._op_lists()
        _watch(_unwrap(model), self)

    # ------------------------------------------------------------ which tensors

    def _select(self, model):
        averaged, copied = {}, {}
        wrapped = [n for n, _ in model.named_parameters() if "_fsdp_wrapped_module." in n]
        if wrapped:
            raise TypeError(f"the model is wrapped by FSDP1 (FullyShardedDataParallel; {wrapped[0]!r}): its "
                            f"parameters are rank-dependent pieces of flat parameters. Use FSDP2 "
                            f"(torch.distributed.fsdp.fully_shard), or make the EMA of an unwrapped copy of "
                            f"the model. Nothing was written.")
        seen: dict = {}                         # storage key -> first name: a tie or alias is averaged once
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                if _matches(name, self.exclude):
                    continue
                if _sharded.is_sharded(t):     # FSDP2 / tensor parallel / ZeRO-3: this rank's local shard
                    t, self._specs[name] = _sharded.local(t, f"{kind} {name!r}")
                _refuse_foreign_torch(t, f"{kind} {name!r}")   # lazy, ZeRO-3...: by name, first
                key = _storage_key(t)
                if key is not None and key in seen:
                    continue                    # the same memory under another name: exported under both
                if key is not None:
                    seen[key] = name
                if t.is_complex():
                    if not _matches(name, self.copy_patterns):
                        raise TypeError(f"{kind} {name!r} is complex ({t.dtype}): fastema averages real "
                                        f"floating tensors; list it in copy= to carry its latest value, or "
                                        f"exclude= it")
                    self._int_buffers[name] = (t, t.detach().clone())
                elif not t.is_floating_point():   # integer tensors travel as copies
                    self._int_buffers[name] = (t, t.detach().clone())
                elif kind == "buffer" and self.buffers == "ignore":
                    continue
                elif _matches(name, self.copy_patterns) or (kind == "buffer" and self.buffers == "copy"):
                    copied[name] = t
                else:
                    averaged[name] = t
        return averaged, copied

    def _owner_slots(self):
        """(the owning module's _parameters or _buffers dict, key, tensor) of every tracked tensor, for
        the per-step check that the model still holds the tensors the shadow reads (H3)."""
        inner = _unwrap(self.model)
        params = {n for n, _ in inner.named_parameters()}
        named = dict(inner.named_parameters())
        named.update(inner.named_buffers())
        slots, paths = [], {}
        for name in self._names[0] + self._names[1] + list(self._int_buffers):
            prefix, _, key = name.rpartition(".")
            owner = inner.get_submodule(prefix) if prefix else inner
            table = owner._parameters if name in params else owner._buffers
            slots.append((table, key, named[name]))
            parent = inner
            for part in prefix.split(".") if prefix else ():   # the modules on the way (hooks off)
                child = parent._modules[part]
                paths[(id(parent), part)] = (parent._modules, part, child)
                parent = child
        columns = lambda rows: tuple(zip(*rows)) if rows else ((), (), ())  # noqa: E731
        return columns(slots), columns(list(paths.values()))

    def _addresses_now(self) -> list | None:
        """The address of the tensor each tracked slot of the model holds now (one dict lookup and one
        data_ptr() per tensor), or None when a slot is empty. Tensors written into _parameters
        without torch's registration hooks (model.to("meta"), overwrite-on-conversion, direct writes)
        and storage moved under a tensor both show here. With the hooks removed
        (registration_hooks(False)) the modules on the way are checked too."""
        tables, keys, _ = self._slots[0]
        if not _HOOKS:
            mods, names, held = self._slots[1]
            if not all(map(operator.is_, map(dict.get, mods, names), held)):
                return None
        try:
            return list(map(self._address, map(dict.get, tables, keys)))
        except TypeError:                         # a slot is empty: the tensor was removed
            return None

    def _model_changed(self) -> bool:
        return self._stale or self._addresses_now() != self._addresses

    def _follow(self) -> bool:
        """Before reading or writing the model: follow re-registered or moved tensors (or refuse before
        anything is written), and start over from the model after a DDP wrap (see _on_registration).
        True when the shadows' addresses are known to be current (nothing moved, or just followed)."""
        changed = self._model_changed()
        if changed and self._fsdp:                # a forward with no backward left unsharded copies
            _sharded.reshard(self._fsdp)
            changed = self._model_changed()
        if changed:
            self._rebind()
            self._avg.refresh()                  # storage moved under a tensor the shadow already holds
            if self._copy is not None:
                self._copy.refresh()
            self._addresses = self._addresses_now()
        if self._resync:
            self._resync = False
            self._restart()
        return True

    def _restart(self, model: nn.Module | None = None) -> None:
        """Start the averages over from the model's current weights (the model was wrapped in DDP,
        which broadcast rank 0's weights into it)."""
        raise NotImplementedError

    def _fresh(self) -> bool:
        """True while nothing but the construction went into the averages (a restart loses nothing)."""
        return self.calls == 0 and not self.swapped

    def _copy_buffers(self, flags: dict | None = None, current: bool = False) -> None:
        if self._copy is not None:
            if current:                             # addresses checked by _follow() in this update
                self._copy.copy_from_sources_checked(flags)
            else:
                self._copy.copy_from_sources(skip_if=flags)
        if not self._int_buffers:
            return
        if not flags:                           # one launch for every integer buffer (BatchNorm counters)
            srcs, dsts = zip(*self._int_buffers.values())
            torch._foreach_copy_(list(dsts), list(srcs))
            return
        for src, dst in self._int_buffers.values():
            flag = flags.get(_device_name(dst))
            if flag is None:
                dst.copy_(src)
            else:                               # the guard: keep the old value on a diverged step, no sync
                dst.copy_(torch.where(flag[0].to(dst.device) != 0, dst, src))

    def _scan(self, flags: dict | None = None) -> dict:
        """Non-finite flags over every averaged and copied floating tensor (device values, no sync),
        added to ``flags`` when given."""
        flags = self._avg.scan_nonfinite(flags)
        if self._copy is not None:
            flags = self._copy.scan_nonfinite(flags)
        return flags

    def _cadence(self) -> schedules.Cadence:
        raise NotImplementedError

    @property
    def calls(self) -> int:
        """``update()`` calls so far, skipped ones included."""
        return self.cadence.calls

    def _begin(self, due: bool) -> bool:
        """Checks before an update; returns ``due`` (this call updates). The caller records the call
        once it has been made, so a refused update changes nothing."""
        self._not_swapped("update()")
        if due:
            self._follow()                      # every group, or a refusal before anything is written
        return due

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    def _rebind(self) -> None:
        # A parameter or buffer was re-registered (load_state_dict(assign=True), ...):
        # follow the new tensors if they fit the shadow, else refuse before writing anything.
        inner = _unwrap(self.model)
        named = dict(inner.named_parameters())
        named.update(inner.named_buffers())
        wanted = self._names[0] + self._names[1] + list(self._int_buffers)
        missing = [n for n in wanted if n not in named]
        if missing:
            raise ValueError(f"the model no longer has {missing[:5]} (it changed after EMA(model)); "
                             f"make a new EMA for the new model. Nothing was updated.")
        specs = {}
        for n in wanted:                          # sharded parameters: their local shards
            if _sharded.is_sharded(named[n]):
                named[n], specs[n] = _sharded.local(named[n], repr(n))
        moved = [n for n in set(specs) | set(self._specs) if n not in specs or n not in self._specs or
                 specs[n].shape != self._specs[n].shape or specs[n].placements != self._specs[n].placements]
        if moved:
            raise ValueError(f"{moved[0]!r} was re-sharded or un-sharded after the average was made (it is laid out "
                             f"over the ranks differently now); make a new average of the model as it is, or "
                             f"load this one's checkpoint into it. Nothing was updated.")
        for n, (_, copy_) in self._int_buffers.items():
            if named[n].shape != copy_.shape or named[n].dtype != copy_.dtype:
                raise ValueError(f"{n!r} changed from {copy_.dtype} {tuple(copy_.shape)} to {named[n].dtype} "
                                 f"{tuple(named[n].shape)}; make a new EMA. Nothing was updated.")
        old = self._avg.sources
        self._avg.rebind({n: named[n] for n in self._names[0]})
        if self._copy is not None:
            try:
                self._copy.rebind({n: named[n] for n in self._names[1]})
                _disjoint_groups(self._avg, self._copy)
            except Exception:
                self._avg.rebind(old)
                raise
        for n, (_, copy_) in list(self._int_buffers.items()):
            self._int_buffers[n] = (named[n], copy_)
        self._specs = specs
        self._ops = self._op_lists()
        self._slots = self._owner_slots()          # _follow() records the addresses once all groups pass
        self._stale = False
        _watch(inner, self)                      # new submodules are watched too

    # ------------------------------------------------------------ torch.compile

    def _op_lists(self) -> dict:
        """``op -> (tensors it writes, tensors it reads)`` for the compiled operators (``_compile``):
        every tensor an eager call touches, so functionalization sees each write. Made when the
        tensors change (construction, rebind), never while tracing."""
        groups = [g for shadow in (self._avg, self._copy) if shadow is not None for g in shadow.layout.groups]
        shadows = [g.buffer for g in groups] + [ring for _, ring, _ in getattr(self._avg, "_rings", ())]
        sources = list(self._avg.sources) + (list(self._copy.sources) if self._copy is not None else [])
        ints = list(self._int_buffers.values())
        return {"update": (shadows + [d for _, d in ints] + self._plan_tensors(), sources + [s for s, _ in ints]),
                "swap": (shadows + sources, []),
                "copy_to": (sources, shadows)}

    def _plan_tensors(self) -> list:
        return []

    def _read_from(self, read: list):
        """Read the sources from ``read`` (in :meth:`_op_lists` order) until the returned function
        is called: a compiled operator handed other tensors than the model's own."""
        n_avg = len(self._avg.sources)
        n_copy = len(self._copy.sources) if self._copy is not None else 0
        old = (list(self._avg.sources), list(self._copy.sources) if self._copy is not None else None,
               dict(self._int_buffers))
        self._avg.retarget(read[:n_avg])
        if self._copy is not None:
            self._copy.retarget(read[n_avg:n_avg + n_copy])
        for (name, (_, dst)), src in zip(list(self._int_buffers.items()), read[n_avg + n_copy:]):
            self._int_buffers[name] = (src, dst)

        def restore():
            self._avg.retarget(old[0])
            if self._copy is not None:
                self._copy.retarget(old[1])
            self._int_buffers.update(old[2])

        return restore

    # ------------------------------------------------------------ swap and export

    def swap(self, row: int = 0) -> None:
        """Put average ``row`` into the model in place; call again to put the raw weights back.

        In place with no model-sized temporary when the shadow keeps an exact swap
        (equal dtypes, or float32 shadow and bfloat16 weights). float16 weights with a
        float32 shadow are backed up once instead (a float16-sized buffer), so the
        float32 average is never rounded. Every tensor is checked before the first one is
        written, so a refused swap leaves the model and the averages as they were.
        """
        if torch.compiler.is_compiling():
            torch.ops.fastema.swap_(self._ops["swap"][0], self._handle, row)
            return
        self._swap.swap(row)

    def _exchange(self, row: int, swapping_in: bool) -> None:
        self._settle()
        if swapping_in:
            self._avg.check_row(row)
            self._follow()
        lossy = self._lossy_swap()
        if not lossy:
            self._avg.swap_modes()
        if self._copy is not None:                     # the averaged group checks itself before writing
            self._copy.refresh()
        if lossy:
            if swapping_in:
                if self._backup is None:              # offloaded: the backup is in host memory
                    self._backup = self._avg.backup() if getattr(self._avg, "offloaded", False) else \
                        FlatShadow(dict(zip(self._avg.names, self._avg.sources)), dtype="same")
                else:
                    self._backup.rebind(dict(zip(self._avg.names, self._avg.sources)))
                    self._backup.copy_from_sources()
                self._avg.copy_to_sources(row)
            else:
                self._backup.copy_to_sources()
        else:
            self._avg.swap(row)
        if self._copy is not None:
            try:
                self._copy.swap()
            except BaseException:                      # put the averaged group back as it was
                if lossy:
                    self._backup.copy_to_sources() if swapping_in else self._avg.copy_to_sources(row)
                else:
                    self._avg.swap(row)
                raise

    def _settle(self) -> None:
        """Before the model's tensors are written (swap, copy-out): no gathered copy may outlive the
        write. FSDP2: a forward with no backward (evaluation) leaves unsharded copies on the modules,
        which the next forward would use as they are (the EMA weights after a swap back): reshard.
        ZeRO-3: persistent parameters stay gathered: release them (or refuse)."""
        _sharded.reshard(self._fsdp)
        if self._fsdp and torch.cuda.is_available() and any(t.device.type == "cpu" for t in self._avg.sources):
            torch.cuda.current_stream().synchronize()   # CPUOffloadPolicy: FSDP2 copies shards in non_blocking
        if self._zero3:
            _sharded.release_zero3(self._zero3, self._engine)

    def _not_swapped(self, what: str) -> None:
        self._swap.refuse(what)

    def _lossy_swap(self) -> bool:
        if getattr(self._avg, "offloaded", False):     # the shadow is in host memory: back the weights up
            return True
        return any(g["shadow_dtype"] != g["src_dtype"] and not (g["shadow_dtype"] == "float32" and
                                                                 g["src_dtype"] == "bfloat16")
                   for g in self._avg.groups)

    def average_parameters(self, row: int = 0) -> ContextManager[nn.Module]:
        """``with ema.average_parameters(): evaluate(model)``: EMA weights in, raw weights back on exit
        (also when the block raises). Re-entrant: inside a block (or after ``swap()``) of the same
        row it leaves the weights as they are, and the outer one swaps back. Yields the model."""
        return self._swap.block(row, self.model)

    def copy_to(self, model: nn.Module | None = None, row: int = 0) -> None:
        """Write average ``row`` into ``model`` (default: the tracked model), e.g. at the end of training.

        Another model must have the same names, shapes and dtypes (DDP / torch.compile wrappers
        are looked through); anything else raises before a tensor is written.
        """
        if (model is None or model is self.model) and torch.compiler.is_compiling():
            written, read = self._ops["copy_to"]
            torch.ops.fastema.copy_to_(written, read, self._handle, row)
            return
        if model is None or model is self.model:
            self._eager_copy_to(row)
            return
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        target = _unwrap(model)
        if self.sharded and not any(map(_sharded.is_dtensor, target.parameters())):
            state = self.full_state_dict(row)          # sharded average into a plain model: collective
        else:
            state = self.averaged_state_dict(row)
        theirs = target.state_dict(keep_vars=True)
        missing = [k for k in theirs if k not in state]
        extra = [k for k in state if k not in theirs]
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(theirs[k].shape)}" for k in state
                 if k in theirs and tuple(state[k].shape) != tuple(theirs[k].shape)]
        if missing or extra or wrong:
            raise ValueError(f"copy_to: the model does not match the averaged one (missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, shapes {wrong[:5]}); nothing was copied")
        target.load_state_dict(state, strict=True)

    def _eager_copy_to(self, row: int) -> None:
        self._not_swapped("copy_to()")
        self._settle()
        self._follow()
        if self._copy is not None:                     # the averaged group checks itself before writing
            self._copy.check_sources()
        self._avg.copy_to_sources(row)
        if self._copy is not None:
            self._copy.copy_to_sources()

    def averaged_state_dict(self, row: int = 0) -> dict[str, torch.Tensor]:
        """A model-style state dict of the averaged weights (the model's dtypes, names and layouts;
        DDP / torch.compile prefixes stripped): what ``model.load_state_dict`` takes. Every name
        of a tied or aliased tensor gets its average."""
        self._not_swapped("averaged_state_dict()")
        out = {}
        for name, t, source, value in self._state_entries(row):
            if source is None:
                out[name] = t.detach().clone()             # excluded: the model's own value
            elif source in self._specs:                    # a sharded average: this rank's part, as a DTensor
                out[name] = _sharded.wrap(value().to(t.dtype, copy=True), self._specs[source])
            else:
                out[name] = value().to(t.dtype, copy=True)
        return out

    def _state_entries(self, row: int) -> list:
        """``(name, model tensor, source, value)`` for every entry of the model's state dict:
        ``source`` the name this average tracks it under (None: not tracked), ``value()`` its
        average of ``row`` (averaged), its copy (copied buffers) or None. Checks the sources."""
        self._avg.check_row(row)
        self._follow()
        self._avg.check_sources()                       # a same-address reshape or cast is named here
        if self._copy is not None:
            self._copy.check_sources()
        tracked = {}
        for n in self._avg.names:
            tracked[n] = lambda n=n: self._avg.view(n, row)
        for n in (self._copy.names if self._copy is not None else []):
            tracked[n] = lambda n=n: self._copy.view(n)
        for n in self._int_buffers:
            tracked[n] = lambda n=n: self._int_buffers[n][1]
        inner = _unwrap(self.model)
        own = dict(inner.named_parameters(remove_duplicate=False))
        own.update(inner.named_buffers(remove_duplicate=False))
        by_key = {_local_key(own[n]): n for n in tracked if n in own and _local_key(own[n]) is not None}
        out = []
        for name, t in inner.state_dict(keep_vars=True).items():
            source = name if name in tracked else by_key.get(_local_key(t))
            out.append((name, t, source, tracked.get(source)))
        return out

    def join(self) -> None:
        """Wait for the updates still running (``offload="cpu"``: the host folds) and re-raise an
        error of one; a no-op otherwise. Every read of the averages does it first."""
        join = getattr(self._avg, "join", None)
        if join is not None:
            join()

    @property
    def sharded(self) -> bool:
        """True when a tracked tensor is a DTensor (FSDP2, tensor parallel, HSDP): each rank averages
        its local shards only, and :meth:`averaged_state_dict` / :meth:`state_dict` hold DTensors."""
        return bool(self._specs)

    def full_state_dict(self, row: int = 0, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`averaged_state_dict` with full tensors: what an unsharded model's ``load_state_dict``
        takes. On a sharded average this is a collective (every rank must call it): each tensor is
        gathered in turn (``DTensor.full_tensor()``), so at most one full tensor is in flight beyond what
        is kept. ``rank0_only=True``: only global rank 0 keeps them, the other ranks get ``{}``."""
        if not isinstance(rank0_only, bool):
            raise TypeError(f"rank0_only must be True or False, got {rank0_only!r}")
        keep = not rank0_only or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        out = {}
        own = dict(_unwrap(self.model).named_parameters(remove_duplicate=False))
        for name, value in self.averaged_state_dict(row).items():
            value = _sharded.full(value)
            if hasattr(own.get(name), "ds_shape"):
                value = value.view(own[name].ds_shape)         # ZeRO-3 partitions gather flat
            if keep:
                out[name] = value
        return out

    def module(self, row: int = 0) -> nn.Module:
        """A standalone copy of the model holding the averaged weights (for export or another process)."""
        if self.sharded:
            raise TypeError("module() copies the whole model on every rank, and this average is sharded (FSDP2 / "
                            "tensor parallel): use full_state_dict(rank0_only=True) and load it into a plain "
                            "model, or copy_to(plain_model), or save(path)")
        state = self.averaged_state_dict(row)
        clone = copy.deepcopy(_unwrap(self.model))
        clone.load_state_dict(state)
        return clone

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: averages keyed by name, counters, settings.

        The tensors are views of the flat buffers (as ``nn.Module.state_dict()`` returns views: no
        model-sized copy). On a sharded average they are DTensors over those views, laid out as
        the parameters are (``(rows, *shape)``, the parameter's shard dims moved up by one): the
        average is a ``torch.distributed.checkpoint`` ``Stateful``, and ``dcp.save({"ema": ema})`` /
        ``dcp.load({"ema": ema})`` read and fill the shadow in place, on any world size or mesh.
        """
        self._not_swapped("state_dict()")
        if self._resync:                                 # a DDP wrap since construction: start over first
            self._follow()
        return {
            "format": self._format, "version": VERSION, "calls": self.calls, **self._extra_state(),
            "layout": "sharded" if self.sharded else "replicated",     # informational: loading never reads it
            "averaged": {n: self._global(n, self._avg.state_view(n), True) for n in self._avg.names},
            "copied": {n: self._global(n, self._copy.view(n)) for n in self._copy.names}
            if self._copy is not None else {},
            "int_buffers": {n: self._global(n, v[1]) for n, v in self._int_buffers.items()},
        }

    def _global(self, name: str, view: torch.Tensor, stacked: bool = False):
        """A shadow view as the checkpoint holds it: as it is, or a DTensor for a sharded tensor
        (``stacked``: the view is a ``(rows, *shape)`` stack of the tensor's averages)."""
        spec = self._specs.get(name)
        if spec is None:
            return view
        return _sharded.wrap(view, _sharded.rows_spec(spec, view.shape[0]) if stacked else spec)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict`: checks everything first, changes nothing if anything is off."""
        kind = type(self).__name__
        check_header(state, self._format, (1, VERSION), f"a model checkpoint goes to model.load_state_dict, a "
                                                        f"{kind} checkpoint ({kind}.state_dict()) here")
        self._not_swapped("load_state_dict()")
        problems = []
        loads = []                                   # (destination view, value), written only if all is well
        copied_names = self._copy.names if self._copy else []
        groups = (("averaged", self._avg.names, lambda n: self._avg.state_view(n), True, True),
                  ("copied", copied_names, lambda n: self._copy.view(n), False, False),
                  ("int_buffers", list(self._int_buffers), lambda n: self._int_buffers[n][1], False, False))
        for key, names, view_of, finite, stacked in groups:
            saved = state.get(key, {})
            if not isinstance(saved, dict):
                problems.append(f"{key} is a {type(saved).__name__}, expected a dict of tensors")
                continue
            matched, unused = _match_names(saved, names)
            missing = [n for n in names if n not in matched]
            if missing:
                problems.append(f"{key} missing {missing[:5]}")
            if unused and strict:
                problems.append(f"{key} unexpected {unused[:5]}")
            for n, value in matched.items():
                dst = view_of(n)
                shape = self._global(n, dst, stacked).shape
                if not isinstance(value, torch.Tensor):
                    problems.append(f"{key} {n!r} is a {type(value).__name__}, expected a tensor")
                    continue
                spec = self._specs.get(n)
                # ZeRO-3 averages are saved flat, (rows, numel); either form loads into either layout
                flat = stacked and not _sharded.is_dtensor(value) and value.dim() >= 1 and len(shape) >= 1 and (
                    (spec is not None and spec.view_shape is not None and
                     tuple(value.shape) == (shape[0], *spec.view_shape)) or
                    (spec is None and tuple(value.shape) == (shape[0], dst[0].numel()) and len(shape) != 2))
                if tuple(value.shape) != tuple(shape) and not flat:
                    problems.append(f"{key} {n!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
                    continue
                value = self._local_part(n, value, dst, stacked)
                if spec is not None and spec.valid is not None:
                    dst = dst[..., :spec.valid]                # a ZeRO-3 partition: its padding stays
                if value.device.type == "meta":
                    problems.append(f"{key} {n!r} is a meta tensor (no values)")
                elif value.is_floating_point() != dst.is_floating_point() or value.is_complex() != dst.is_complex():
                    problems.append(f"{key} {n!r} has dtype {value.dtype}, expected {dst.dtype}")
                elif finite and not bool(torch.isfinite(value).all()):
                    problems.append(f"{key} {n!r} holds inf or NaN")
                else:
                    loads.append((dst, value))
        calls = state.get("calls")
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            problems.append(f"calls must be an int >= 0, got {calls!r}")
        self._check_extra(state, problems)
        if problems:
            raise ValueError(f"{kind} checkpoint does not match this model: " + "; ".join(problems) +
                             ". Nothing was loaded.")
        with torch.no_grad():
            for dst, value in loads:
                if not (dst.data_ptr() == value.data_ptr() and dst.dtype == value.dtype and
                        dst.stride() == value.stride()):     # dcp.load filled the shadow itself
                    dst.copy_(value)
        self.cadence.calls = int(state["calls"])
        self._load_extra(state)

    def _local_part(self, name: str, value: torch.Tensor, dst: torch.Tensor, stacked: bool) -> torch.Tensor:
        """What this rank keeps of a checkpoint tensor: its shard of a sharded tensor (from a full
        tensor, or a DTensor of any layout: a collective when the layouts differ); a full plain tensor
        from a DTensor for an unsharded one (a collective)."""
        spec = self._specs.get(name)
        if spec is None:
            return _sharded.full(value).reshape(dst.shape)     # a flat ZeRO-3 entry takes the shape
        return _sharded.piece_of(value, _sharded.rows_spec(spec, dst.shape[0]) if stacked else spec)

    def _extra_state(self) -> dict:
        return {}

    def _check_extra(self, state: dict, problems: list) -> None:
        pass

    def _load_extra(self, state: dict) -> None:
        pass

    def save(self, path: str | os.PathLike, row: int = 0) -> None:
        """Write the averaged weights as a model checkpoint, atomically (temporary file, then rename).

        ``model.load_state_dict(torch.load(path))`` loads it; a ``.safetensors`` path is
        written with safetensors (which must be installed). The file gets the mode
        ``torch.save`` would give it (0666 less the umask); temporary files left by a save
        that was killed are removed by the next save to the same path. On a sharded average
        it is a collective: every rank gathers the full tensors one at a time (see
        :meth:`full_state_dict`) and global rank 0 writes the file.
        """
        path = os.fspath(path)
        if self.sharded:                   # collective: every rank gathers, rank 0 writes
            weights = self.full_state_dict(row, rank0_only=True)
            if torch.distributed.get_rank() != 0:
                return
        else:
            weights = self.averaged_state_dict(row)
        weights = {k: v.detach().contiguous() for k, v in weights.items()}
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import save as to_bytes
            except ImportError:
                raise ImportError("saving .safetensors needs the safetensors package "
                                  "(pip install safetensors)") from None
            data = to_bytes({k: v.cpu() for k, v in weights.items()})
            _atomic_write(path, lambda f: f.write(data))
        else:
            _atomic_write(path, lambda f: torch.save(weights, f))    # streamed: no model-sized copy in memory


_DATA_PTR = torch.Tensor.data_ptr
def _disjoint_groups(a: FlatShadow, b: FlatShadow) -> None:
    from .._backends import describe, disjoint

    bufs = [describe(t, n) for n, t in zip(a.names, a.sources)] + \
           [describe(t, n) for n, t in zip(b.names, b.sources)]
    disjoint(bufs, [repr(n) for n in a.names] + [repr(n) for n in b.names])


class EMA(PlanReader, _ModelAverage):
    """Exponential moving average of a PyTorch model's weights.

    ``shadow <- decay * shadow + (1 - decay) * weight`` after every ``update()``, for
    every floating parameter (and buffer, if asked), in one kernel launch per
    (device, dtype) group, on torch's current stream, with no host sync.

    Args:
        model: the model (bare, DDP- or torch.compile-wrapped; names are normalised).
        decay: a float, or up to 8 floats for several averages kept in one pass (default 0.9999
            when none of ``sigma_rel``, ``half_life``, ``bema`` is given; give only one of them).
        sigma_rel: EDM2 power-function profiles of these relative widths (a float or up to 8),
            exact for any ``update_every`` or irregular ``update(step=)``
            (:class:`fastema.schedules.PowerFunction`); the first update copies.
        half_life: the decay ``2 ** -(dt / half_life)`` for ``dt`` steps (or samples, when
            ``update(step=)`` counts samples) since the last update (:class:`fastema.schedules.HalfLife`).
        bema: bias-corrected EMA (``True``, or a :class:`fastema.schedules.BEMA`): row 0 is the
            output ``EMA + alpha_t (theta_t - theta_0)``, row 1 the EMA, row 2 ``theta_0`` (the
            weights at the first update); ``swap()``/``copy_to()``/``averaged_state_dict()`` read
            row 0. Not with ``device_step`` or ``offload``.
        warmup: ``None`` (constant decay), ``"num_updates"`` (``min(decay, (1+n)/(10+n))``,
            torch_ema/TF) or ``"power"`` (timm/diffusers/ema-pytorch:
            ``clamp(1 - (1 + s/inv_gamma)^-power, min_decay, decay)``, ``s = n - update_after_step - 1``).
        min_decay, inv_gamma, power, update_after_step: parameters of ``warmup="power"``.
        update_every: update on every k-th call of ``update()`` (the first call updates).
        compensate: with ``update_every=k``, use ``decay**k`` so the average spans the same time.
        debias: start the average from zero and divide out the bias (optax ``debias=True``,
            pandas ``ewm(adjust=True)``); the first update then copies the weights.
        shadow_dtype: ``"float32"`` (default: bfloat16/float16 weights keep moving),
            ``"same"`` or ``"bfloat16"``.
        rounding: ``"nearest"`` or ``"stochastic"`` (for a bfloat16 shadow).
        seed: stochastic-rounding seed; with the step it gives the same bits on every rank.
        buffers: floating buffers (BatchNorm statistics): ``"copy"`` (default), ``"average"``
            or ``"ignore"``. Integer buffers are always copied.
        exclude: name patterns (fnmatch, normalised names) left out entirely.
        copy: name patterns copied instead of averaged.
        skip_nonfinite: skip an update (on the device, no sync) when a weight is inf/NaN.
        device_step: keep the update count, the schedule's weights, ``update_every``'s skips
            and the stochastic-rounding key in device memory, advanced by a one-thread kernel
            at every call, so ``update()`` captured in a CUDA graph (or ``mode="reduce-overhead"``)
            replays the schedule exactly: N replays equal N eager calls bit for bit. ``None``
            (default): on when the averaged weights are on a GPU. Every call then launches
            (a call that ``update_every`` skips writes nothing on the device). ``ema.updates``
            and ``ema.calls`` count eager calls; ``state_dict()`` reads the device's counts.
        offload: ``"cpu"`` keeps the shadow in (pinned) host memory, none of it on the GPU: each
            update packs the weights into a device staging buffer in their own dtype (one launch),
            copies it to the host on a side stream, and folds it into the shadow on a worker
            thread; ``update()`` returns without waiting, every read waits (:meth:`join`). Not
            with ``device_step=True`` or ``skip_nonfinite=True``.
    """

    _format = FORMAT

    def __init__(self, model: nn.Module, decay: float | Sequence[float] | None = None, *,
                 sigma_rel: float | Sequence[float] | None = None, half_life: float | Sequence[float] | None = None,
                 bema: bool | schedules.BEMA | None = None, warmup: str | None = None,
                 min_decay: float = 0.0, inv_gamma: float = 1.0, power: float = 2 / 3, update_after_step: int = 0,
                 update_every: int = 1, compensate: bool = False, debias: bool = False,
                 shadow_dtype: str = "float32", rounding: str = "nearest", seed: int = 0, buffers: str = "copy",
                 exclude: Sequence[str] = (), copy: Sequence[str] = (), skip_nonfinite: bool = False,
                 device_step: bool | None = None, offload: str | None = None):
        if device_step is not None and not isinstance(device_step, bool):
            raise TypeError(f"device_step must be True, False or None, got {device_step!r}")
        if offload not in (None, "cpu"):
            raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
        if offload and (device_step or skip_nonfinite):
            raise ValueError("offload='cpu' keeps the schedule on the host and folds on a worker thread: it does "
                             "not take device_step=True or skip_nonfinite=True; drop one of them")
        self.plan, settings = make_plan(decay, shadow_dtype=shadow_dtype, rounding=rounding, seed=seed,
                                        skip_nonfinite=skip_nonfinite, warmup=warmup, min_decay=min_decay,
                                        inv_gamma=inv_gamma, power=power, update_after_step=update_after_step,
                                        update_every=update_every, compensate=compensate, debias=debias,
                                        sigma_rel=sigma_rel, half_life=half_life, bema=bema)
        self.shadow_dtype, self.rounding, self.seed, self.skip_nonfinite = settings
        self._bema = self.plan.schedules[0] if isinstance(self.plan.schedules[0], schedules.BEMA) else None
        if self._bema is not None and (offload or device_step):
            raise ValueError("bema= applies its bias correction on the host after each update: it does not take "
                             "offload= or device_step=True; drop them")
        rows = 3 if self._bema is not None else self.plan.rows       # BEMA: output, EMA, theta_0
        if offload:
            from ._offload import OffloadedShadow

            make = lambda avg: OffloadedShadow(avg, rows=rows, dtype=shadow_dtype)  # noqa: E731
        else:
            make = lambda avg: FlatShadow(avg, rows=rows, dtype=shadow_dtype)      # noqa: E731
        self.offload = offload
        super().__init__(model, make, buffers=buffers, exclude=exclude, copy=copy)
        groups = self._avg.layout.groups
        self._on_gpu = any(t.device.type != "cpu" for t in self._avg.sources)
        if device_step is None:
            device_step = self._on_gpu and not offload and self._bema is None
        self._plan_on_device = DevicePlan(self.plan, groups, self.seed) if device_step else None
        if self._plan_on_device is not None:
            self._warm()
        self._ops = self._op_lists()

    @property
    def device_step(self) -> bool:
        """True when the plan lives on the device (see the ``device_step`` argument)."""
        return self._plan_on_device is not None

    def _warm(self) -> None:
        """Compile and load every kernel ``update()`` launches now, not inside a first graph
        capture: the plan kernel on a scratch plan, the update's kernels behind set flags
        (they write nothing)."""
        groups = self._avg.layout.groups
        DevicePlan(self.plan, groups, self.seed).advance(None)
        flags = {g.device: torch.ones(1, dtype=torch.int32, device=g.device) for g in groups}
        if self.skip_nonfinite:
            self._scan(flags)
        self._avg.update_checked(None, self.rounding, self.seed, 0, flags, plan=self._plan_on_device)
        self._copy_buffers(flags, current=True)
        self._avg.skipped = {}

    def _cadence(self) -> schedules.Cadence:
        return self.plan.cadence                # the plan counts the calls (read: ema.calls, ema.plan)

    def _plan_tensors(self) -> list:
        plan = getattr(self, "_plan_on_device", None)
        if plan is None:
            return []
        return [t for d in plan.devices.values() for t in d.arrays.values() if isinstance(t, torch.Tensor)]

    def update(self, step: int | None = None) -> None:
        """Update the averages from the model's current weights (call after ``optimizer.step()``).

        Args:
            step: the training step for the schedule; defaults to the number of updates made
                (timed schedules, ``sigma_rel``/``half_life``/``bema``: the number of calls,
                this one included; pass samples seen to define them in samples). Timed
                schedules refuse a step before the last update's.
        """
        if torch.compiler.is_compiling():                 # one operator in the graph (see _compile)
            written, read = self._ops["update"]
            torch.ops.fastema.update_(written, read, self._handle, -1 if step is None else step)
            return
        self._eager_update(step)

    def _eager_update(self, step: int | None) -> None:
        pending = self.plan.next(step)                    # checks step before anything else
        if self._plan_on_device is None and self._on_gpu and torch.cuda.is_current_stream_capturing():
            if self.offload:
                raise RuntimeError("EMA.update() is being captured in a CUDA graph, but this EMA is offloaded: its "
                                   "update runs on a host thread, which a replay would not run. Call update() "
                                   "outside the graph, or make the EMA without offload=.")
            raise RuntimeError("EMA.update() is being captured in a CUDA graph, but this EMA keeps its schedule "
                               "on the host (device_step=False): every replay would repeat this call's weights "
                               "and rounding key. Make the EMA with device_step=True (the default on a GPU).")
        if self._plan_on_device is not None:
            self._begin(True)                             # every call launches; the device skips
            self._device_update(step)
        elif self._begin(pending.due):
            flags = self._scan() if self.skip_nonfinite else None
            weights = pending.weights
            if self._bema is not None:                    # rows: output <- theta_t, EMA, theta_0
                weights = [1.0, weights[0], 1.0 if self.plan.first_time is None else 0.0]
            self._avg.update_checked(self._weights(weights), self.rounding, self.seed, pending.n,
                                     flags)             # addresses checked by _begin
            if self._bema is not None:
                self._bias_correct(self.plan.alpha(pending))
            self._copy_buffers(flags, current=True)
        self.plan.done(pending)

    def _bias_correct(self, alpha: float) -> None:
        """BEMA's output row from the rows the update just wrote: ``theta_t + 0`` in row 0, the
        EMA in row 1, ``theta_0`` in row 2: ``row0 <- EMA + alpha (theta_t - theta_0)``, in place
        (three flat ops per group, ``alpha`` a host number: no sync)."""
        for g in self._avg.layout.groups:
            out, avg, first = g.buffer[0], g.buffer[1], g.buffer[2]
            out.sub_(first).mul_(alpha).add_(avg)

    def _device_update(self, step: int | None) -> None:
        """The launches of one ``update()`` call with the plan on the device: what a CUDA graph
        captures and replays (no host value of the call is baked into it but ``step``)."""
        self._plan_on_device.advance(step)
        flags = self._plan_on_device.flags
        if self.skip_nonfinite:
            flags = self._scan(flags)
        self._avg.update_checked(None, self.rounding, self.seed, 0, flags, plan=self._plan_on_device)
        self._copy_buffers(flags, current=True)

    def _weights(self, weights) -> dict:
        """The kernels' weights per device, with the rounding checked against each shadow dtype (the
        seed was checked at construction and the step by the plan)."""
        out = {}
        for g in self._avg.layout.groups:
            if g.device not in out:
                out[g.device] = resolve_weights(None, weights, self._avg.rows, g.device)
            stochastic_rounding(self.rounding, g.shadow_kind)
        return out

    def _restart(self, model: nn.Module | None = None) -> None:
        self._avg.copy_from_sources()
        self._copy_buffers()

    def ema_state_dict(self, row: int = 0) -> dict[str, torch.Tensor]:
        """Alias of :meth:`averaged_state_dict`."""
        return self.averaged_state_dict(row)

    def _extra_state(self) -> dict:
        if self._plan_on_device is not None:
            self._plan_on_device.read_into(self.plan)     # replayed graphs advanced the device only
        return {**self.plan.state(), "shadow_dtype": self.shadow_dtype, "rounding": self.rounding, "seed": self.seed}

    def _check_extra(self, state: dict, problems: list) -> None:
        self.plan.check_state(state, problems)
        if "rounding" not in state or "seed" not in state:
            problems.append("no 'rounding' or 'seed'")
        else:
            check_shadow_settings(self.shadow_dtype, state["rounding"], state["seed"], problems)

    def _load_extra(self, state: dict) -> None:
        self.plan.load_state(state)
        self.rounding, self.seed = state["rounding"], state["seed"]
        if self._plan_on_device is not None:
            self._plan_on_device.load(self.plan, self.seed)

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, updates={self.updates}, averaged={len(self._avg)} tensors, "
                f"copied={len(self._copy) if self._copy else 0}, shadow={self._avg!r})")


class WindowAverage(_ModelAverage):
    """The mean of the last ``window`` snapshots of a model's weights, or of all of them (SWA).

    ``window=W``: a ring of W flat snapshots per (device, dtype) group and a compensated
    float32 running sum; each snapshot is one kernel launch, and the mean stays within
    2 ulp of an exact recomputation over the ring however many snapshots pass.
    ``window=None``: the cumulative mean of every snapshot (stochastic weight averaging,
    ``avg <- avg + (w - avg) / (n + 1)``), no ring. The weights at construction are the
    first snapshot. Swap, ``average_parameters()``, ``copy_to``, checkpoints and ``save``
    behave as in :class:`EMA`.

    Args:
        model: the model (bare, DDP- or torch.compile-wrapped).
        window: snapshots in the window, or None for the cumulative mean.
        every: take a snapshot on every k-th call of ``update()`` (the first call snapshots).
        ring_dtype: ``"float32"`` or ``"bfloat16"`` snapshots (half the memory; each snapshot
            is rounded to bfloat16, the mean and the sum stay float32).
        buffers, exclude, copy: as in :class:`EMA`.
    """

    _format = "fastema.torch.WindowAverage"

    def __init__(self, model: nn.Module, window: int | None, *, every: int = 1, ring_dtype: str = "float32",
                 buffers: str = "copy", exclude: Sequence[str] = (), copy: Sequence[str] = ()):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1 or None (cumulative mean), got {window!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if ring_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ring_dtype must be 'float32' or 'bfloat16', got {ring_dtype!r}")
        self.window, self.every, self.ring_dtype = window, every, ring_dtype
        make = (lambda avg: FlatShadow(avg, dtype="float32")) if window is None else \
            (lambda avg: WindowShadow(avg, window, ring_dtype=ring_dtype))
        super().__init__(model, make, buffers=buffers, exclude=exclude, copy=copy)
        self.snapshots = 1                      # snapshots taken (the construction is the first)

    def _cadence(self) -> schedules.Cadence:
        return schedules.Cadence(self.every)

    @property
    def count(self) -> int:
        """Snapshots in the average now."""
        return self.snapshots if self.window is None else min(self.snapshots, self.window)

    def update(self) -> None:
        """Take a snapshot of the model's weights (on every ``every``-th call)."""
        if torch.compiler.is_compiling():                 # one operator in the graph (see _compile)
            written, read = self._ops["update"]
            torch.ops.fastema.update_(written, read, self._handle, -1)
            return
        self._eager_update(None)

    def _eager_update(self, step: int | None) -> None:
        if self._begin(self.cadence.due()):
            if self.window is None:
                self._avg.update(weight=1.0 / (self.snapshots + 1))
            else:
                self._avg.push()
            self._copy_buffers()
            self.snapshots += 1
        self.cadence.called()

    def _restart(self, model: nn.Module | None = None) -> None:
        if self.window is None:
            self._avg.copy_from_sources()
        else:
            self._avg.restart()
        self._copy_buffers()
        self.snapshots = 1

    def _extra_state(self) -> dict:
        state = {"snapshots": self.snapshots, "window": self.window, "every": self.every,
                 "ring_dtype": self.ring_dtype}
        if self.window is not None:
            state["ring"] = {n: self._global(n, self._avg.ring_view(n), True) for n in self._avg.names}
            state["pushes"] = self._avg.pushes
        return state

    def _check_extra(self, state: dict, problems: list) -> None:
        if (state.get("window"), state.get("ring_dtype")) != (self.window, self.ring_dtype):
            problems.append(f"checkpoint window/ring_dtype {state.get('window')!r}/{state.get('ring_dtype')!r}, "
                            f"this average {self.window!r}/{self.ring_dtype!r}")
            return
        counts = [("snapshots", 1), ("every", 1)] + ([("pushes", 1)] if self.window is not None else [])
        for key, least in counts:
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                problems.append(f"{key} must be an int >= {least}, got {v!r}")
        if self.window is not None:
            ring = state.get("ring")
            matched = _match_names(ring, self._avg.names)[0] if isinstance(ring, dict) else {}
            for n in self._avg.names:
                v = matched.get(n)
                want = self._global(n, self._avg.ring_view(n), True).shape
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(want):
                    problems.append(f"ring {n!r} missing or of another shape")

    def _load_extra(self, state: dict) -> None:
        self.snapshots, self.every = int(state["snapshots"]), int(state["every"])
        if self.window is not None:
            ring = _match_names(state["ring"], self._avg.names)[0]
            with torch.no_grad():
                for n in self._avg.names:
                    dst = self._avg.ring_view(n)
                    dst.copy_(self._local_part(n, ring[n], dst, True))
            self._avg.pushes = int(state["pushes"])

    def __repr__(self) -> str:
        kind = "cumulative" if self.window is None else f"window={self.window}"
        return f"WindowAverage({kind}, snapshots={self.snapshots}, averaged={len(self._avg)} tensors)"


_SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PostHocEMA(EMA):
    """Power-function EMA profiles (EDM2) of a model, tracked in one pass, with snapshots that
    let any other profile be synthesised after training (:mod:`fastema.posthoc`).

    ``PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=N, path=DIR)`` keeps one shadow
    row per profile in one flat buffer per (device, dtype) group: each ``update()`` is one
    kernel launch per group that reads the weights once and updates every profile, with the
    exact Delta-t weights (:class:`fastema.schedules.PowerFunction`), so ``update_every=k``
    or irregular ``update(step=)`` realise the requested profiles. Every ``snapshot_every``
    updates, :meth:`snapshot` writes every profile to ``DIR/snapshot-<time>.safetensors``
    atomically (temporary file, then rename), with the time and the profiles in its metadata.
    ``update()`` inside ``torch.compile`` (one operator, no graph break) writes them too; CUDA
    graph replays run no Python, so call ``snapshot()`` between replays there.

    Args:
        model: as :class:`EMA`.
        sigma_rels: the tracked relative widths (1 to 8; EDM2 tracks 0.05 and 0.10).
        snapshot_every: updates between snapshots (``None``: only explicit :meth:`snapshot` calls).
        path: the snapshot directory (created).
        update_every: update on every k-th call; the profiles stay exact.
        snapshot_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (EDM2 stores
            float16: half the disk, ~1e-3 relative rounding per snapshot).
        **kwargs: other :class:`EMA` options (``buffers``, ``exclude``, ``shadow_dtype``, ...).

    Sharded models (FSDP2, tensor parallel, HSDP): each rank tracks its own shards (no
    collective per update); every snapshot is a collective DCP save of the ranks' shards (see
    :meth:`snapshot`), which every rank's ``update()`` reaches at the same update. DeepSpeed
    ZeRO-3 (``PostHocEMA(engine, ...)``) too: its partitions are saved flat, with the full
    shapes in the metadata, and synthesised in those shapes.

    ``swap()``, ``copy_to()``, ``averaged_state_dict()`` take ``row=k`` for profile ``k``;
    :meth:`synthesize` gives any other.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10), *,
                 snapshot_every: int | None, path: str | os.PathLike, update_every: int = 1,
                 snapshot_dtype: str = "float32", **kwargs):
        for key in ("decay", "sigma_rel", "half_life", "bema", "offload"):
            if key in kwargs:
                raise TypeError(f"PostHocEMA tracks the profiles sigma_rels=; it takes no {key}=")
        if isinstance(sigma_rels, (int, float)):
            sigma_rels = (sigma_rels,)
        sigma_rels = tuple(sigma_rels)
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must differ from each other, got {sigma_rels}")
        if snapshot_every is not None and (isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int)
                                           or snapshot_every < 1):
            raise ValueError(f"snapshot_every must be an int >= 1 or None, got {snapshot_every!r}")
        if snapshot_dtype not in _SNAPSHOT_DTYPES:
            raise ValueError(f"snapshot_dtype must be one of {sorted(_SNAPSHOT_DTYPES)}, got {snapshot_dtype!r}")
        super().__init__(model, sigma_rel=list(sigma_rels), update_every=update_every, **kwargs)
        self.sigma_rels = sigma_rels
        self.gammas = [s.gamma for s in self.plan.schedules]
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)

    def _eager_update(self, step: int | None) -> None:
        # The eager update, and a snapshot when one is due. Inside torch.compile the fastema::update_
        # operator runs this at every call of the compiled code, so snapshots need no graph break.
        before = self.plan.updates
        super()._eager_update(step)
        n = self.plan.updates
        if self.snapshot_every is not None and n != before and n % self.snapshot_every == 0:
            self.snapshot()

    def snapshot(self) -> str:
        """Write every profile, as of the last update, to ``path``; returns the snapshot's path.

        Blocks until the snapshot is on disk (a device-to-host copy of every profile, one tensor
        at a time: host memory holds one tensor, not the snapshot): call it between steps, every
        few thousand steps as EDM2 does. On a sharded model (FSDP2, tensor
        parallel) it is a collective: one DCP checkpoint ``DIR/snapshot-<time>/`` written by
        every rank from its own shards (no gather), then ``DIR/snapshot-<time>.json`` with the
        metadata, written last by rank 0: a snapshot without it is incomplete and never read."""
        self._not_swapped("snapshot()")
        if self.plan.updates == 0:
            raise RuntimeError("PostHocEMA.snapshot() before any update(): there is no profile to store yet")
        dtype = _SNAPSHOT_DTYPES[self.snapshot_dtype]
        tensors, averaged, others, shapes = {}, [], [], {}
        for name, t, source, value in self._state_entries(0):         # one walk and check for every row
            if source is None or source not in self._avg.names:
                kept = t.detach() if value is None else value()
                tensors[f"model:{name}"] = kept if self.sharded else (kept, kept.dtype)
                others.append(name)
                continue
            averaged.append(name)
            if hasattr(t, "ds_shape"):                    # a ZeRO-3 partition is saved flat
                shapes[name] = list(t.ds_shape)
            for k in range(self.plan.rows):
                v = self._avg.view(source, k)
                if self.sharded:                          # DCP reads the shards in place (a copy only to cast)
                    v = v.to(dtype)
                    tensors[f"{k}:{name}"] = _sharded.wrap(v, self._specs[source]) if source in self._specs else v
                else:                                     # streamed to the file one tensor at a time
                    tensors[f"{k}:{name}"] = (v, dtype)
        time = self.plan.last_time
        meta = {"format": posthoc.FORMAT, "version": str(posthoc.VERSION), "time": repr(time),
                "updates": str(self.plan.updates), "calls": str(self.plan.calls),
                "gammas": json.dumps(self.gammas), "sigma_rels": json.dumps(list(self.sigma_rels)),
                "averaged": json.dumps(averaged), "others": json.dumps(others), "dtype": self.snapshot_dtype,
                "shapes": json.dumps(shapes)}
        return posthoc.write_snapshot(self.path, time, tensors, meta, sharded=self.sharded)

    def synthesize(self, sigma_rel: float | None = None, *, gamma: float | None = None, time: float | None = None,
                   max_error: float = posthoc.MAX_ERROR, into: nn.Module | None = None, dtype=None):
        """The average of profile ``sigma_rel`` (or ``gamma``) at ``time`` (default: the last
        snapshot's) from the snapshots written so far: see :func:`fastema.posthoc.synthesize`.
        ``into`` may be DDP- or torch.compile-wrapped (the names are the inner model's)."""
        return posthoc.synthesize(self.path, sigma_rel, gamma=gamma, time=time, max_error=max_error,
                                  into=None if into is None else _unwrap(into), dtype=dtype)

    def __repr__(self) -> str:
        return (f"PostHocEMA(sigma_rels={self.sigma_rels}, updates={self.updates}, snapshot_every="
                f"{self.snapshot_every}, path={self.path!r}, shadow={self._avg!r})")
