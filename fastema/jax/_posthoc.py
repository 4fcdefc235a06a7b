"""Post-hoc EMA snapshots (EDM2 profiles) of a :func:`fastema.jax.ema` state, written between steps.

``fastema.jax.ema([PowerFunction.of(0.05), PowerFunction.of(0.1)])`` tracks power-function
profiles inside the jitted step; :func:`snapshot` writes the state's profiles, as they are after
its last update, into a snapshot folder in the format :mod:`fastema.posthoc` reads (the one
``fastema.torch.PostHocEMA`` writes: one safetensors file a snapshot, ``"{row}:{name}"`` per
profile and averaged leaf, ``"model:{name}"`` per leaf kept as it is), so that
``fastema.posthoc.synthesize(folder, sigma_rel=...)`` (or ``python -m fastema posthoc``) builds
any other profile after training. Names are the leaves' key paths (``jax.tree_util.keystr``),
as :class:`fastema.jax.EMA` names them. Writing imports torch (the snapshot writer's, as for
every face).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ..posthoc import SnapshotMeta, check_folder, kept_key, profile_key, valid_run_id, write_snapshot
from ..schedules import PowerFunction, gamma_to_sigma_rel
from ._functional import EmaState, EmaTransform, _is_float

__all__ = ["snapshot"]

_DTYPES = ("float32", "bfloat16", "float16")


def snapshot(avg: EmaTransform, state: EmaState, directory: str | os.PathLike, *, run_id: str,
             dtype: str = "float32") -> str:
    """Write ``state``'s profiles (``avg`` made with :class:`~fastema.schedules.PowerFunction`
    decays only) as one post-hoc snapshot at the time of its last update; returns the file's path.

    Args:
        avg: the :func:`fastema.jax.ema` the state belongs to (its profiles' exponents).
        state: the state after at least one update (concrete arrays, between jitted steps).
        directory: the snapshot folder (made if missing). One folder holds one run: it is claimed
            for ``run_id``, and another run's snapshots in it are refused with the fix.
        run_id: this run's id, 1 to 64 of ``[0-9A-Za-z_-]``: the same for every snapshot of the run
            (keep it in your checkpoint beside the state: a resumed run writes on under it).
        dtype: what the profiles are stored in: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``.

    Raises:
        ValueError: a schedule that is not a PowerFunction, a bad ``run_id`` or ``dtype``, or a
            folder that holds another run (nothing is written).
        RuntimeError: a state with no update yet.
        OverflowError: a profile beyond ``dtype``'s range (nothing is written).
    """
    bad = [type(s).__name__ for s in avg.schedules if not isinstance(s, PowerFunction)]
    if bad:
        raise ValueError(f"post-hoc snapshots store power-function profiles: this average tracks {bad[0]}; make it "
                         f"with fastema.schedules.PowerFunction decays (e.g. PowerFunction.of(0.05))")
    if not valid_run_id(run_id):
        raise ValueError(f"run_id must be 1 to 64 of [0-9A-Za-z_-], got {run_id!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(state)):
        raise TypeError("fastema.jax.snapshot() writes files: call it between jitted steps, on the state a step "
                        "returned, not inside jax.jit")
    updates = int(state.updates)
    if updates == 0:
        raise RuntimeError("fastema.jax.snapshot() before any update: there is no profile to store yet")
    import torch

    directory = os.fspath(directory)
    time = float(int(state.last_time))
    os.makedirs(directory, exist_ok=True)
    problem = check_folder(directory, run_id, time, writing=True, stacklevel=2)
    if problem is not None:
        raise ValueError(problem)
    stored = getattr(torch, dtype)
    tensors: dict = {}
    averaged, others, shapes = [], [], {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.averages)[0]:
        name = jax.tree_util.keystr(path) or "<root>"
        if _is_float(leaf):
            averaged.append(name)
            shapes[name] = list(leaf.shape[1:])
            for k in range(len(avg.schedules)):
                row = np.array(leaf[k].astype(jnp.float32))     # a writable copy (bfloat16: none in torch.from_numpy)
                tensors[profile_key(k, name)] = (torch.from_numpy(row), stored)
        else:
            others.append(name)
            shapes[name] = list(leaf.shape)
            kept = torch.from_numpy(np.array(leaf))
            tensors[kept_key(name)] = (kept, kept.dtype)
    gammas = [float(s.gamma) for s in avg.schedules]
    meta = SnapshotMeta(time=time, updates=updates, calls=int(state.calls), gammas=gammas,
                        sigma_rels=[gamma_to_sigma_rel(g) for g in gammas], averaged=averaged, others=others,
                        dtype=dtype, shapes=shapes, run_id=run_id)
    return write_snapshot(directory, time, tensors, meta)
