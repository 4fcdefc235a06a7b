"""Post-hoc EMA: any power-function profile synthesised, after training, from stored snapshots.

Karras et al. 2024 (EDM2, arXiv 2312.02696, Sec. 3 and App. C) track a few power-function EMA
profiles during training (:class:`fastema.torch.PostHocEMA`), store snapshots of them, and
afterwards reconstruct the average of any other profile as the least-squares combination of
the stored ones. The profile of exponent ``gamma`` at time ``t`` weights the training
trajectory as ``p(tau) = (gamma+1) tau^gamma / t^(gamma+1)`` on ``[0, t]``; the inner product of
two of them (EDM2 Eq. 151, integrated over ``[0, min(t_a, t_b)]``) is::

    <p_a, p_b> = (gamma_a+1)(gamma_b+1) (t_a/t_b)^e / ((gamma_a+gamma_b+1) max(t_a, t_b)),
    e = gamma_b if t_a < t_b else -gamma_a

and the coefficients ``x`` of a target ``p_r`` solve ``A x = b``, ``A_ij = <p_i, p_j>``,
``b_i = <p_i, p_r>``, in float64; they are then scaled to sum to 1 (as EDM2), so a constant
trajectory is reproduced exactly. The synthesised average is ``sum_i x_i snapshot_i``.

The relative L2 error of the synthesised profile, ``||p_r - sum_i x_i p_i|| / ||p_r||``, says how
well the snapshots can represent the target; a target above ``max_error`` (default 5%) is
refused rather than returned silently wrong (a width far outside the tracked ones, a time
before enough snapshots exist). A profile between the tracked ones is reproduced to ~1e-3
with snapshots every 2.5% of training, ~1e-2 every 10%.

Snapshot files (written by :class:`fastema.torch.PostHocEMA`) are safetensors, one per
snapshot (a sharded model's: one DCP checkpoint directory each, with a ``.json`` of the same
metadata beside it), every tracked profile in each: the tensor ``"{k}:{name}"`` is profile ``k`` of the
averaged tensor ``name``, ``"model:{name}"`` a tensor that is not averaged (copied buffers,
excluded tensors; taken from the last snapshot), and the metadata holds the time, the
exponents and the names. :func:`synthesize` streams one tensor at a time (memory: one tensor
per snapshot, as memory-mapped reads).

Command line: ``python -m fastema posthoc DIR --sigma-rel 0.07 --out ema.safetensors``
(``--plot profiles.png`` draws the profiles).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import NamedTuple, Sequence

import numpy as np

from ._files import atomic_write
from .schedules import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma

__all__ = ["FORMAT", "Snapshot", "Solution", "Synthesized", "profile", "profile_dot", "read_snapshots", "solve",
           "synthesize", "write_snapshot", "plot_profiles", "main"]

FORMAT = "fastema.posthoc"
VERSION = 1
MAX_ERROR = 0.05


def profile(tau, time: float, gamma: float) -> np.ndarray:
    """The power-function profile ``p(tau) = (gamma+1) tau^gamma / t^(gamma+1)`` on ``[0, t]`` (0 after)."""
    tau = np.asarray(tau, np.float64)
    inside = (tau >= 0) & (tau <= time)
    return np.where(inside, (gamma + 1) * np.clip(tau, 0, None) ** gamma / time ** (gamma + 1), 0.0)


def profile_dot(t_a, g_a, t_b, g_b) -> np.ndarray:
    """``<p_a, p_b>`` of two power-function profiles (EDM2 Eq. 151), broadcasting, float64."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, g_a, t_b, g_b))
    e = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** e / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


class Solution(NamedTuple):
    """The least-squares combination of stored profiles that best matches a target."""
    coefficients: np.ndarray     # one per stored profile, summing to 1
    error: float                 # ||p_r - sum x_i p_i|| / ||p_r|| (relative L2)
    condition: float             # condition number of A (large for dense snapshot grids)
    time: float
    gamma: float
    sigma_rel: float


def _target(sigma_rel, gamma) -> float:
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("give exactly one of sigma_rel= and gamma=")
    if gamma is None:
        return sigma_rel_to_gamma(sigma_rel)
    gamma_to_sigma_rel(gamma)                    # checks gamma
    return float(gamma)


