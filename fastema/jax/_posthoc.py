"""Post-hoc EMA snapshots (EDM2 profiles) of a :func:`fastema.jax.ema` state, written between steps.

``fastema.jax.ema([PowerFunction.of(0.05), PowerFunction.of(0.1)])`` tracks power-function
profiles inside the jitted step; :func:`snapshot` writes the state's profiles, as they are after
its last update, into a snapshot folder in the format :mod:`fastema.posthoc` reads (the one
``fastema.torch.PostHocEMA`` writes: one safetensors file a snapshot, ``"{row}:{name}"`` per
profile and averaged leaf, ``"model:{name}"`` per leaf kept as it is), so that
``fastema.posthoc.synthesize(folder, sigma_rel=...)`` (or ``python -m fastema posthoc``) builds
any other profile after training. Names are the leaves' key paths (``jax.tree_util.keystr``),
as :class:`fastema.jax.EMA` names them. As the torch face's, each profile reaches the writer in
its shadow dtype (cast there, refused where it overflows the stored dtype) and each leaf kept as
it is in its own (as its bytes where safetensors has no name for it: ``add_kept``). Writing imports
torch (the snapshot writer's, as for every face).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from .._io.safetensors import DTYPES
from ..posthoc import SnapshotMeta, add_kept, check_folder, profile_key, valid_run_id, write_snapshot
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
        ValueError: a schedule that is not a PowerFunction, a bad ``run_id`` or ``dtype``, a state
            of another average (its row count is not ``avg``'s profile count), a leaf of a dtype a
            snapshot cannot store (int4), or a folder that holds another run (nothing is written).
        RuntimeError: a state with no update yet.
        OverflowError: a profile beyond ``dtype``'s range (a float64 shadow beyond float32's too),
            before the folder is claimed: nothing is written.
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
    rows = len(avg.schedules)
    leaves = [(jax.tree_util.keystr(path) or "<root>", leaf)
              for path, leaf in jax.tree_util.tree_flatten_with_path(state.averages)[0]]
    _check_rows(rows, [("norms", state.norms)] + [(name, x) for name, x in leaves if _is_float(x)])
    updates = int(state.updates)
    if updates == 0:
        raise RuntimeError("fastema.jax.snapshot() before any update: there is no profile to store yet")
    if int(state.last_time) <= 0:               # as fastema.torch.PostHocEMA.snapshot() refuses it
        raise RuntimeError("fastema.jax.snapshot() at time 0 (the last update's step was 0): every profile of "
                           "time 0 is the weights it began from, which synthesis cannot use (a stored "
                           "profile's time is > 0); take it after an update at a later step")
    import torch

    directory = os.fspath(directory)
    time = float(int(state.last_time))
    stored = getattr(torch, dtype)
    tensors: dict = {}
    averaged, others, shapes = [], [], {}
    raw: dict[str, str] = {}              # leaves kept as their bytes (add_kept)
    for name, leaf in leaves:
        host = np.array(leaf)             # a writable copy on the host: indexed there, never clamped
        if _is_float(leaf):
            averaged.append(name)
            shapes[name] = list(host.shape[1:])
            for k in range(rows):         # cast here, refusing what overflows, before the folder is claimed
                key = profile_key(k, name)
                tensors[key] = (_stored(_torch_of(host[k], name), stored, key), stored)
        else:
            others.append(name)
            shapes[name] = list(host.shape)
            add_kept(tensors, raw, name, _torch_of(host, name))
    os.makedirs(directory, exist_ok=True)      # every leaf converted and cast first: a refusal claims no folder
    problem = check_folder(directory, run_id, time, writing=True, stacklevel=2)
    if problem is not None:
        raise ValueError(problem)
    gammas = [float(s.gamma) for s in avg.schedules]
    meta = SnapshotMeta(time=time, updates=updates, calls=int(state.calls), gammas=gammas,
                        sigma_rels=[gamma_to_sigma_rel(g) for g in gammas], averaged=averaged, others=others,
                        dtype=dtype, shapes=shapes, run_id=run_id, raw=raw)
    return write_snapshot(directory, time, tensors, meta)


def _check_rows(rows: int, arrays: list) -> None:
    """ValueError unless every ``(name, array)``'s leading dimension is ``rows``, the average's
    profile count: a state of another average would write one profile's values under another's
    exponent."""
    for name, x in arrays:
        shape = tuple(np.shape(x))
        if not shape or shape[0] != rows:
            held = shape[0] if shape else 0
            raise ValueError(f"this state holds {held} profile row(s) ({name} has shape {shape}) but the average "
                             f"tracks {rows} profile(s): a state of another average (its profiles changed since "
                             f"it was made?); use the average this state came from, or init a new state with "
                             f"this one (avg.init(params))")


def _stored(t, dtype, key: str):
    """Profile ``t`` cast to the stored ``dtype`` (``t`` itself where it is of that dtype);
    OverflowError, naming ``key``, where a finite value would be stored as inf (a float64 shadow
    beyond float32, a float32 one beyond float16): raised before the folder is claimed."""
    import torch

    out = t.to(dtype)
    if out.dtype == t.dtype:
        return out
    lost = torch.isfinite(t) & ~torch.isfinite(out)
    if bool(lost.any()):
        largest = float(t[lost].abs().max())
        name = str(dtype).removeprefix("torch.")
        raise OverflowError(f"{key} holds {int(lost.sum())} finite value(s) beyond the range of {name} "
                            f"(+-{torch.finfo(dtype).max:g}; the largest is {largest:g}), which would be stored "
                            f"as inf; nothing is written: store the profiles in a wider dtype= (float32 holds "
                            f"the most) or keep the average within {name}'s range")
    return out


def _torch_of(a: np.ndarray, name: str):
    """``a`` as a torch tensor of the same dtype and bits (bfloat16 and float8 too, which
    ``torch.from_numpy`` does not take); shares ``a``'s memory."""
    import torch

    dtype = getattr(torch, a.dtype.name) if a.dtype.name in DTYPES else None
    if dtype is None:
        raise ValueError(f"{name} is {a.dtype}, which a post-hoc snapshot cannot store; keep it out of params "
                         f"or cast it to one of {sorted(DTYPES)}")
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return torch.from_numpy(flat).view(dtype).reshape(a.shape)
