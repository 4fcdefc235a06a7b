"""``fastema.torch.PostHocEMA``: EDM2 power-function profiles of a model tracked in one pass, with
the snapshots that :mod:`fastema.posthoc` synthesises other profiles from."""
from __future__ import annotations

import difflib
import errno as _errno
import functools
import inspect
import numbers
import os
from typing import Iterable, Sequence

import torch
from torch import nn

from ..posthoc import (
    MAX_ERROR,
    SnapshotError,
    SnapshotMeta,
    SynthesisPlan,
    add_kept,
    check_folder,
    kept_key,
    profile_key,
    synthesize,
    write_snapshot,
)
from ..schedules import PowerFunction, gamma_to_sigma_rel, sigma_rel_to_gamma
from ._sharding import params as _sharded
from ._state.agree import Read
from ._state.decisions import decided, findings, refuse_together
from ._state.run import Run
from ._state.slices import tensor_slices
from ._state.stream import (
    DEFAULT_BUCKET,
    Ranks,
    Stream,
    WeightMeta,
    check_stream,
    receives,
    synthesized_meta,
    synthesized_stream,
)
from ._tensors.hooks import unwrap
from .ema import EMA, ema_parts

__all__ = ["PostHocEMA"]

_SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_OPTIONS = set(inspect.signature(ema_parts).parameters) - {"model", "decay", "kind", "run",
                                                          "lowered"}
"""The keywords :class:`PostHocEMA` hands to the EMA it is (``ema_parts``'s public options)."""


