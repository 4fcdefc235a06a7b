"""``TorchAverage``: what every torch model average (:class:`~fastema.torch.EMA`,
:class:`~fastema.torch.WindowAverage`, :class:`~fastema.torch.PostHocEMA`) shares on top of the
torch-face contract (:class:`~fastema.torch._face.contract.TorchFace`, built from the parts
:func:`~fastema.torch._face.contract.model_parts` makes): the model's read side (its selection, ``source``, ``sharded``,
``split``), swap and ``average_parameters()`` (through :class:`~fastema.torch._swap.ShadowSwap`), ``copy_to``,
``join``, ``memory``, and the public checkpoint methods, each one line into the checkpoint side
(:class:`~fastema.torch._state.checkpoint.TorchCheckpoint`), with what a callback reads of them:
:attr:`~TorchAverage.split`, :meth:`~TorchAverage.gathered_state_dict` and
:meth:`~TorchAverage.refuse_on_every_rank`.
"""
from __future__ import annotations

import os
from typing import ContextManager, Literal

import torch
from torch import nn

from ..._shadow import Shadow
from ...average import ModelSwap
from .._sharding import masters as _deepspeed
from .._sharding import params as _sharded
from .._state.agree import Read
from .._state.checkpoint import TorchCheckpoint
from .._state.entries import load_into
from .._state.peft import export_peft
from .._state.stream import DEFAULT_BUCKET, Ranks, Stream, WeightMeta, average_meta, average_stream
from .._tensors.hooks import unwrap
from .._tensors.model import TorchModel
from . import compiled as _compile
from .attach import Attachment, Joined, skip_refusal
from .contract import ModelParts, TorchFace


