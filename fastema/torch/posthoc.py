"""``fastema.torch.PostHocEMA``: EDM2 power-function profiles of a model tracked in one pass, with
the snapshots that :mod:`fastema.posthoc` synthesises other profiles from."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .. import posthoc as _posthoc  # fastema.posthoc: the snapshot format and the synthesis
from ..posthoc.snapshots import SnapshotMeta
from . import _sharded
from ._model import _unwrap
from .ema import EMA

__all__ = ["PostHocEMA"]

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
        meta = SnapshotMeta(time=time, updates=self.plan.updates, calls=self.plan.calls, gammas=self.gammas,
                            sigma_rels=list(self.sigma_rels), averaged=averaged, others=others,
                            dtype=self.snapshot_dtype, shapes=shapes)
        return _posthoc.write_snapshot(self.path, time, tensors, meta, sharded=self.sharded)

    def synthesize(self, sigma_rel: float | None = None, *, gamma: float | None = None, time: float | None = None,
                   max_error: float = _posthoc.MAX_ERROR, into: nn.Module | None = None, dtype=None):
        """The average of profile ``sigma_rel`` (or ``gamma``) at ``time`` (default: the last
        snapshot's) from the snapshots written so far: see :func:`fastema.posthoc.synthesize`.
        ``into`` may be DDP- or torch.compile-wrapped (the names are the inner model's)."""
        return _posthoc.synthesize(self.path, sigma_rel, gamma=gamma, time=time, max_error=max_error,
                                  into=None if into is None else _unwrap(into), dtype=dtype)

    def __repr__(self) -> str:
        return (f"PostHocEMA(sigma_rels={self.sigma_rels}, updates={self.updates}, snapshot_every="
                f"{self.snapshot_every}, path={self.path!r}, shadow={self._avg!r})")
