"""The checkpoint side of a torch model average: torch tensor forms of the averages.

Model-style state dicts of the averaged weights (:meth:`~TorchCheckpoint.averaged_state_dict`,
DTensors on a sharded average, full tensors from :meth:`~TorchCheckpoint.full_state_dict`),
a standalone ``module()`` copy, the average's own checkpoint (``state_dict`` /
``load_state_dict``: schema :data:`FORMAT` / :data:`VERSION`, checked in full before anything is
loaded; ZeRO-3 flat forms and DTensors of any layout) and ``save()`` to a model checkpoint file.
A :class:`TorchCheckpoint` is held by every ``TorchAverage`` (:mod:`fastema.torch._face.average`,
``self._checkpoint``): it reads the model side (:class:`~fastema.torch._tensors.model.TorchModel`) and
what the face keeps besides the tensors (a :class:`CheckpointCore`: the engine's plan and
counters, a window's ring), each handed to it at construction.
"""
from __future__ import annotations

import copy
import functools
import os
import warnings
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from ..._checkpoint_format import check_header, load_refused, refuse_load
from ..._checks import load_dtype_problem
from ..._interrupts import ctrl_c_held
from ..._io.files import atomic_write as _atomic_write
from ..._io.safe_files import writable
from ..._io.safetensors import stream_safetensors, stream_torch_save
from ..._nonfinite import held, load_advice
from .._sharding import params as _sharded
from .._tensors.hooks import match_names, unwrap
from .._tensors.slots import local_key
from .agree import Agreement, Read, load_stamp
from .dcp_calls import loading
from .entries import global_shape, lands_as_saved, lands_finite, local_part, refuse_extra_state, staged
from .nonfinite import RECORD, NonFinite, named
from .slices import full_entry

if TYPE_CHECKING:
    from ...average import ModelSwap
    from .._tensors.model import TorchModel

__all__ = ["FORMAT", "VERSION", "CheckpointCore", "TorchCheckpoint"]

FORMAT = "fastema.torch.EMA"
VERSION = 2                                  # 2: sharded averages saved as DTensors; reads version 1 too


class CheckpointCore(Protocol):
    """What a face keeps in its checkpoint besides the model side's tensors: the engine
    (:class:`~fastema.average.Average`: its plan and counters) or a window's counts and ring.
    ``plan_state()`` holds ``"calls"`` (``update()`` calls so far), which ``load_plan_state`` loads.
    ``shadow_dtype``: the averages' setting (a file written with another is not rounded into them)."""

    shadow_dtype: str

    def check_row(self, row: int) -> None: ...

    def plan_state(self) -> dict: ...

    def check_plan_state(self, state: dict, problems: list) -> None: ...

    def load_plan_state(self, state: dict) -> None: ...


