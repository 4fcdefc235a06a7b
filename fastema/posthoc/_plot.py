"""The stored and synthesised profiles, drawn to a PNG (needs matplotlib)."""
from __future__ import annotations

import os

import numpy as np

from .._io.files import save_figure
from ..schedules import gamma_to_sigma_rel
from ._profiles import Solution, profile
from ._snapshots import read_snapshots
from ._synthesis import _solution_for, _up_to

__all__ = ["plot_path", "plot_profiles"]


def plot_path(out: str | os.PathLike) -> str:
    """The file :func:`plot_profiles` writes for ``out``: ``out`` itself, or ``out + ".png"`` when it
    has no extension (as matplotlib does). An existing directory is returned as it is (and refused)."""
    out = os.fspath(out)
    return out if os.path.splitext(out)[1] or os.path.isdir(out) else out + ".png"


def pyplot():
    """matplotlib's pyplot, drawing to files (``Agg``); ImportError saying what to install where
    matplotlib is not (asked before anything is written: ``python -m fastema posthoc``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib (pip install 'fastema[plot]')") from None
    return plt


def plot_profiles(directory: str | os.PathLike, sigma_rel: float | None, out: str, *, time: float | None = None,
                  max_error: float = 1.0) -> Solution | None:
    """Draw the stored profiles of the last snapshot and, with ``sigma_rel``, the target and its
    synthesised profile (weight against training time) to ``out`` (PNG; :func:`plot_path` tells the
    file written: ``.png`` is added when ``out`` has no extension). Reads the snapshots' metadata
    only. Refuses (``ValueError``) an ``out`` that is a directory."""
    out = plot_path(out)
    if os.path.isdir(out):
        raise ValueError(f"plot_profiles: {out!r} is a directory; give a file name (e.g. "
                         f"{os.path.join(out, 'profiles.png')!r})")
    plt = pyplot()
    snaps = read_snapshots(directory)
    last = snaps[-1]
    tau = np.linspace(0, last.time, 800)
    fig, ax = plt.subplots(figsize=(7, 4))
    for g in last.gammas:
        ax.plot(tau, profile(tau, last.time, g), lw=1, alpha=0.7,
                label=f"tracked sigma_rel={gamma_to_sigma_rel(g):.3f}")
    sol = None
    if sigma_rel is not None:
        used = _up_to(snaps, time)                        # the snapshots synthesize() combines
        sol = _solution_for(used, sigma_rel, None, time, max_error)
        terms = [(s.time, g) for s in used for g in s.gammas]
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
    save_figure(fig, out, dpi=100)                 # (atomic: a failed write keeps the old image)
    plt.close(fig)
    return sol
