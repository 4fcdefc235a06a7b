"""PostHocEMA: several power-function EMA profiles in one pass, with snapshots for post-hoc synthesis.

Framework side of :mod:`fastema.posthoc` (the math, the file format and the synthesis).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from torch import nn

from .. import posthoc
from . import EMA, _atomic_write, _sharded

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    ZeRO-3 is refused.

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
        if snapshot_dtype not in _DTYPES:
            raise ValueError(f"snapshot_dtype must be one of {sorted(_DTYPES)}, got {snapshot_dtype!r}")
        super().__init__(model, sigma_rel=list(sigma_rels), update_every=update_every, **kwargs)
        if self._zero3:
            raise ValueError("PostHocEMA on a DeepSpeed ZeRO-3 model is not supported yet (its flat partitions "
                             "would need their shapes in every snapshot). Track the profiles with "
                             "EMA(engine, sigma_rel=[...]) and write full_state_dict(row) yourself, or use FSDP2.")
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

        Blocks until the snapshot is on disk (a device-to-host copy of every profile): call it
        between steps, every few thousand steps as EDM2 does. On a sharded model (FSDP2, tensor
        parallel) it is a collective: one DCP checkpoint ``DIR/snapshot-<time>/`` written by
        every rank from its own shards (no gather), then ``DIR/snapshot-<time>.json`` with the
        metadata, written last by rank 0: a snapshot without it is incomplete and never read."""
        self._not_swapped("snapshot()")
        if self.plan.updates == 0:
            raise RuntimeError("PostHocEMA.snapshot() before any update(): there is no profile to store yet")
        dtype = _DTYPES[self.snapshot_dtype]
        tensors, averaged, others = {}, [], []
        to = "cpu" if not self.sharded else None         # DCP stages the shards itself
        for k in range(self.plan.rows):
            for name, t, source, value in self._state_entries(k):
                if source is not None and source in self._avg.names:
                    v = value().to(to, dtype, copy=True)
                    tensors[f"{k}:{name}"] = _sharded.wrap(v, self._specs[source]) if source in self._specs \
                        else v.contiguous()
                    if k == 0:
                        averaged.append(name)
                elif k == 0:
                    kept = t.detach() if value is None else value()
                    tensors[f"model:{name}"] = kept.to(to, kept.dtype, copy=True)
                    others.append(name)
        time = self.plan.last_time
        meta = {"format": posthoc.FORMAT, "version": str(posthoc.VERSION), "time": repr(time),
                "updates": str(self.plan.updates), "calls": str(self.plan.calls),
                "gammas": json.dumps(self.gammas), "sigma_rels": json.dumps(list(self.sigma_rels)),
                "averaged": json.dumps(averaged), "others": json.dumps(others), "dtype": self.snapshot_dtype}
        stamp = f"{int(time):012d}" if float(time).is_integer() else f"{time:020.6f}"
        base = os.path.join(self.path, f"snapshot-{stamp}")
        if self.sharded:
            return self._save_dcp(base, tensors, meta)
        from safetensors.torch import save

        data = save(tensors, metadata=meta)
        _atomic_write(base + ".safetensors", lambda f: f.write(data))
        return base + ".safetensors"

    @staticmethod
    def _save_dcp(base: str, tensors: dict, meta: dict) -> str:
        import shutil

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        rank = dist.get_rank()
        tmp = f"{os.path.dirname(base)}/.{os.path.basename(base)}.tmp"
        if rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)                       # left by a snapshot that was killed
        dist.barrier()
        dcp.save(tensors, checkpoint_id=tmp)
        dist.barrier()
        if rank == 0:
            if os.path.exists(base):
                shutil.rmtree(base)
            os.replace(tmp, base)
            data = json.dumps({**meta, "kind": "dcp"}).encode()
            _atomic_write(base + ".json", lambda f: f.write(data))
        dist.barrier()
        return base

    def synthesize(self, sigma_rel: float | None = None, *, gamma: float | None = None, time: float | None = None,
                   max_error: float = posthoc.MAX_ERROR, into: nn.Module | None = None, dtype=None):
        """The average of profile ``sigma_rel`` (or ``gamma``) at ``time`` (default: the last
        snapshot's) from the snapshots written so far: see :func:`fastema.posthoc.synthesize`."""
        return posthoc.synthesize(self.path, sigma_rel, gamma=gamma, time=time, max_error=max_error,
                                  into=into, dtype=dtype)

    def __repr__(self) -> str:
        return (f"PostHocEMA(sigma_rels={self.sigma_rels}, updates={self.updates}, snapshot_every="
                f"{self.snapshot_every}, path={self.path!r}, shadow={self._avg!r})")