class TorchCheckpoint:
    """Export and checkpoints of a torch model average (its face's checkpoint side).

    Args:
        side: the model side (shadows, names, layouts, following the model).
        core: what the face keeps besides the tensors (see :class:`CheckpointCore`).
        fmt: the checkpoint's ``"format"``.
        swap: the face's swap state: every read and write refuses a swapped model.
        agreement: the average's agreement (:class:`~fastema.torch._state.agree.Agreement`: the
            groups a read spans, the block every rank agrees in, the face's name, ``update()``
            calls), shared with its swaps and copy-outs.
        nonfinite: the average's non-finite watch (:class:`~.nonfinite.NonFinite`), shared with
            its swaps and copy-outs: every read that hands the average out refuses inf or NaN.
    """

    def __init__(self, side: TorchModel, core: CheckpointCore, fmt: str, *, swap: ModelSwap,
                 agreement: Agreement, nonfinite: NonFinite):
        self.side, self.core, self.format, self.swap = side, core, fmt, swap
        self.agreement, self.kind, self.nonfinite = agreement, agreement.kind, nonfinite

    def writer(self) -> bool:
        """Whether this rank writes a gathered average (``save()``) and keeps it (``rank0_only``): the
        first rank of the average's group (the mesh's first rank; with a replica group, that group's
        first rank), global rank 0 for an unsharded one."""
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            return True
        specs = self.side.specs
        if specs:
            mesh = next(iter(specs.values())).mesh
            return dist.get_rank() == int(mesh.mesh.flatten()[0])
        return dist.get_rank() == 0

    @property
    def sharded(self) -> bool:
        """True when a tracked tensor is a DTensor (FSDP2, tensor parallel, HSDP)."""
        return bool(self.side.specs)

    def check_row(self, row: int) -> None:
        """IndexError unless ``row`` is one of the averages the face shows."""
        self.core.check_row(row)

    def averaged_state_dict(self, row: int = 0) -> dict[str, torch.Tensor]:
        """A model-style state dict of the averaged weights (the model's dtypes, names and layouts;
        DDP / torch.compile prefixes stripped): what ``model.load_state_dict`` takes. Every name
        of a tied or aliased tensor gets its average."""
        specs = self.side.specs
        gathers = any(s.pieces is not None for s in specs.values())     # split or ZeRO-1/2: pieces gathered
        with self.agreement.agreed(Read("averaged_state_dict()", row=row), gathers=gathers,
                                   checked=self.nonfinite.checking):
            self.swap.refuse("averaged_state_dict()")
            entries = self.entries(row)
            self.nonfinite.refuse("averaged_state_dict()", row)
        out = {}
        for name, t, source, value in entries:
            if source is None:                  # excluded: the model's own (extra state: as is)
                out[name] = t.detach().clone() if isinstance(t, torch.Tensor) else t
            elif source in specs:                          # a sharded average: this rank's part, as a DTensor
                out[name] = _sharded.wrap(value().to(t.dtype, copy=True), specs[source])
            else:
                out[name] = value().to(t.dtype, copy=True)
        return out

    def entries(self, row: int) -> list:
        """``(name, model tensor, source, value)`` for every entry of the model's state dict:
        ``source`` the name this average tracks it under (None: not tracked), ``value()`` its
        average of ``row`` (averaged), its copy (copied buffers) or None. Checks the sources."""
        self.check_row(row)
        side = self.side
        side.follow()
        avg, copied, ints = side.avg, side.copy, side.int_buffers
        avg.check_sources()                            # a same-address reshape or cast is named here
        if copied is not None:
            copied.check_sources()
        tracked: dict[str, Callable[..., torch.Tensor]] = {}
        for n in avg.names:
            tracked[n] = lambda n=n: avg.view(n, row)
        if copied is not None:
            for n in copied.names:
                tracked[n] = functools.partial(copied.view, n)
        for n in ints:
            tracked[n] = lambda n=n: ints[n][1]
        inner = unwrap(side.model)
        own: dict[str, torch.Tensor] = dict(inner.named_parameters(remove_duplicate=False))
        own.update(inner.named_buffers(remove_duplicate=False))
        by_key = {local_key(own[n]): n for n in tracked if n in own and local_key(own[n]) is not None}
        out: list = []
        for name, t in inner.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor):        # a module's extra state: as it is
                out.append((name, t, None, None))
                continue
            source = name if name in tracked else by_key.get(local_key(t))
            out.append((name, t, source, None if source is None else tracked[source]))
        return out

    def full_state_dict(self, row: int = 0, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`averaged_state_dict` with full tensors: what an unsharded model's ``load_state_dict``
        takes. On a sharded average this is a collective (every rank must call it): each tensor is
        gathered in turn (``DTensor.full_tensor()``; split over replicas: a ``ShardReplicas(bucket=)`` at a
        time), so at most one full tensor (and one bucket) is in flight beyond what is kept.
        ``rank0_only=True``: only the first rank of the average's group keeps them (global rank 0
        by default; see :meth:`writer`), the other ranks get ``{}``."""
        def check() -> None:
            if not isinstance(rank0_only, bool):
                raise TypeError(f"rank0_only must be True or False, got {rank0_only!r}")

        keep = rank0_only is not True or self.writer()
        out = {}

        def take(name: str, value: torch.Tensor) -> None:
            if keep:
                out[name] = value

        self.whole_read(Read("full_state_dict()", row=row), take, check)
        return out

    def whole_read(self, read: Read, take: Callable[[str, torch.Tensor], None],
                   check: Callable[[], None] | None = None,
                   then: Callable[[], None] | None = None) -> None:
        """``take(name, full tensor)`` of every entry of :meth:`full_state_dict` of ``read.row``,
        made one at a time (a collective per sharded tensor, a split average's pieces a bucket at a
        time, in the model's state-dict order on every rank: :mod:`.stream`'s engine, every name of
        a tied tensor kept, the bucket ``ShardReplicas(bucket=)``'s), then ``then()``. The tensors
        are fresh copies in the model's dtypes (excluded tensors: of the model's own values). A
        collective read's ranks agree first (every check on every rank, the same update count, the
        same read) and last: a rank whose ``take`` or ``then`` raised (its stream read to the end
        first, so the others' gathers finish) makes every rank raise, so a whole read succeeds on
        every rank or on none."""
        from .stream import average_stream

        stream = average_stream(self, read, None, None, "all", check=check, whole=True)  # agreed
        with self.agreement.agreed(read._replace(direction="end")):
            try:
                for name, value in stream:
                    take(name, value)
            finally:
                stream.close()                   # the rest read (a collective read's), nothing kept
            for name, extra in unwrap(self.side.model).state_dict().items():
                if not isinstance(extra, torch.Tensor):     # extra state: as it is, not streamed
                    take(name, extra)
            if then is not None:
                then()

    def module(self, row: int = 0) -> nn.Module:
        """A standalone copy of the model holding the averaged weights (for export or another process)."""
        if self.sharded:
            raise TypeError("module() copies the whole model on every rank, and this average is sharded (FSDP2 / "
                            "tensor parallel) or split over replicas (shard_replicas): use "
                            "full_state_dict(rank0_only=True) and load it into a plain model, or "
                            "copy_to(plain_model), or save(path)")
        state = self.averaged_state_dict(row)
        clone = copy.deepcopy(unwrap(self.side.model))
        clone.load_state_dict(state)
        return clone

    # ------------------------------------------------------------ checkpoints

    def state_dict(self, gathered: bool = False) -> dict:
        """See ``TorchAverage.state_dict``: host copies (DTensors on a sharded average) of every shadow
        view, the counters and settings. ``gathered=True`` (a split average's checkpoint that one rank
        writes whole: Lightning's): every entry a full tensor, gathered (a collective every rank of the
        group joins, after they agree), which ``load_state_dict`` cuts again on any number of ranks."""
        read = Read("state_dict()", "gathered" if gathered else "")
        with self.agreement.agreed(read, gathers=gathered):
            self.swap.refuse("state_dict()")     # and the host copies made (can fail on one rank)
            side = self.side
            if side.resync:                      # a DDP wrap since construction: start over first
                side.follow()
            avg, copied = side.avg, side.copy
            state = {
                "format": self.format, "version": VERSION, **self.core.plan_state(),  # "calls" 1st
                "layout": "sharded" if self.sharded else "replicated",   # information, never loaded
                "averaged": staged(side, {n: avg.state_view(n) for n in avg.names}, True),
                "copied": {} if copied is None else staged(side, {n: copied.view(n)
                                                                  for n in copied.names}),
                "int_buffers": staged(side, {n: v[1] for n, v in side.int_buffers.items()}),
            }
        template = loading()                             # dcp.load's template: no key a file may lack
        if avg.split_id is not None and not template:    # (an unsplit or FSDP2 save has no split_id)
            state["split_id"] = self.agreement.split_id  # which split run the slices are of
        poisoned = self.nonfinite.saved(gathered)        # named in a warning; information, never loaded
        if poisoned and not template:                    # (a finite average's checkpoint: as it was)
            state[RECORD] = poisoned
        if gathered:
            for key in ("averaged", "ring"):
                if isinstance(state.get(key), dict):
                    state[key] = {n: full_entry(side.specs, n, v) for n, v in state[key].items()}
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """See ``TorchAverage.load_state_dict``: every check first (on every rank), then all of it."""
        self.checked_load(state, strict)()

    def checked_load(self, state: dict, strict: bool = True) -> Callable[[], None]:
        """Every check of :meth:`load_state_dict` (on every rank, agreed); returns what writes it
        (an attached average's load: checked before torch loads the optimizer, written after). An
        average holding inf or NaN is refused unless allowed (``allow_nonfinite``), then loaded with
        a warning naming its tensors."""
        read = Read("load_state_dict()")
        with self.agreement.agreed(read, stamp=load_stamp(state)):   # all load, or none
            loads, poisoned = self._checked_loads(state, strict)
        return lambda: self._write(state, loads, poisoned)

    def _write(self, state: dict, loads: list, poisoned: list) -> None:
        with ctrl_c_held(), torch.no_grad():         # every check passed on every rank: now write all of it
            for dst, value in loads:                 # (a Ctrl-C is raised after the counters, not between two
                dst.copy_(value)                     # tensors: on a GPU this is a host-to-device copy of it all)
            self.core.load_plan_state(state)         # the counters ("calls" too) and the face's own state
            if "split_id" in state and self.side.avg.split_id is not None:
                self.side.avg.split_id = int(state["split_id"])
        if poisoned:
            warnings.warn(f"{self.kind}.load_state_dict(): the average loaded holds inf or NaN "
                          f"in {named(poisoned)} (allow_nonfinite): exports, swaps and copy_to() "
                          f"refuse it until repair_nonfinite() resets those tensors from the live "
                          f"weights", RuntimeWarning, stacklevel=3)

    def join_refusing(self, err: BaseException) -> None:
        """This rank cannot read what it would load (its file is missing or damaged): join the load's
        exchange refusing, so every rank raises at once, naming this rank (never a hang); raises."""
        with self.agreement.agreed(Read("load_state_dict()")):
            raise err

    def _checked_loads(self, state: dict, strict: bool) -> tuple[list, list]:
        """Every check of :meth:`load_state_dict` on this rank: the ``(destination, value)`` pairs to
        write and the averaged entries holding inf or NaN (allowed), or the refusal naming every
        problem."""
        kind = self.kind
        check_header(state, self.format, (1, VERSION), f"a model checkpoint goes to model.load_state_dict, a "
                                                       f"{kind} checkpoint ({kind}.state_dict()) here")
        self.swap.refuse("load_state_dict()")
        problems = []
        loads = []                                   # (destination view, value), written only if all is well
        poisoned: list[str] = []                     # averaged entries holding inf or NaN
        beyond: dict[str, str] = {}                  # of those, finite but past the average's dtype
        side = self.side
        avg, copied, ints = side.avg, side.copy, side.int_buffers
        setting = state.get("shadow_dtype")

        def written(value: torch.Tensor, dst: torch.Tensor):
            """The dtype an average was saved in: its file's setting where it names one (dcp.load
            hands over the values converted into this EMA's own state_dict(), its dtype), else the
            value's; a float64 average's is float64 under any setting."""
            named = setting in ("float32", "bfloat16", "float16") and dst.dtype != torch.float64
            return setting if named else value.dtype

        def copied_view(n: str) -> torch.Tensor:
            assert copied is not None                # asked of its names only
            return copied.view(n)

        def copied_source(n: str) -> torch.Tensor:
            assert copied is not None
            return copied.sources[copied.names.index(n)]

        groups = (("averaged", avg.names, avg.state_view, True, True),
                  ("copied", copied.names if copied is not None else [], copied_view, False, False),
                  ("int_buffers", list(ints), lambda n: ints[n][1], False, False))
        copied_bad: list[str] = []                   # copied buffers holding inf or NaN
        for key, names, view_of, finite, stacked in groups:
            saved = state.get(key, {})
            if not isinstance(saved, dict):
                problems.append(f"{key} is a {type(saved).__name__}, expected a dict of tensors")
                continue
            matched, unused = match_names(saved, names)
            missing = [n for n in names if n not in matched]
            if missing:
                problems.append(f"{key} missing {missing[:5]}")
            if unused and strict:
                problems.append(f"{key} unexpected {unused[:5]}")
            for n, value in matched.items():
                dst = view_of(n)
                shape = global_shape(side, n, dst, stacked)
                if not isinstance(value, torch.Tensor):
                    problems.append(f"{key} {n!r} is a {type(value).__name__}, expected a tensor")
                    continue
                spec = side.specs.get(n)
                # ZeRO-3 averages are saved flat, (rows, numel); either form loads into either layout
                flat = stacked and not _sharded.is_dtensor(value) and value.dim() >= 1 and len(shape) >= 1 and (
                    (spec is not None and spec.view_shape is not None and
                     tuple(value.shape) == (shape[0], *spec.view_shape)) or
                    (spec is None and tuple(value.shape) == (shape[0], dst[0].numel()) and len(shape) != 2))
                if tuple(value.shape) != tuple(shape) and not flat:
                    problems.append(f"{key} {n!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
                    continue
                try:
                    value = local_part(side, n, value, dst, stacked)
                except ValueError as e:                    # a refusal, never a one-rank raise (see below)
                    problems.append(f"{key} {n!r}: {e}")
                    continue
                if spec is not None and spec.valid is not None:
                    dst = dst[..., :spec.valid]                # a ZeRO-3 partition: its padding stays
                if value.device.type == "meta":
                    problems.append(f"{key} {n!r} is a meta tensor (no values)")
                elif value.is_floating_point() != dst.is_floating_point() or value.is_complex() != dst.is_complex() \
                        or (value.dtype == torch.bool) != (dst.dtype == torch.bool):     # a count is no flag
                    problems.append(f"{key} {n!r} has dtype {value.dtype}, expected {dst.dtype}")
                elif finite and (wrong := load_dtype_problem(     # rounded into it
                        f"{key} {n!r}", written(value, dst), dst.dtype, state,
                        self.core.shadow_dtype)) or not finite and (wrong := lands_as_saved(
                            f"{key} {n!r}", value, dst.dtype)):        # wrapped or inf in the buffer's
                    problems.append(wrong)
                else:
                    if finite and not lands_finite(value, dst.dtype):
                        poisoned.append(n)
                        if bool(torch.isfinite(value).all()):  # finite in its own dtype
                            beyond[n] = str(dst.dtype).replace("torch.", "")
                    elif key == "copied" and dst.is_floating_point() and _poisons(value, copied_source(n)):
                        copied_bad.append(n)            # the swap would hand it to the model
                    loads.append((dst, value))
        calls = state.get("calls")
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            problems.append(f"calls must be an int >= 0, got {calls!r}")
        split_id = state.get("split_id", 0)
        if isinstance(split_id, bool) or not isinstance(split_id, int):
            problems.append(f"split_id must be an int, got {split_id!r}")
        self.core.check_plan_state(state, problems)
        if (poisoned or copied_bad) and self.nonfinite.checking:
            what = "; ".join(([held(poisoned, beyond)] if poisoned else [])
                             + ([held(copied_bad, {}, "copied") + " where the model's is finite"]
                                if copied_bad else []))
            setting = ("or set ema.allow_nonfinite = True before a load another library makes: dcp.load, "
                       "optimizer.load_state_dict, a callback's resume")
            if problems:                             # refused for more than that
                problems.append(what)
            elif poisoned:
                raise load_refused(f"this {kind} checkpoint's {what}. " + load_advice(setting))
            else:
                raise load_refused(f"this {kind} checkpoint's {what}. To load it all the same, pass "
                                   f"allow_nonfinite=True ({setting}): the next update() copies the "
                                   f"model's buffer over it.")
        refuse_load(kind, problems, " this model")
        return loads, poisoned

    def save(self, path: str | os.PathLike, row: int = 0) -> None:
        """See ``TorchAverage.save``: the averaged weights as a model checkpoint, streamed, atomically."""
        checked: list = []                 # the path, checked (inside the ranks' agreement when sharded)
        tensors: dict = {}

        def check(writes: bool = True) -> None:
            target = os.fspath(path)
            if writes:                     # before anything is read or gathered (the writer's disk)
                writable("save()", target, "ema.safetensors")
            checked.append(target)

        def write() -> None:
            target: str = checked[0]
            if target.lower().endswith(".safetensors"):
                refuse_extra_state(tensors, target)
                _atomic_write(target, lambda f: stream_safetensors(f, tensors, {"format": "pt"}))
            else:                          # torch.save's format, one host copy at a time
                _atomic_write(target, lambda f: stream_torch_save(f, tensors))

        if self.sharded:                   # collective: every rank gathers, the group's first rank
            first = self.writer()          # keeps and writes; a file it cannot write: all raise

            def take(name: str, value: torch.Tensor) -> None:
                if first:                  # a fresh copy: moved, not copied (extra state: as it is)
                    tensors[name] = (value.to("cpu"), value.dtype) if isinstance(value, torch.Tensor) else (value, None)

            self.whole_read(Read("save()", row=row), take, functools.partial(check, first), write if first else None)
            return
        check()                            # every check first; values read as the file is written
        self.swap.refuse("save()")
        tensors.update({name: (t.detach() if value is None else value(), t.dtype) if isinstance(t, torch.Tensor)
                        else (t, None) for name, t, _, value in self.entries(row)})
        self.nonfinite.refuse("save()", row)
        write()


def _poisons(value: torch.Tensor, live: torch.Tensor) -> bool:
    """Whether a checkpoint's copied buffer holds inf or NaN where the model's own buffer is finite
    (a buffer that holds them by design, a ``-inf`` mask or an observer's unset bounds, loads)."""
    if bool(torch.isfinite(value).all()):
        return False
    return bool((~torch.isfinite(value) & torch.isfinite(live).to(value.device)).any())
