"""The stored and synthesised profiles, drawn to a PNG (needs matplotlib)."""
from __future__ import annotations

import os

import numpy as np

from ..schedules import gamma_to_sigma_rel
from .profiles import Solution, profile
from .snapshots import read_snapshots
from .synthesis import _solution_for

__all__ = ["plot_profiles"]


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
        ax.plot(tau, profile(tau, last.time, g), lw=1, alpha=0.7,
                label=f"tracked sigma_rel={gamma_to_sigma_rel(g):.3f}")
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