def solve(times: Sequence[float], gammas: Sequence[float], *, sigma_rel: float | None = None,
          gamma: float | None = None, time: float | None = None, max_error: float = MAX_ERROR) -> Solution:
    """Coefficients of stored profiles ``(times[i], gammas[i])`` for the target of width
    ``sigma_rel`` (or exponent ``gamma``) at ``time`` (default: the last stored time).

    Raises ``ValueError`` when the best combination is further than ``max_error`` (relative L2)
    from the target, naming the error and what to change.
    """
    t = np.asarray(times, np.float64)
    g = np.asarray(gammas, np.float64)
    if t.ndim != 1 or t.shape != g.shape or t.size == 0:
        raise ValueError(f"times and gammas must be two equal non-empty lists, got {t.shape} and {g.shape}")
    if not np.all(t > 0) or not np.all(np.isfinite(t)):
        raise ValueError("every stored profile's time must be a finite number > 0")
    g_r = _target(sigma_rel, gamma)
    t_r = float(t.max()) if time is None else float(time)
    if not 0 < t_r <= t.max():
        raise ValueError(f"time={time!r}: a profile can be synthesised at a time in (0, {t.max():g}] (the stored "
                         f"snapshots' range), not after the last snapshot")
    A = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, t_r, g_r)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    if not np.isfinite(x).all() or abs(x.sum()) < 1e-12:
        raise ValueError("the stored profiles cannot represent this target (degenerate least squares)")
    x = x / x.sum()
    rr = float(profile_dot(t_r, g_r, t_r, g_r))
    error = math.sqrt(max(0.0, rr - 2 * float(x @ b) + float(x @ A @ x)) / rr)
    sol = Solution(x, error, float(np.linalg.cond(A)), t_r, g_r, gamma_to_sigma_rel(g_r))
    if not error <= max_error:
        stored = sorted({round(gamma_to_sigma_rel(v), 4) for v in g})
        raise ValueError(f"the snapshots represent the profile sigma_rel={sol.sigma_rel:.4f} at time {t_r:g} only "
                         f"to a relative error of {error:.3g} (max_error={max_error:g}): the tracked widths are "
                         f"{stored} at {t.size} stored profiles up to time {t.max():g}. Ask for a width between "
                         f"the tracked ones, a time with more snapshots before it, or pass a larger max_error=")
    return sol


class Snapshot(NamedTuple):
    path: str
    time: float
    updates: int
    gammas: list          # one per tracked profile (row)
    averaged: list        # names of the averaged tensors
    others: list          # names of the tensors kept as they are (from the last snapshot)
    kind: str = "safetensors"     # or "dcp": a torch.distributed.checkpoint directory (sharded models)
    shapes: dict = {}             # name -> full shape of tensors stored flat (ZeRO-3 partitions)


