"""The one place a torch face's shadow is chosen: :func:`make_shadow`, and the two placement
options it reads, :class:`Offload` (``offload=``) and :class:`ShardReplicas` (``shard_replicas=``),
each carrying its own byte-size tunable.

A shadow is a *storage*, optionally wrapped by a *split*: the two compose, no class combines them.

=====================================  ==========================================================
storage (where the rows live)          class
=====================================  ==========================================================
device rows (EMA rows, a cumulative    :class:`fastema.FlatShadow`
mean)
device rows, a window and its ring     :class:`fastema.WindowShadow`
``offload="cpu"``: staged host rows    :class:`.offload.OffloadedShadow` (host memory, two chunks)
``offload="cpu"``, host masters        :class:`.host_masters.HostMastersShadow` (read in place)
=====================================  ==========================================================

``shard_replicas`` wraps the storage, made with this rank's slice (``split=``), in
:class:`.split.Split` (a window's: :class:`.split.SplitWindow`); the replicas are found, and checked
alike with one collective, by :func:`.replicas.found_replicas`. What each can do is declared on it
(:class:`fastema._shadow.Capabilities`), and :func:`make_shadow`'s return type holds every class to
the shadow protocols when mypy runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, overload

from ... import _backends
from ..._shadow import AveragingShadow, WindowingShadow
from ...flat import FlatShadow
from ...flat_window import WindowShadow
from .._sharding import params as _sharded
from . import gather, replicas
from .host_masters import HostMastersShadow, hook_of
from .offload import OffloadedShadow
from .offload_ring import DEFAULT_CHUNK, check_chunk
from .split import Split, SplitWindow, split_of

__all__ = ["Offload", "Placement", "ShardReplicas", "Window", "make_shadow"]


@dataclass(frozen=True)
class Offload:
    """``offload=Offload(chunk=...)``: keep the average in host memory (``offload="cpu"`` is
    ``Offload()``), fed through two staging chunks of ``chunk`` bytes on the weights' device (the
    memory that device keeps for the average, twice this, and the unit of the pipeline: smaller
    means less memory and more launches)."""

    chunk: int = DEFAULT_CHUNK
    device: str = "cpu"

    def __post_init__(self):
        if self.device != "cpu":
            raise ValueError(f"Offload(device=...) keeps the average in host memory: device='cpu', got "
                             f"{self.device!r}")
        check_chunk(self.chunk)

    def shadow(self, sources: dict, *, rows: int, dtype: str) -> OffloadedShadow:
        """The host shadow this placement keeps, of ``sources`` (``name -> tensor``), ``rows`` rows of
        ``dtype``: what ``EMA(offload=...)`` updates, for an integration that works its weights out
        itself (``update_checked``, ``view``: ``fastema.torchtitan``'s ``offload_to_cpu``)."""
        return OffloadedShadow(sources, rows=rows, dtype=dtype, chunk=self.chunk)


@dataclass(frozen=True)
class ShardReplicas:
    """``shard_replicas=ShardReplicas(group, bucket=...)``: split the average over the ranks that
    hold replicas of the model (``group``: ``True`` finds them, as ``shard_replicas=True`` does; or
    a ``ProcessGroup``, or a 1-D ``DeviceMesh``), reading it through gathers of ``bucket`` bytes, all
    ranks' parts together (the extra memory a read needs: the bucket, plus this rank's slice of the
    raw weights during a swap)."""

    group: Any = True
    bucket: int = replicas.DEFAULT_BUCKET

    def __post_init__(self):
        if self.group is False or self.group is None:
            raise ValueError("ShardReplicas(group=...) takes True, a ProcessGroup or a 1-D DeviceMesh; to keep the "
                             "average whole, pass shard_replicas=False")
        replicas.check_bucket(self.bucket)


class Window(NamedTuple):
    """A window average's shadow: ``size`` snapshots kept in a ring of ``ring_dtype``."""
    size: int
    ring_dtype: str


class Placement(NamedTuple):
    """Where an average lives: in host memory or not, split over replicas or not."""
    offload: Offload | None = None
    replicas: ShardReplicas | None = None

    @classmethod
    def of(cls, offload: Any = None, shard_replicas: Any = False) -> "Placement":
        """The placement of a face's ``offload=`` and ``shard_replicas=`` (each checked here)."""
        if offload == "cpu":
            offload = Offload()
        elif offload is not None and not isinstance(offload, Offload):
            raise ValueError(f"offload must be None, 'cpu' or a fastema.torch.Offload, got {offload!r}")
        if shard_replicas is False or shard_replicas is None:
            shard_replicas = None
        elif not isinstance(shard_replicas, ShardReplicas):
            shard_replicas = ShardReplicas(shard_replicas)
        return cls(offload, shard_replicas)


@overload
def make_shadow(side, rows: int, dtype: str, placement: Placement, *, kind: str,
                settings: str) -> AveragingShadow: ...


@overload
def make_shadow(side, rows: Window, dtype: str, placement: Placement, *, kind: str,
                settings: str) -> WindowingShadow: ...


def make_shadow(side, rows: int | Window, dtype: str, placement: Placement, *, kind: str,
                settings: str) -> AveragingShadow | WindowingShadow:
    """The shadow of ``side``'s averaged tensors (a :class:`~fastema.torch._tensors.model.TorchModel`):
    ``rows`` averages of ``dtype`` (or a :class:`Window`), placed as ``placement`` says (see the
    module). ``kind`` names the face in the messages; ``settings`` is what the ranks of a split must
    hold alike (checked by the one collective of construction)."""
    offload, wanted = placement.offload, placement.replicas
    window = rows if isinstance(rows, Window) else None
    if window is not None and offload is not None:
        raise ValueError(f"{kind} keeps its window on the weights' device: it takes no offload=")
    found = None if wanted is None else replicas.found_replicas(side, wanted.group, kind, settings,
                                                                 wanted.bucket)   # one collective
    part = None if found is None else split_of(found.group)
    sources = side.averaged
    if window is not None:
        ring = WindowShadow(sources, window.size, ring_dtype=window.ring_dtype, split=part)
        if found is None:
            return ring
        split_ring = SplitWindow(ring, found.group, found.bucket, found.run)
        side.split(split_ring.specs(_mesh(found.group), side.specs, found.dim))
        return split_ring
    assert isinstance(rows, int)
    storage: AveragingShadow
    if offload is not None and side.masters is not None and all(_backends.device_of(t) == "cpu"
                                                                for t in sources.values()):
        storage = HostMastersShadow(sources, rows=rows, dtype=dtype, optimizer=hook_of(side.engine))
    elif offload is not None:
        storage = OffloadedShadow(sources, rows=rows, dtype=dtype, chunk=offload.chunk, split=part)
    else:                                          # a ZeRO-3 partition scanned up to its padding
        valid = side.padded(sources)
        storage = FlatShadow(sources, rows=rows, dtype=dtype, split=part, valid=valid)
    if found is None:
        return storage
    split = Split(storage, found.group, found.bucket, found.run)
    side.split(split.specs(_mesh(found.group), side.specs, found.dim))
    return split


def _mesh(group):
    """A 1-D mesh over a replica group (what a split's pieces are laid out on in checkpoints)."""
    return _sharded.mesh_of(group, gather.mesh_device(group))


#: The placement options' text, written once (see :func:`fastema.average._options.document`).
PLACEMENT_DOCS = {
    "offload": """offload: ``"cpu"`` (or :class:`fastema.torch.Offload` with its ``chunk`` bytes, default
    256 MiB) keeps the shadow (every average, in ``shadow_dtype``) in host memory: the weights'
    device keeps no shadow, only two staging chunks. Each update cuts the weights into
    chunk-sized windows (several small tensors in one, a large tensor over several), packs each
    into a chunk on the weights' device, in their own dtype, copies it to a pinned host slot on a
    side stream and folds it into the host shadow on a worker thread, the next window's pack
    overlapping that fold. ``update()`` returns once the last window is staged (the weights may
    then change) and does not wait for the last folds; every read waits (``join()``). With a
    DeepSpeed engine whose optimizer keeps float32 masters in host memory (ZeRO-Offload), the
    folds read the masters where they are (no chunk, no copy; the optimizer's next step waits
    for them; ``ema.source`` ends in ``-in-host-memory``). A fold that fails is raised at the
    next update or read and is not counted. Not with ``device_step=True`` or
    ``skip_nonfinite=True``. See the large-models guide.""",
    "shard_replicas": """shard_replicas: split the shadow over the ranks that hold replicas of the model (``True``:
    an FSDP2 HSDP mesh's replicate dimension, a DDP module's process group, else the default
    group; or a ``ProcessGroup``, or a 1-D ``DeviceMesh``; or :class:`fastema.torch.ShardReplicas`
    carrying one of those and the ``bucket`` bytes of one gather, default 64 MiB): each rank keeps
    and updates one contiguous slice of every flat group (1/N of the memory and of the update's
    work), with no communication per update; the slices together equal the unsplit average bit
    for bit. Reading the average gathers it, a bucket at a time (a collective every rank of the
    group must join): ``swap()`` / ``average_parameters()``, ``copy_to()``,
    ``averaged_state_dict()``, ``full_state_dict()``, ``save()``; ``state_dict()`` holds this
    rank's pieces only, which ``torch.distributed.checkpoint`` saves once per element and
    reloads on any number of ranks, split or not. Construction checks once that the ranks hold
    the same weights. See the large-models guide ("Splitting the average across replicas").""",
}