class TorchAverage(TorchFace):
    """What every model-level average shares (see the module): its parts (:class:`ModelParts`) made
    by :func:`~fastema.torch._face.contract.model_parts`. ``_avg`` and ``_copy`` are the model side's two
    shadows (the same objects, never replaced)."""

    _side: TorchModel
    _avg: Shadow
    _checkpoint: TorchCheckpoint
    _swap: ModelSwap

    def __init__(self, parts: ModelParts):
        side = parts.side
        self.model = side.model
        self.buffers, self.exclude, self.copy_patterns = side.buffers, side.exclude, side.copy_patterns
        self.trainable_only = side.trainable_only
        self._copy = side.copy
        self._steps = side.steps                # DeepSpeed: one fold per optimizer step (M2)
        self._plan_on_device = None if parts.engine is None else parts.engine.device_plan
        assert parts.swap is not None           # a model average writes its model
        self._swapper = parts.swap              # copy-out; a lossy swap's backup (memory())
        # attach(optimizer): its hooks (_face/attach.py); on the object, where a compiled update
        # finds it with one guard (a class default: a walk of the class's bases, guarded at every call)
        self._attachment: Attachment | None = None
        super().__init__(parts)

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    @property
    def allow_nonfinite(self) -> bool:
        """False (default): a swap in, ``copy_to()``, the exports (``averaged_state_dict()``,
        ``save()``, ``iter_weights()``...) and a load of an average holding inf or NaN raise, naming
        its tensors (on every rank of a split or sharded one); True: they go on (a load warns). A
        call's ``allow_nonfinite=`` decides for itself (None: this); set this for a load another
        library makes (``dcp.load``, an optimizer's load); see :meth:`repair_nonfinite`."""
        return self._checkpoint.nonfinite.allowed

    @allow_nonfinite.setter
    def allow_nonfinite(self, value: bool) -> None:
        self._checkpoint.nonfinite.allow(value)

    def repair_nonfinite(self) -> list[str]:
        """Reset every averaged tensor holding inf or NaN from the live weights; return their names.
        Each row holding one (several decays, BEMA's state rows) gets the model's weights, rounded
        to the shadow's dtype, on its device; every other tensor and row is left bit for bit. Found
        by the non-finite scan on the device (a launch a group, then one a tensor where a group
        holds one; a host read a device). ``state_dict()`` warns of such tensors and records them
        (``"nonfinite"``). Refused while swapped in. On a split or sharded average a collective:
        every rank calls it and resets its part of the same tensors."""
        return self._checkpoint.nonfinite.repair(self._swap)

    @property
    def split(self) -> bool:
        """True when the average is split over replicas (``shard_replicas``): its swap, ``copy_to``
        and whole reads gather it, a collective every rank of the replica group joins, and
        :meth:`state_dict` holds this rank's pieces (:class:`~fastema.torch.SplitEntry`; one rank
        writing a whole checkpoint reads :meth:`gathered_state_dict` instead)."""
        return self._avg.group is not None

    # ------------------------------------------------------------ attached to an optimizer

    def attach(self, optimizer: torch.optim.Optimizer):
        """Update this average after every ``optimizer.step()`` and keep it in the optimizer's
        state dict, so whatever saves the optimizer saves it (HF Trainer's ``optimizer.pt``,
        Lightning's ``.ckpt``, ``torch.save(optimizer.state_dict())``); returns the average.

        Every step that runs updates it once: not a step ``GradScaler`` skips (a fused
        optimizer's, run with ``found_inf`` set, is skipped on the device, no host sync), nor
        DCP's lr-0 step on an optimizer with no state. ``update()`` by hand then raises.
        ``optimizer.state_dict()[fastema.torch.ATTACH_KEY]`` is :meth:`state_dict` (read by
        ``torch.load(weights_only=True)``), restored exactly by ``optimizer.load_state_dict``
        (a float32 average of bfloat16 weights stays float32); a state dict without it starts
        the average over from the weights at the next step, with a warning. A sharded average
        (FSDP2, HSDP, tensor parallel) is kept in the per-parameter entries instead, as float32
        DTensors of the parameters' layout: DCP's ``get_state_dict`` / ``set_state_dict`` and
        ``dcp.save`` / ``dcp.async_save`` / ``dcp.load`` carry it (any world size or mesh;
        ``flatten_optimizer_state_dict=True`` too). A split average (``shard_replicas``) rides
        DCP as each rank's pieces; outside DCP it needs :meth:`gather_attached` on every rank
        before the save (the ``GatherAttached`` callbacks), else ``optimizer.state_dict()``
        raises. Refused: ZeRO partitions, a second average on one optimizer, an average of
        trainable parameters the optimizer does not step. See the attach guide."""
        if self._attachment is not None:
            raise ValueError(f"this {type(self).__name__} is attached to an optimizer already: detach() "
                             f"it first. For two optimizers (one per model part), make one average of "
                             f"each part and attach each to its optimizer")
        groups = [g for s in (self._avg, self._copy) if s is not None for g in s.layout.groups]
        skipping, joined = _skipping(self), Joined(self, self._side, self._avg, self._checkpoint)
        self._attachment = Attachment(joined, optimizer, compiled=self.compiled, skipping=skipping,
                                      restart=self._side.on_restart, sources=list(self._avg.sources),
                                      devices=sorted({g.device for g in groups}),
                                      cannot_skip=skip_refusal(skipping, self._core, self._avg))
        return self

    def detach(self) -> None:
        """Undo :meth:`attach`: the optimizer's hooks removed, ``update()`` by hand again. The
        average is kept; a no-op when not attached."""
        if self._attachment is not None:
            self._attachment.close()
            self._attachment = None

    def gather_attached(self) -> None:
        """An attached average split over replicas (``shard_replicas``): gather its whole state
        now, a collective every rank of its replica group joins, so that the next
        ``optimizer.state_dict()`` outside DCP (HF Trainer's and Lightning's, on the saving rank
        only, with no collective) holds it whole; the next step drops the copy. Call it on every
        rank after the last step before such a save. A no-op on an average that is not split."""
        if self._attachment is None:
            raise RuntimeError(f"gather_attached() on a {type(self).__name__} that is not attached "
                               f"to an optimizer: gathered_state_dict() gives its whole state")
        self._attachment.gather()

    @property
    def attached(self) -> torch.optim.Optimizer | None:
        """The optimizer this average is attached to (:meth:`attach`), or None."""
        return None if self._attachment is None else self._attachment.optimizer

    # ------------------------------------------------------------ swap and copy-out

    def swap(self, row: int = 0, *, allow_nonfinite: bool | None = None) -> None:
        """Put average ``row`` into the model in place; call again to put the raw weights back.

        In place with no model-sized temporary when the shadow keeps an exact swap (equal dtypes, or
        float32 shadow and bfloat16 weights). float16 weights with a float32 shadow are backed up once
        instead (a float16-sized buffer), so the float32 average is never rounded. Every tensor is
        checked before the first one is written, so a refused swap leaves the model and the averages
        as they were; an average holding inf or NaN is refused (:attr:`allow_nonfinite`; inside
        ``torch.compile`` the setting decides).
        """
        if torch.compiler.is_compiling():
            _compile.compiled_swap(self.compiled, row)
            return
        with self._checkpoint.nonfinite.allowing(allow_nonfinite):
            self._swap.swap(row)

    def average_parameters(self, row: int = 0, *,
                           allow_nonfinite: bool | None = None) -> ContextManager[nn.Module]:
        """``with ema.average_parameters(): evaluate(model)``: EMA weights in, raw weights back on exit
        (also when the block raises). Re-entrant: inside a block (or after ``swap()``) of the same
        row it leaves the weights as they are, and the outer one swaps back. Yields the model.

        Not inside ``torch.compile``: with ``fullgraph=True`` it is refused with that reason (a graph
        break otherwise, the block then runs eagerly). Call it around the compiled function. An
        average holding inf or NaN is refused as by :meth:`swap`."""
        if torch.compiler.is_compiling():         # traced: made eager there (torch._dynamo is loaded by then)
            return _compile.eager_block(self._swap, row, self.model)
        return self._checkpoint.nonfinite.entering(self._swap.block(row, self.model),
                                                   allow_nonfinite)

    def copy_to(self, model: nn.Module | None = None, row: int = 0, *,
                allow_nonfinite: bool | None = None) -> None:
        """Write average ``row`` into ``model`` (default: the tracked model), e.g. at the end of training.

        Another model must have the same names, shapes and dtypes (DDP / torch.compile wrappers are looked
        through); anything else raises before a tensor is written, and so does an average holding inf or NaN
        (:attr:`allow_nonfinite`); a Ctrl-C is held until all of it is in (its load hooks run as torch's load
        runs them: one that raises leaves the modules before it written). The tensors written get their autograd
        version bumped, as by torch's ``copy_``: a backward through a graph that saved the old weights raises."""
        if (model is None or model is self.model) and torch.compiler.is_compiling():
            written, read = self.compiled.ops["copy_to"]
            torch.ops.fastema.copy_to_(written, read, self.compiled.handle, row)
            return
        if model is None or model is self.model:
            with self._checkpoint.nonfinite.allowing(allow_nonfinite):
                self._swapper.copy_to(row)
            return
        if not isinstance(model, nn.Module):     # refused in the read's agreement: on every rank at once
            err = TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            with self._checkpoint.agreement.refusing(err):
                self.full_state_dict(row, allow_nonfinite=allow_nonfinite)
        target = unwrap(model)
        if self.sharded and not any(map(_sharded.is_dtensor, target.parameters())):
            state = self.full_state_dict(row, allow_nonfinite=allow_nonfinite)   # collective
        else:
            state = self.averaged_state_dict(row, allow_nonfinite=allow_nonfinite)
        load_into(target, state)

    def join(self) -> None:
        """Wait for the updates still running (``offload="cpu"``: the host folds) and re-raise an
        error of one; a no-op otherwise. Every read of the averages does it first."""
        self._avg.join()

    def memory(self, parts: bool = False) -> dict:
        """Bytes this rank's average holds, by device (``"cpu"``, ``"cuda:0"``...): the shadow rows (this
        rank's slice of them with ``shard_replicas``; in host memory with ``offload="cpu"``), the copied
        and integer buffers' copies, a swap's backup of the raw weights, an offloaded average's staging
        chunks and pinned host slots, the launch tables and the device plan. The model's own tensors are
        not counted. Sums to :attr:`nbytes`.

        Args:
            parts: give ``device -> {part: bytes}`` instead, the parts being ``"shadow"``, ``"copied
                buffers"``, ``"tables"``, ``"swap backup"``, ``"device plan"``, ``"staging chunks"`` and
                ``"pinned slots"`` (offload; ``"host slots"`` where a GPU's pipeline runs on the CPU)."""
        from .._placement.memory import memory

        return memory(self._side, self._plan_on_device, self._swapper.backup, parts)

    @property
    def nbytes(self) -> int:
        """Bytes this rank's average holds on every device together (see :meth:`memory`)."""
        return sum(self.memory().values())   # type: ignore[arg-type]

    @property
    def sharded(self) -> bool:
        """True when each rank averages a part of the model only: a tracked tensor is a DTensor (FSDP2,
        tensor parallel, HSDP), a ZeRO partition, or the average is split over replicas
        (``shard_replicas``). Exports then gather (a collective), and :meth:`state_dict` holds this
        rank's parts (DTensors; a split average's pieces)."""
        return bool(self._side.specs)

    @property
    def source(self) -> str:
        """What the averages read: ``"parameters"`` (the model's parameters, or their local shards or
        partitions), or, for ``EMA(engine)`` of a DeepSpeed engine whose optimizer keeps float32
        masters, those masters, flat and shard-local: ``"deepspeed-zero3-fp32-masters"``,
        ``"deepspeed-zero2-fp32-masters"`` (ZeRO-1/2) or ``"deepspeed-bf16-fp32-masters"``
        (``BF16_Optimizer``); with ``offload="cpu"`` and masters in host memory (ZeRO-Offload), read in
        place by the host folds, the same name ending in ``"-in-host-memory"``. See the large-models guide."""
        masters = self._side.masters
        if masters is None:
            return _deepspeed.PARAMETERS
        return masters.source + (_deepspeed.IN_HOST_MEMORY if self._avg.in_place else "")

    # ------------------------------------------------------------ export and checkpoints (the checkpoint side)

    def averaged_state_dict(self, row: int = 0, *,
                            allow_nonfinite: bool | None = None) -> dict[str, torch.Tensor]:
        """A model-style state dict of the averaged weights (the model's dtypes, names and layouts;
        DDP / torch.compile prefixes stripped): what ``model.load_state_dict`` takes. Every name of
        a tied or aliased tensor gets its average; a module's extra state that is not a tensor
        (``get_extra_state()``'s dict) is as ``model.state_dict()`` gives it. An average holding inf
        or NaN is refused (:attr:`allow_nonfinite`; on a sharded average the ranks agree on it: a
        collective)."""
        with self._checkpoint.nonfinite.allowing(allow_nonfinite):
            return self._checkpoint.averaged_state_dict(row)

    def full_state_dict(self, row: int = 0, rank0_only: bool = False, *,
                        allow_nonfinite: bool | None = None) -> dict[str, torch.Tensor]:
        """:meth:`averaged_state_dict` with full tensors: what an unsharded model's ``load_state_dict``
        takes. On a sharded average this is a collective (every rank must call it): each tensor is
        gathered in turn (``DTensor.full_tensor()``; split over replicas: a ``ShardReplicas(bucket=)`` at a
        time), so at most one full tensor (and one bucket) is in flight beyond what is kept.
        ``rank0_only=True``: only the first rank of the average's group keeps them (its mesh's
        first rank; global rank 0 for an average over every rank), the other ranks get ``{}``. On a split
        or sharded average the ranks agree first: a rank that skipped an ``update()`` or refuses makes
        every rank raise (see the large-models guide). An average holding inf or NaN is refused
        (:attr:`allow_nonfinite`)."""
        with self._checkpoint.nonfinite.allowing(allow_nonfinite):
            return self._checkpoint.full_state_dict(row, rank0_only)

    def iter_weights(self, row: int = 0, *, dtype: torch.dtype | None = None, bucket_bytes: int = DEFAULT_BUCKET,
                     to: Ranks = "all") -> Stream:
        """Average ``row`` streamed out as ``(name, tensor)``, in the model's ``state_dict()`` order
        (the names of :meth:`full_state_dict`), for engines that load weights from a stream (vLLM's
        ``load_weights`` / ``WeightSource``, SGLang's buckets) with bounded memory.

        Every tensor is a fresh full tensor of its own (never a view that a later swap, update or
        export overwrites), equal to ``full_state_dict(row)[name].to(dtype)`` bit for bit, on the
        model's device. A tied tensor (several names of one tensor) is yielded once, under its first
        name (:meth:`weights_metadata` lists the same names); tensors not averaged (``exclude=``,
        integer buffers) are the model's values, as in :meth:`full_state_dict`. Tensors only: a
        module's extra state that is not a tensor (``get_extra_state()``'s dict or int) is left out
        here and in :meth:`weights_metadata`.

        On a split average (``shard_replicas``) the tensors are read bucket by bucket: each rank's
        pieces, in this order, cut into buckets of at most ``bucket_bytes``, one broadcast from the
        rank holding a bucket, each full tensor made as its buckets come, so streaming adds one
        bucket and the largest tensor (HSDP: then one ``full_tensor()`` per parameter over the shard
        dimension). Sharded tensors (FSDP2, tensor parallel, ZeRO) are gathered one ``full_tensor()``
        each; an offloaded average is brought to the device as it is read.

        **A collective where the average is sharded or split**: every rank must call it and iterate
        it, in step (the ranks not in ``to`` get an iterator that yields nothing, and iterate it
        too). A stream closed early (a ``break``, a consumer that raises, an iterator dropped or
        ``close()``-d) reads the rest of its collectives without yielding, so the other ranks finish
        and the next read works; the consumer's exception is unchanged. A stream held, not iterated
        and not closed leaves the other ranks waiting. The ranks agree at the call: a rank that
        skipped an ``update()``, makes another read, refuses, or passes other arguments makes every
        rank raise the same error, never a hang. A stream is of one state: an ``update()`` or
        ``swap()`` before it is consumed makes its next step raise. Refused while the average is
        swapped in. ``update()`` stays free of collectives.

        Args:
            row: which average (several decays; BEMA's output is row 0).
            dtype: the wire dtype every floating tensor is cast to (None: the model's dtypes);
                integer tensors are never cast.
            bucket_bytes: the bytes one bucket of a split average holds at most (at least 16; a
                larger tensor spans several).
            to: which global ranks receive: ``"all"``, one rank, or a collection of ranks.
        """
        read = Read("iter_weights()", row=row)
        return average_stream(self._checkpoint, read, dtype, bucket_bytes, to)

    def weights_metadata(self, row: int = 0, *, dtype: torch.dtype | None = None) -> list[WeightMeta]:
        """``WeightMeta(name, dtype, shape)`` of every tensor :meth:`iter_weights` yields, in its order:
        global names, full shapes, wire dtypes, for engines that allocate before receiving. Reads the
        model only: no gather, no collective (any rank may call it alone)."""
        return average_meta(self._checkpoint, row, dtype)

    def module(self, row: int = 0) -> nn.Module:
        """A standalone copy of the model holding the averaged weights (for export or another process)."""
        return self._checkpoint.module(row)

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: averages keyed by name, counters, settings.

        The tensors are copies in host memory (a staging copy of the shadow, made here: one
        shadow's worth of host RAM, none on the GPU, while the dict is held). For a GPU shadow that is
        one copy of each flat shadow buffer in pinned memory (one device-to-host copy at full speed;
        torch's host allocator keeps the pinned block for the next call), and the entries are views of
        it (``torch.save`` writes each buffer's storage once); for a CPU shadow, a copy of each
        tensor. On a sharded average they are DTensors over this rank's copies, laid out as the
        parameters are (``(rows, *shape)``, the parameter's shard dims moved up by one): the average
        is a ``torch.distributed.checkpoint`` ``Stateful``, and ``dcp.save({"ema": ema})`` /
        ``dcp.load({"ema": ema})`` work on any world size or mesh. ``dcp.load`` fills these copies,
        never the shadow: :meth:`load_state_dict` copies them in only once every check has passed on
        every rank, so a refused or failed load (NaN averages, a truncated shard) changes nothing.
        """
        return self._checkpoint.state_dict()

    def gathered_state_dict(self) -> dict:
        """:meth:`state_dict` with every entry a full tensor: what one rank writes as a whole
        checkpoint of a split average (Lightning's, which rank 0 saves with ``torch.save``), and
        :meth:`load_state_dict` cuts again on any number of ranks, split or not. On a split average
        (:attr:`split`) it is a collective: every rank of the replica group calls it, after they
        agree. Entries that are not a split's pieces are :meth:`state_dict`'s as they are (a sharded
        average's DTensors)."""
        return self._checkpoint.state_dict(gathered=True)

    def load_state_dict(self, state: dict, strict: bool = True, *,
                        allow_nonfinite: bool | None = None) -> None:
        """Restore :meth:`state_dict`: checks everything first, changes nothing if anything is off.
        An average holding inf or NaN is refused, naming its tensors, unless allowed
        (:attr:`allow_nonfinite`: then loaded with a warning; see :meth:`repair_nonfinite`)."""
        with self._checkpoint.nonfinite.allowing(allow_nonfinite):
            self._checkpoint.load_state_dict(state, strict)

    def refuse_on_every_rank(self, err: BaseException) -> None:
        """This rank cannot read the state it would load (its file is missing or damaged: ``err``)
        while the other ranks of a split or sharded average load theirs: join the load's agreement
        refusing, so every rank raises at once, naming this rank and ``err`` (never a hang); raises
        ``err`` here. The other ranks' :meth:`load_state_dict` raise a ``Disagreement`` (a
        ``ValueError``) and load nothing."""
        self._checkpoint.join_refusing(err)

    def save(self, path: str | os.PathLike, row: int = 0, *,
             allow_nonfinite: bool | None = None) -> None:
        """Write the averaged weights as a model checkpoint, atomically (temporary file, then rename).

        ``model.load_state_dict(torch.load(path))`` loads it. Both formats are streamed: each tensor
        is converted to the model's dtype and copied to the host in turn, so peak memory is one
        tensor. A ``.safetensors`` path is read by ``safetensors.torch.load_file``; any other path
        gets ``torch.save``'s format (the file ``torch.save`` writes of the host copies, written by
        torch's own serializer, each record from its tensor as it is written), with a module's extra
        state that is not a tensor as ``model.state_dict()`` gives it (refused by name for a
        ``.safetensors`` path). The file gets the mode ``torch.save`` would give it (0666 less the
        umask); temporary files left by a save that was killed are removed by the next save to the
        same path. A path that is a symbolic link is replaced by the file (``torch.save`` writes
        through it): its target is left as it was. On a sharded average it is a collective: every
        rank gathers the full tensors one at a time (see :meth:`full_state_dict`), the first rank of
        the average's group (global rank 0 for an average over every rank) keeps host copies of them
        (the full model in its host memory) and writes the file. An average holding inf or NaN is
        refused (:attr:`allow_nonfinite`).
        """
        with self._checkpoint.nonfinite.allowing(allow_nonfinite):
            self._checkpoint.save(path, row)

    def export_peft(self, directory: str | os.PathLike, row: int = 0, *, adapter_name: str | None = None,
                    save_embedding_layers: bool | Literal["auto"] = "auto",
                    allow_nonfinite: bool | None = None) -> None:
        """Write the averaged adapter in PEFT's own format, for ``PeftModel.from_pretrained(base, directory)``.

        ``directory/adapter_model.safetensors`` holds average ``row`` of the adapter's tensors under
        the keys ``peft.get_peft_model_state_dict`` gives them (the adapter's name removed), in the
        model's dtypes; ``directory/adapter_config.json`` is the adapter's config as
        ``PeftModel.save_pretrained`` writes it (``inference_mode`` true, the base model's name
        filled in). Each file is written atomically; the directory is made if needed. The model's
        tensors and the average are not changed.

        Args:
            directory: where to write the two files (other files there are left alone).
            row: which average (several decays; BEMA's output is row 0).
            adapter_name: the adapter to write; default the active one.
            save_embedding_layers: as in ``PeftModel.save_pretrained`` (``"auto"``: embedding layers
                only when the adapter targets them).
            allow_nonfinite: write an average holding inf or NaN (None: :attr:`allow_nonfinite`).

        Raises:
            TypeError: the model is not a PEFT model (nothing is written).
            ValueError: the adapter is unknown, or this average does not hold every tensor of it
                (made with it frozen, or ``exclude=``-d), or holds inf or NaN; nothing is written.
            ImportError: peft is not installed.
        """
        with self._checkpoint.nonfinite.allowing(allow_nonfinite):
            export_peft(self._checkpoint, directory, row, adapter_name=adapter_name,
                        save_embedding_layers=save_embedding_layers)


def _skipping(face: TorchAverage):
    """The face's update behind device-side skip flags (``_skipping_update``), where the class of
    its eager update defines one (a subclass changing the update, PostHocEMA's snapshots: none)."""
    klass = next(k for k in type(face).__mro__ if "_eager_update" in vars(k))
    return face._skipping_update if "_skipping_update" in vars(klass) else None   # type: ignore