class PostHocEMA(EMA):
    """Power-function EMA profiles (EDM2) of a model, tracked in one pass, with snapshots that
    let any other profile be synthesised after training (:mod:`fastema.posthoc`).

    ``PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=N, path=DIR)`` keeps one shadow
    row per profile in one flat buffer per (device, dtype) group: each ``update()`` is one
    kernel launch per group that reads the weights once and updates every profile, with the
    exact Delta-t weights (:class:`fastema.schedules.PowerFunction`), so ``update_every=k``
    or irregular ``update(step=)`` realise the requested profiles. Every ``snapshot_every``
    updates, :meth:`snapshot` writes every profile to ``DIR/snapshot-<time>.safetensors``
    atomically (temporary file, then rename), with the run id, the time, the profiles and every
    tensor's shape and checksum in its metadata. ``update()`` inside ``torch.compile`` (one
    operator, no graph break) writes them too; CUDA graph replays run no Python, so call
    ``snapshot()`` between replays there.

    One folder holds one run. Each PostHocEMA is a run with a random id (:attr:`run_id`), kept in
    its checkpoint (:meth:`state_dict`): :meth:`load_state_dict` takes the checkpoint's id, so a
    resumed run goes on writing into its folder (a fastema 0.1 checkpoint, which has none, goes
    on beside its version-1 snapshots as the legacy run). The folder is checked at the first
    ``update()`` and before every snapshot, before anything is applied or written: another run's
    snapshots or claim, this run's claim from another process still running on this host (a
    second process of one run, such as an evaluation job that loaded the training checkpoint
    with the same ``path``: give it another folder), version-1 snapshots (unless resuming a 0.1
    checkpoint), and files named like snapshots that are not readable regular files are refused
    with a ``ValueError`` naming them and the fix. Before its first snapshot the run claims the
    folder (``DIR/.fastema-run``, created exclusively; a stale claim is taken over exclusively),
    so of two runs started on one folder the second is refused before it writes. This run's own
    snapshots later than its time, left by the trajectory after the
    checkpoint it resumed from (a preemption), are moved into ``DIR/superseded-<time>/`` (not read
    by synthesis) with a warning naming them, and the run goes on. See
    ``fastema.posthoc.check_folder``.

    A snapshot that cannot be written (a full disk, a file size limit, the folder gone, values
    beyond ``snapshot_dtype``'s range) raises :class:`fastema.posthoc.SnapshotError` (an
    ``OSError``) from ``update()`` *after* the update was applied and counted: do not repeat the
    update. The snapshot stays due, and the next ``update()`` writes one (or call :meth:`snapshot`);
    ``state_dict()`` keeps it due (``"due_snapshot"``), so a run resumed by ``load_state_dict()``
    writes it at its next update (``dcp.load`` fills a template of the keys every file has: not it).

    Args:
        model: as :class:`EMA`.
        sigma_rels: the tracked relative widths (1 to 8; EDM2 tracks 0.05 and 0.10).
        snapshot_every: updates between snapshots (``None``: only explicit :meth:`snapshot` calls).
        path: the snapshot directory (created): one run's snapshots.
        update_every: update on every k-th call; the profiles stay exact.
        snapshot_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (EDM2 stores
            float16: half the disk, ~1e-3 relative rounding per snapshot; weights beyond +-65504
            are refused at the snapshot, naming the tensor).
        **kwargs: other :class:`EMA` options (``buffers``, ``exclude``, ``trainable_only``,
            ``shadow_dtype``, ...). A PEFT model's snapshots hold its adapters only (see
            ``trainable_only``).

    Sharded models (FSDP2, tensor parallel, HSDP): each rank tracks its own shards (no
    collective per update); every snapshot is a collective DCP save of the ranks' shards (see
    :meth:`snapshot`), which every rank's ``update()`` reaches at the same update. DeepSpeed
    ZeRO-3 (``PostHocEMA(engine, ...)``) too: its partitions are saved flat, with the full
    shapes in the metadata, and synthesised in those shapes. Split over data-parallel replicas
    (``shard_replicas=True``, see :class:`EMA`): each rank tracks its slice of every profile, and
    a snapshot is the same collective DCP save, each rank writing the pieces it holds (no
    gather); the synthesis reads them all.

    ``swap()``, ``copy_to()``, ``averaged_state_dict()`` take ``row=k`` for profile ``k``;
    :meth:`synthesize` gives any other.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10), *,
                 snapshot_every: int | None, path: str | os.PathLike, update_every: int = 1,
                 snapshot_dtype: str = "float32", **kwargs):
        if "decay" in kwargs:
            raise TypeError("PostHocEMA tracks the profiles sigma_rels=; it takes no decay=")
        if "offload" in kwargs:
            raise TypeError("PostHocEMA takes no offload=: it keeps its profiles on the weights' "
                            "device. For an average held in host memory, use "
                            "EMA(model, decay, offload='cpu')")
        if unknown := sorted(set(kwargs) - _OPTIONS):
            own = set(inspect.signature(PostHocEMA.__init__).parameters)
            own -= {"self", "model", "kwargs"}
            names = sorted(_OPTIONS - {"offload"} | own)
            near = difflib.get_close_matches(unknown[0], names, 1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TypeError(f"PostHocEMA() got an unexpected keyword argument {unknown[0]!r}{hint}")
        if isinstance(sigma_rels, numbers.Real):
            sigma_rels = (float(sigma_rels),)
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
            raise TypeError(f"sigma_rels must be a number or a sequence of numbers (the profiles' "
                            f"widths, such as (0.05, 0.10)), got {type(sigma_rels).__name__} "
                            f"{sigma_rels!r}")
        sigma_rels = tuple(sigma_rels)
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must differ from each other, got {sigma_rels}")
        if snapshot_every is not None and (isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int)
                                           or snapshot_every < 1):
            raise ValueError(f"snapshot_every must be an int >= 1 or None, got {snapshot_every!r}")
        if snapshot_dtype not in _SNAPSHOT_DTYPES:
            raise ValueError(f"snapshot_dtype must be one of {sorted(_SNAPSHOT_DTYPES)}, got {snapshot_dtype!r}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"path={os.fspath(path)!r} is a file: PostHocEMA writes "
                                     f"its snapshots into a folder (made if missing); pass a "
                                     f"folder's path")
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.path = os.fspath(path)
        self._seen: dict = {}                    # check_folder's cache of the folder's files
        profiles = [PowerFunction.of(s) for s in sigma_rels]
        parts = ema_parts(model, profiles, kind=type(self).__name__, update_every=update_every,
                          run=functools.partial(Run, given=sigma_rels), **kwargs)
        run = parts.checkpoint.core              # the engine's checkpoint, and this run's id
        assert isinstance(run, Run)
        self._run = run                          # this run: its id, folder checked, snapshot due
        self._from_parts(parts)
        self._check_storable()
        os.makedirs(self.path, exist_ok=True)

    @property
    def run_id(self) -> str:
        """This run's id: its snapshots carry it; a resume (:meth:`load_state_dict`) takes the checkpoint's.
        On a sharded or split model every rank takes rank 0's at the first update (and after a load)."""
        return self._run.id

    @property
    def gammas(self) -> list[float]:
        """The tracked profiles' exponents, one per row: the plan's schedules' (what the rows hold)."""
        return self._run.gammas

    @property
    def sigma_rels(self) -> tuple:
        """The tracked relative widths, one per row (as given; the plan's schedules hold them)."""
        return self._run.sigma_rels

    def _check_storable(self) -> None:
        """Refuse, at construction, model tensors no snapshot can store (sparse, quantized): every
        snapshot would fail on them. Other dtypes safetensors has no name for (complex, uint16, ...)
        are stored as their bytes."""
        bad = [f"{n} ({t.layout}, {t.dtype})" if isinstance(t, torch.Tensor) else f"{n} (a {type(t).__name__}: "
               f"a module's get_extra_state())" for n, t in unwrap(self.model).state_dict(keep_vars=True).items()
               if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_quantized]
        if bad:
            raise TypeError(f"PostHocEMA cannot store {', '.join(bad[:3])} in its snapshots (a snapshot holds dense "
                            f"tensors); keep such entries out of the model's state_dict (a plain attribute, a "
                            f"non-persistent buffer, extra state as a tensor), or average with EMA")

    # ------------------------------------------------------------ updates and snapshots

    def _eager_update(self, step: int | None, skip_if: dict | None = None) -> None:
        if skip_if is not None:         # attach() refuses a PostHocEMA on a skipping step's optimizer
            raise ValueError("PostHocEMA cannot skip a step on the device: it writes snapshots on the host")
        # The eager update, and a snapshot when one is due (or a missed one is still due). Inside
        # torch.compile the fastema::update_ operator runs this at every call of the compiled code,
        # so snapshots need no graph break. The folder is checked before the update, so a refused
        # folder changes nothing; a snapshot that cannot be written is reported after the update.
        due = self.plan.cadence.due()
        n = self.plan.updates + 1
        every = self.snapshot_every
        writes = due and (self._run.due is not None or (every is not None and n % every == 0))
        if writes or not self._run.checked:
            self._check_folder(writing=writes, stacklevel=3)     # the warnings point at update()'s caller
        before = self.plan.updates
        super()._eager_update(step)
        n = self.plan.updates
        if n == before or not writes or self.plan.last_time <= 0:   # time 0: see snapshot()
            return
        if self._run.due is None:
            self._run.due = (self.plan.last_time, n)
        self._write(applied=True)

    def _check_folder(self, writing: bool, stacklevel: int) -> None:
        """ValueError when this run may not write into its folder (see ``fastema.posthoc.check_folder``:
        it also moves this run's superseded snapshots aside and, before a write, claims the folder);
        on a sharded model rank 0 looks (and moves, and claims) and every rank raises (a collective)."""
        problem = None
        rank0 = not self.sharded or torch.distributed.get_rank() == 0
        if rank0:
            problem = check_folder(self.path, self.run_id, self.plan.last_time, self._seen, writing=writing,
                                   stacklevel=stacklevel + 1)
        if self.sharded:      # and rank 0's run id: each rank made its own, and DCP saves one
            found = findings((problem, self.run_id))    # rank's record (any), which rank 0 must
            self._run.id = str(found[0][1])              # find again
            refuse_together(f"{type(self).__name__}'s snapshot folder", [f[0] for f in found],
                            ValueError)
        if problem is not None:
            raise ValueError(problem)
        self._run.checked = True

    def snapshot(self) -> str:
        """Write every profile, as of the last update, to ``path``; returns the snapshot's path.

        Blocks until the snapshot is on disk (a device-to-host copy of every profile, one tensor
        at a time: host memory holds one tensor, not the snapshot): call it between steps, every
        few thousand steps as EDM2 does. On a sharded model (FSDP2, tensor
        parallel) it is a collective: one DCP checkpoint ``DIR/snapshot-<time>/`` written by
        every rank from its own shards (no gather), then ``DIR/snapshot-<time>.json`` with the
        metadata, written last by rank 0: a snapshot without it is incomplete and never read.

        Raises:
            ValueError: the folder holds what this run may not write beside (see the class
                docstring); nothing was written.
            SnapshotError: the snapshot could not be written (``applied=False``; nothing was
                counted); a snapshot stays due, written at the next ``update()``.
        """
        self._swap.refuse("snapshot()")
        self._core.plan_now(replayed=True)      # the time CUDA graph replays counted on the device
        if self.plan.updates == 0:
            raise RuntimeError("PostHocEMA.snapshot() before any update(): there is no profile to store yet")
        if self.plan.last_time <= 0:             # the cadence's writes skip it too
            raise RuntimeError("PostHocEMA.snapshot() at time 0 (the last update(step=0)): every "
                               "profile of time 0 is the weights it began from, which synthesis "
                               "cannot use (a stored profile's time is > 0); take it after an update "
                               "at a later step")
        self._check_folder(writing=True, stacklevel=2)
        return self._write(applied=False)

    def _write(self, applied: bool) -> str:
        """Write the snapshot of now; clears a due one. A failed write raises SnapshotError saying
        whether the update was applied, and keeps a snapshot due."""
        time, n = self.plan.last_time, self.plan.updates
        try:
            path = self._write_snapshot()
        except (OSError, OverflowError) as err:
            if applied and self._run.due is None:
                self._run.due = (time, n)
            raise SnapshotError(self._lost(err, time, n, applied), time=time, updates=n, applied=applied,
                                errno=getattr(err, "errno", None) or (None if isinstance(err, OverflowError)
                                                                      else _errno.EIO)) from err
        self._run.due = None
        return path

    def _lost(self, err: BaseException, time: float, n: int, applied: bool) -> str:
        if isinstance(err, OverflowError):
            reason = (f"{err}; make the PostHocEMA with snapshot_dtype='float32' (or 'bfloat16'), which holds "
                      f"these values")
        else:
            reason = str(err)
        first = (f"update {n} was applied and counted; do not repeat it. " if applied else "")
        since = ""
        if self._run.due is not None and self._run.due[0] != time:
            since = f" (due since time {self._run.due[0]:g}, update {self._run.due[1]})"
        retry = ("It is retried at the next update() (or call snapshot())" if applied or self._run.due is not None
                 else "Nothing was counted; call snapshot() again once it can be written")
        return f"{first}The snapshot at time {time:g}{since} was not written to {self.path!r}: {reason}. {retry}."

    def _write_snapshot(self) -> str:
        dtype = _SNAPSHOT_DTYPES[self.snapshot_dtype]
        tensors, averaged, others, shapes = {}, [], [], {}
        raw: dict[str, str] = {}          # kept tensors stored as their bytes (add_kept)
        overflow: list[str] = []
        sharded, specs = self.sharded, self._side.specs
        # a DCP save: the slices agree, each rank's casts made inside (what can fail on one rank)
        with self._checkpoint.agreement.agreed(Read("snapshot()"), gathers=sharded):
            entries = self._checkpoint.entries(0)
            for name, t, source, value in entries:  # one walk and check for every row
                if source is None or source not in self._avg.names:
                    kept = t.detach() if value is None else value()
                    shapes[name] = list(kept.shape)
                    if sharded:
                        tensors[kept_key(name)] = kept
                    else:  # complex, uint16, float8...: as their bytes
                        add_kept(tensors, raw, name, kept)
                    others.append(name)
                    continue
                averaged.append(name)
                # ZeRO-3: saved flat
                shapes[name] = list(t.ds_shape) if hasattr(t, "ds_shape") else list(t.shape)
                for k in range(self.plan.rows):
                    v = self._avg.view(source, k)
                    if sharded:  # DCP reads the shards in place (a copy only to cast)
                        cast = v.to(dtype)
                        beyond = ~torch.isfinite(cast) & torch.isfinite(v)
                        if cast.dtype != v.dtype and bool(beyond.any()):
                            overflow.append(profile_key(k, name))
                        spec = specs.get(source)
                        key = profile_key(k, name)
                        if spec is not None and spec.slices:     # split: this rank's pieces
                            tensors[key] = tensor_slices(cast, spec)
                        else:
                            tensors[key] = cast if spec is None else _sharded.wrap(cast, spec)
                    else:  # streamed to the file a tensor at a time (refused beyond dtype)
                        tensors[profile_key(k, name)] = (v, dtype)
        if sharded:  # every rank refuses, or none (a collective)
            names = sorted({key for keys in findings(overflow) for key in keys})
            if names:
                raise OverflowError(f"{', '.join(names[:3])} hold(s) finite values beyond the range of "
                                    f"{self.snapshot_dtype} (+-{torch.finfo(dtype).max:g}), which would be stored "
                                    f"as inf")
        time = self.plan.last_time
        schedules = self.plan.schedules                   # the rows' profiles: the one source of truth
        meta = SnapshotMeta(time=time, updates=self.plan.updates, calls=self.plan.calls,
                            gammas=[float(s.gamma) for s in schedules],
                            sigma_rels=[gamma_to_sigma_rel(s.gamma) for s in schedules], averaged=averaged,
                            others=others, dtype=self.snapshot_dtype, shapes=shapes, run_id=self.run_id, raw=raw)
        decide = functools.partial(decided, "the DCP snapshot", error=OSError) if sharded else None
        return write_snapshot(self.path, time, tensors, meta, sharded=sharded, decide=decide)

    # ------------------------------------------------------------ synthesis

    def synthesize(self, sigma_rel: float | None = None, *, gamma: float | None = None, time: float | None = None,
                   max_error: float = MAX_ERROR, into: nn.Module | None = None, dtype=None):
        """The average of profile ``sigma_rel`` (or ``gamma``) at ``time`` (default: the last
        snapshot's) from the snapshots written so far: see :func:`fastema.posthoc.synthesize`.
        ``into`` may be DDP- or torch.compile-wrapped (the names are the inner model's)."""
        return synthesize(self.path, sigma_rel, gamma=gamma, time=time, max_error=max_error,
                          into=None if into is None else unwrap(into), dtype=dtype)

    def iter_weights(self, sigma_rel: float | None = None, *, gamma: float | None = None,  # type: ignore[override]
                     time: float | None = None, max_error: float = MAX_ERROR, row: int | None = None,
                     dtype: torch.dtype | None = None, bucket_bytes: int = DEFAULT_BUCKET,
                     to: Ranks = "all") -> Stream:
        """The synthesised average of ``sigma_rel`` (or ``gamma``) at ``time`` streamed out as ``(name,
        tensor)`` in the model's ``state_dict()`` order: :meth:`synthesize`'s tensors (its arguments and
        checks; averaged tensors in ``dtype``, default float32), each tied tensor once (its first name),
        every floating tensor in ``dtype`` when given, fresh host tensors handed over as they are
        yielded. ``row=k`` instead streams tracked profile ``k`` as :meth:`EMA.iter_weights` does.

        The synthesis reads the snapshots on each rank of ``to`` (no collective; the other ranks read
        nothing and get an empty iterator) and combines one tensor at a time as the stream reaches it
        (:func:`fastema.posthoc.synthesize_iter`): host memory holds one tensor's float64 sum, the
        profile being added and the tensor yielded, never the whole average, plus each snapshot's
        reader until the stream ends (a file descriptor, read with ``pread``, never mapped; a DCP
        snapshot's metadata). The arguments, the folder and the solution are refused at the call,
        before the first tensor; a profile holding inf or NaN, a result beyond ``dtype``'s range or a
        damaged tensor (a snapshot truncated or rewritten in place while it is streamed: a
        ValueError naming it) raises when the stream reaches it, after the tensors before it were
        yielded: the consumer then holds part of a model, and should load a whole one again."""
        if row is not None:
            if sigma_rel is not None or gamma is not None or time is not None:
                raise ValueError("give row= (a tracked profile) or sigma_rel= / gamma= (a synthesised one), not both")
            return super().iter_weights(row, dtype=dtype, bucket_bytes=bucket_bytes, to=to)
        if not receives(check_stream(dtype, bucket_bytes, to)):
            return iter(())
        plan = SynthesisPlan(self.path, sigma_rel, gamma, time, max_error, dtype)   # refuses now, not when read
        return synthesized_stream(self.model, plan, dtype)

    def weights_metadata(self, sigma_rel: float | None = None, *,  # type: ignore[override]
                         gamma: float | None = None, row: int | None = None,
                         dtype: torch.dtype | None = None) -> list[WeightMeta]:
        """``WeightMeta(name, dtype, shape)`` of what :meth:`iter_weights` yields for the same arguments,
        from the model alone (no snapshot read, no collective); ``sigma_rel`` / ``gamma`` name the
        profile only for symmetry (every profile has the same tensors)."""
        if row is not None:
            if sigma_rel is not None or gamma is not None:
                raise ValueError("give row= (a tracked profile) or sigma_rel= / gamma= (a synthesised one), not both")
            return super().weights_metadata(row, dtype=dtype)
        if sigma_rel is None and gamma is None:                 # what iter_weights() would refuse, refused here
            raise ValueError("give sigma_rel= or gamma= (the profile to synthesise), or row= (a tracked profile)")
        if sigma_rel is not None:          # (an engine allocates from the metadata before it iterates)
            sigma_rel_to_gamma(sigma_rel)
        if gamma is not None:
            gamma_to_sigma_rel(gamma)
        return synthesized_meta(self._checkpoint, dtype)

    def __repr__(self) -> str:
        return (f"PostHocEMA(sigma_rels={self.sigma_rels}, updates={self.updates}, snapshot_every="
                f"{self.snapshot_every}, path={self.path!r}, run_id={self.run_id!r}, shadow={self._avg!r})")