def read_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in ``directory`` (their metadata only), by time."""
    from safetensors import safe_open

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory of post-hoc EMA snapshots")
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith("snapshot-") and name.endswith(".json"):        # a sharded model's DCP snapshot
            with open(path) as f:
                meta = json.load(f)
            path = path[:-len(".json")]
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{path + '.json'!r} describes a DCP snapshot, but {path!r} is missing")
        elif name.startswith("snapshot-") and name.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        else:
            continue
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a fastema post-hoc snapshot (metadata format={meta.get('format')!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"{path!r} was written by a newer fastema (snapshot version {meta['version']}); "
                             f"upgrade fastema to read it")
        out.append(Snapshot(path, float(meta["time"]), int(meta["updates"]), json.loads(meta["gammas"]),
                            json.loads(meta["averaged"]), json.loads(meta["others"]), meta.get("kind", "safetensors"),
                            json.loads(meta.get("shapes", "{}"))))
    if not out:
        raise FileNotFoundError(f"no snapshot-*.safetensors files (or snapshot-*.json DCP snapshots) in "
                                f"{directory!r}")
    out.sort(key=lambda s: s.time)
    names = out[-1].averaged
    for s in out:
        if s.averaged != names:
            raise ValueError(f"{s.path!r} holds other tensors than {out[-1].path!r}: snapshots of different "
                             f"models in one directory")
    return out


def write_snapshot(directory: str, time: float, tensors: dict, meta: dict, *, sharded: bool = False) -> str:
    """Write one snapshot of time ``time`` into ``directory``, whole or not at all; returns its path.

    ``tensors``: ``"{k}:{name}"`` (profile ``k``) and ``"model:{name}"`` entries; ``meta``: the
    metadata strings (format, version, time, gammas, names). A plain model's snapshot is one
    safetensors file (temporary file, then rename), ``tensors`` mapping to ``(tensor, dtype)``
    pairs streamed one at a time (:func:`_stream_safetensors`). A sharded model's (``tensors`` holding
    DTensors) is a collective: one DCP checkpoint directory written by every rank from its own
    shards into a temporary directory, renamed, then the metadata ``.json`` beside it, written
    last by rank 0: readers ignore a snapshot without it."""
    stamp = f"{int(time):012d}" if float(time).is_integer() else f"{time:020.6f}"
    base = os.path.join(directory, f"snapshot-{stamp}")
    if sharded:
        return _save_dcp(base, tensors, meta)
    atomic_write(base + ".safetensors", lambda f: _stream_safetensors(f, tensors, meta))
    return base + ".safetensors"


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _stream_safetensors(f, tensors: dict, meta: dict) -> None:
    """Write ``tensors`` (``name -> (tensor, dtype)``, on any device) to ``f`` in the safetensors
    format, converting and copying one tensor at a time to the host: peak memory is one tensor,
    not the snapshot. (The safetensors library serialises whole dicts held in memory; its format
    is a little-endian u64 header length, a JSON header of dtypes, shapes and byte offsets padded
    to 8 bytes, then the raw data in that order. The files are read back with the library.)"""
    import struct

    import torch

    header, offset = {"__metadata__": meta}, 0
    for name, (t, dtype) in tensors.items():
        kind = _SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))
        if kind is None:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name; exclude it from the average")
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": kind, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for name, (t, dtype) in tensors.items():
        host = t.detach().to("cpu", dtype, copy=True).contiguous()     # C order, as safetensors stores it
        f.write(host.view(-1).view(torch.uint8).numpy().tobytes() if host.numel() else b"")


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
        if os.path.exists(base):                 # the same time again: the old metadata goes first
            if os.path.exists(base + ".json"):
                os.unlink(base + ".json")
            shutil.rmtree(base)
        os.replace(tmp, base)
        data = json.dumps({**meta, "kind": "dcp"}).encode()
        atomic_write(base + ".json", lambda f: f.write(data))
    dist.barrier()
    return base


class Synthesized(dict):
    """``name -> tensor`` of a synthesised average; ``.solution`` tells how it was made
    (coefficients, relative error, condition number, time, gamma, sigma_rel)."""
    solution: Solution


def _solution_for(snaps: list[Snapshot], sigma_rel, gamma, time, max_error) -> Solution:
    times = [s.time for s in snaps for _ in s.gammas]
    gammas = [g for s in snaps for g in s.gammas]
    return solve(times, gammas, sigma_rel=sigma_rel, gamma=gamma, time=time, max_error=max_error)


def synthesize(directory: str | os.PathLike, sigma_rel: float | None = None, *, gamma: float | None = None,
               time: float | None = None, max_error: float = MAX_ERROR, dtype=None, into=None) -> Synthesized:
    """The average of the power-function profile ``sigma_rel`` (or ``gamma``) at ``time``
    (default: the last snapshot's), from the snapshots in ``directory``, computed in float64 one
    tensor at a time. Returns a :class:`Synthesized` ``name -> tensor`` dict (``dtype``: default
    float32) whose ``.solution`` holds the coefficients and the relative error; ``into=model``
    also loads it into that ``nn.Module`` (strict; an FSDP2 / tensor-parallel model through
    ``set_model_state_dict``, which every rank must call). Reading is local to the caller (DCP
    snapshots with ``no_dist``): one rank alone may synthesise. Refuses a target the snapshots cannot
    represent to ``max_error`` (see :func:`solve`)."""
    import torch

    snaps = read_snapshots(directory)
    if time is not None:
        snaps = [s for s in snaps if s.time <= time] or snaps
    sol = _solution_for(snaps, sigma_rel, gamma, time, max_error)
    dtype = torch.float32 if dtype is None else dtype
    terms = [(s, k) for s in snaps for k in range(len(s.gammas))]
    files = {s.path: _reader(s) for s in snaps}
    out = Synthesized()
    last = snaps[-1]
    for name in last.averaged:
        acc = None
        for (s, k), x in zip(terms, sol.coefficients):
            v = files[s.path](f"{k}:{name}").to(torch.float64)
            acc = v.mul_(float(x)) if acc is None else acc.add_(v, alpha=float(x))
        out[name] = acc.to(dtype).reshape(last.shapes.get(name, acc.shape))
    for name in last.others:
        out[name] = files[last.path](f"model:{name}")
    out.solution = sol
    if into is not None:
        _load_into(into, out)
    return out


def _reader(snap: Snapshot):
    """``key -> full tensor`` of one snapshot, read on demand (one tensor at a time)."""
    if snap.kind == "dcp":
        import torch
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(snap.path)
        entries = reader.read_metadata().state_dict_metadata

        def read(key):
            # no_dist: this rank alone reads the full tensor (no collective, so rank 0 alone may synthesise)
            meta = entries[key]
            out = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(out, storage_reader=dcp.FileSystemReader(snap.path), no_dist=True)
            return out[key]

        return read
    from safetensors import safe_open

    handle = safe_open(snap.path, framework="pt")
    return handle.get_tensor


def _load_into(model, weights: dict) -> None:
    import torch

    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise ValueError(f"the snapshots do not match this model: missing {missing[:5]}, unexpected {extra[:5]}; "
                         f"load them into the model they were taken of")
    if any(type(t).__name__ == "DTensor" for t in own.values()):      # FSDP2 / TP: each rank keeps its part
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True))
        return
    bad = [f"{n} {tuple(weights[n].shape)} into {tuple(t.shape)}" for n, t in own.items() if t.shape != weights[n].shape]
    if bad:
        hint = (" (DeepSpeed ZeRO-3 parameters are partitioned: load inside deepspeed.zero.GatheredParameters("
                "params, modifier_rank=0), or into an unpartitioned copy of the model)"
                if any(hasattr(t, "ds_shape") for t in own.values()) else "")
        raise ValueError(f"the synthesised tensors do not fit this model: {', '.join(bad[:3])}{hint}; nothing "
                         f"was loaded")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(weights[name])


def plot_profiles(directory: str | os.PathLike, sigma_rel: float | None, out: str, *, time: float | None = None,
                  max_error: float = 1.0) -> Solution | None:
    """Draw the stored profiles of the last snapshot and, with ``sigma_rel``, the target and its
    synthesised profile (weight against training time) to ``out`` (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib (pip install 'fastema[plot]')") from None
    snaps = read_snapshots(directory)
    last = snaps[-1]
    tau = np.linspace(0, last.time, 800)
    fig, ax = plt.subplots(figsize=(7, 4))
    for g in last.gammas:
        ax.plot(tau, profile(tau, last.time, g), lw=1, alpha=0.7, label=f"tracked sigma_rel={gamma_to_sigma_rel(g):.3f}")
    sol = None
    if sigma_rel is not None:
        sol = _solution_for(snaps, sigma_rel, None, time, max_error)
        terms = [(s.time, g) for s in snaps for g in s.gammas]
        synth = sum(x * profile(tau, t, g) for (t, g), x in zip(terms, sol.coefficients))
        ax.plot(tau, profile(tau, sol.time, sol.gamma), "k--", lw=2, label=f"target sigma_rel={sol.sigma_rel:.3f}")
        ax.plot(tau, synth, "r", lw=1.5, label=f"synthesised (error {sol.error:.2g})")
    for s in snaps:
        ax.axvline(s.time, color="0.85", lw=0.5, zorder=0)
    ax.set_xlabel("training time (steps, or samples)")
    ax.set_ylabel("weight")
    ax.set_title(f"post-hoc EMA profiles: {len(snaps)} snapshots")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return sol


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastema posthoc",
                                     description="Synthesise a post-hoc EMA from the snapshots of "
                                                 "fastema.torch.PostHocEMA.")
    parser.add_argument("directory")
    parser.add_argument("--sigma-rel", type=float, help=f"target relative width, in (0, {SIGMA_REL_MAX:.4f})")
    parser.add_argument("--gamma", type=float, help="target exponent (instead of --sigma-rel)")
    parser.add_argument("--time", type=float, help="target time (default: the last snapshot's)")
    parser.add_argument("--out", help="write the synthesised weights here (.safetensors, or a torch.save file)")
    parser.add_argument("--plot", help="draw the profiles to this PNG")
    parser.add_argument("--max-error", type=float, default=MAX_ERROR,
                        help="refuse a target the snapshots represent worse than this (relative L2)")
    args = parser.parse_args(argv)
    if args.out is None and args.plot is None:
        parser.error("give --out and/or --plot")
    target = args.sigma_rel is not None or args.gamma is not None
    if args.out is not None and not target:
        parser.error("--out needs --sigma-rel or --gamma")
    try:
        if args.out is not None:
            weights = synthesize(args.directory, args.sigma_rel, gamma=args.gamma, time=args.time,
                                 max_error=args.max_error)
            _write(args.out, weights)
            sol = weights.solution
            print(f"wrote {args.out}: sigma_rel={sol.sigma_rel:.4f} (gamma={sol.gamma:.3f}) at time {sol.time:g}, "
                  f"{len(weights)} tensors, relative error {sol.error:.3g}, condition {sol.condition:.3g}")
        if args.plot is not None:
            sigma = args.sigma_rel if args.gamma is None else gamma_to_sigma_rel(args.gamma)
            plot_profiles(args.directory, sigma, args.plot, time=args.time)
            print(f"wrote {args.plot}")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _write(path: str, weights: dict) -> None:
    import torch

    weights = {k: v.contiguous() for k, v in weights.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        data = save(weights, metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(weights, f))
