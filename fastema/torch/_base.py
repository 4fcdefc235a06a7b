"""``_ModelAverage``: what every torch model average (:class:`~fastema.torch.EMA`,
:class:`~fastema.torch.WindowAverage`, :class:`~fastema.torch.PostHocEMA`) shares, composed from
the model side (:mod:`fastema.torch._model`) and the checkpoint side
(:mod:`fastema.torch._checkpoint`).

This module owns construction, the update bookkeeping (``calls``, ``_begin``), the operator
lists of the ``torch.compile`` operators (:mod:`fastema.torch._compile`), swap with a lossy
backup (``swap`` / ``_exchange`` / ``average_parameters``), ``copy_to`` and ``join``.
"""
from __future__ import annotations

from typing import ContextManager, Sequence

import torch
from torch import nn

from ..average.plan import Cadence
from ..average.swap import ModelSwap
from ..flat import FlatShadow
from . import _compile, _deepspeed, _sharded
from ._checkpoint import _CheckpointSide
from ._hooks import _patterns, _unwrap, _watch
from ._model import _ModelSide
from ._peft import announce, resolve_trainable_only
from ._slots import _DATA_PTR, _disjoint_groups, _tensors_of, bump_versions


class _ModelAverage(_ModelSide, _CheckpointSide):
    """What every model-level average shares: which tensors are averaged or copied, the flat
    shadow, following a changed model, swap / copy-out / export, and checkpoints. Subclasses
    make the shadow and define ``update()``, ``_restart()`` and their extra checkpoint state.

    The model side (selection, following the model) is :class:`~fastema.torch._model._ModelSide`,
    export and checkpoints :class:`~fastema.torch._checkpoint._CheckpointSide`."""

    _format = ""

    def __init__(self, model: nn.Module, make_shadow, *, buffers: str, exclude: Sequence[str],
                 copy: Sequence[str], trainable_only: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers must be 'copy', 'average' or 'ignore', got {buffers!r}")
        self.buffers = buffers
        self.exclude, self.copy_patterns = _patterns("exclude", exclude), _patterns("copy", copy)
        self.trainable_only, defaulted = resolve_trainable_only(model, trainable_only)   # None: True for PEFT
        self.model = model
        self._int_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (model's, copy)
        self._fsdp = _sharded.fsdp_modules(_unwrap(model))   # FSDP2 modules, resharded before any read
        self._engine = model if type(model).__name__ == "DeepSpeedEngine" else None
        self._steps = _deepspeed.steps(self._engine)         # DeepSpeed: one fold per optimizer step (M2)
        self._specs: dict[str, _sharded.Spec] = {}          # name -> layout of a DTensor's local shard
        _sharded.reshard(self._fsdp)
        averaged, copied = self._select(_unwrap(model))
        self._masters = _deepspeed.find(self._engine, averaged, f"{type(self).__name__}(engine)")
        if self._masters is not None:                  # ZeRO-3: the optimizer's float32 masters read instead
            averaged.update(self._masters.views)
            self._specs.update(self._masters.specs)    # ZeRO-1/2: pieces of the parameters, gathered in exports
        self._known = set(_tensors_of(_unwrap(model)))     # every name at construction: others are new (M4)
        self._modules_now = None                           # without the hooks: the modules' tables (_follow)
        if not averaged:
            raise ValueError("the model has no floating-point parameters to average (check exclude= and copy="
                             + (", and trainable_only" + (" (True by default for a PEFT model)" if defaulted else
                                "") + ": no parameter has requires_grad=True)" if self.trainable_only else ")"))
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
                                               "raw weights then); call it outside average_parameters() or after "
                                               "swap()")
        self._slots = self._owner_slots()
        self._addresses = self._addresses_now()
        self._handle = _compile.register(self)  # what the compiled operators find this average by
        self._ops = self._op_lists()
        _watch(_unwrap(model), self)
        if defaulted:
            announce(self)                      # trainable_only=None on a PEFT model: say what is averaged

    def _restart(self, model: nn.Module | None = None) -> None:
        """Start the averages over from the model's current weights (the model was wrapped in DDP,
        which broadcast rank 0's weights into it)."""
        raise NotImplementedError

    def _fresh(self) -> bool:
        """True while nothing but the construction went into the averages (a restart loses nothing)."""
        return self.calls == 0 and not self.swapped

    def _cadence(self) -> Cadence:
        raise NotImplementedError

    @property
    def calls(self) -> int:
        """``update()`` calls so far, skipped ones included."""
        return self.cadence.calls

    def _begin(self, due: bool) -> bool:
        """Checks before an update; returns ``due`` (this call updates). The caller records the call
        once it has been made, so a refused update changes nothing."""
        self._swap.refuse("update()")          # _not_swapped, without a call more on the per-step path
        if due:
            self._follow()                      # every group, or a refusal before anything is written
        return due

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    # ------------------------------------------------------------ torch.compile

    def _op_lists(self) -> dict:
        """``op -> (tensors it writes, tensors it reads)`` for the compiled operators (``_compile``):
        every tensor an eager call touches, so functionalization sees each write. Made when the
        tensors change (construction, rebind), never while tracing."""
        groups = [g for shadow in (self._avg, self._copy) if shadow is not None for g in shadow.layout.groups]
        shadows = [g.buffer for g in groups] + [ring for _, ring, _ in getattr(self._avg, "_rings", ())]
        sources = list(self._avg.sources) + (list(self._copy.sources) if self._copy is not None else [])
        ints = list(self._int_buffers.values())
        owned = shadows + [d for _, d in ints] + self._plan_tensors()
        for t in owned:                 # fastema's own, never moved: static for cudagraph trees, which skip a
            if t.is_cuda:               # graph that writes a tensor that is not (issue 37, B5); what
                t._dynamo_static_input_type = "unguarded"   # torch._dynamo.mark_static_address(t) sets
        return {"update": (owned, sources + [s for s, _ in ints]),
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

    # ------------------------------------------------------------ swap and copy-out

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
            self._check_row(row)
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
        if self._masters is not None:                 # the masters were exchanged: now the partitions evaluation reads
            self._masters.exchanged(swapping_in)
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
        row it leaves the weights as they are, and the outer one swaps back. Yields the model.

        Not inside ``torch.compile``: with ``fullgraph=True`` it is refused with that reason (a graph
        break otherwise, the block then runs eagerly). Call it around the compiled function."""
        if torch.compiler.is_compiling():         # traced: made eager there (torch._dynamo is loaded by then)
            return _compile.eager_block(self._swap, row, self.model)
        return self._swap.block(row, self.model)

    def copy_to(self, model: nn.Module | None = None, row: int = 0) -> None:
        """Write average ``row`` into ``model`` (default: the tracked model), e.g. at the end of training.

        Another model must have the same names, shapes and dtypes (DDP / torch.compile wrappers
        are looked through); anything else raises before a tensor is written. The tensors written
        get their autograd version bumped, as by torch's ``copy_``: a backward through a graph
        that saved the old weights raises.
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

    def __copy__(self):
        raise TypeError(f"a {type(self).__name__} cannot be copied: its kernel tables hold the addresses of its own "
                        f"buffers and of the model's tensors. Make a new one of the (copied) model and load this "
                        f"one's state: new.load_state_dict(old.state_dict())")

    def __deepcopy__(self, memo):
        self.__copy__()

    def _check_row(self, row: int) -> None:
        """IndexError unless ``row`` is one of the averages this average shows."""
        self._avg.check_row(row)

    def _eager_copy_to(self, row: int) -> None:
        self._check_row(row)
        self._not_swapped("copy_to()")
        self._settle()
        self._follow()
        if self._copy is not None:                     # the averaged group checks itself before writing
            self._copy.check_sources()
        self._avg.copy_to_sources(row)
        if self._masters is not None:                 # the masters were written: round them into the partitions
            self._masters.push()
        if self._copy is not None:
            self._copy.copy_to_sources()
        bump_versions(self._avg.sources + (self._copy.sources if self._copy is not None else []))   # as torch's copy_

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

    @property
    def source(self) -> str:
        """What the averages read: ``"parameters"`` (the model's parameters, or their local shards or
        partitions), or, for ``EMA(engine)`` of a DeepSpeed engine whose optimizer keeps float32
        masters, those masters, flat and shard-local: ``"deepspeed-zero3-fp32-masters"``,
        ``"deepspeed-zero2-fp32-masters"`` (ZeRO-1/2) or ``"deepspeed-bf16-fp32-masters"``
        (``BF16_Optimizer``). See the large-models guide."""
        return self._masters.source if self._masters is not None else _deepspeed.PARAMETERS
