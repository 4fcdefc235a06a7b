"""The history of the gates' runs: ``bench/history.jsonl`` (one compact record a line) and the plot of its
headline figures over commits."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .common import HISTORY, PLOT, SCHEMA
from .ratios import RATIOS


def history_line(rec: dict) -> dict:
    """The compact form of a run kept in the history (every figure but the per-kernel SASS table, which the
    expectations file holds: a digest of it shows when it changed)."""
    figs = dict(rec.get("figures", {}))
    sass = figs.pop("sass", None)
    if sass is not None:
        figs["sass_digest"] = hashlib.sha256(json.dumps(sass, sort_keys=True).encode()).hexdigest()[:12]
        figs["sass_registers"] = {k: v.get("registers") for k, v in sass.items()}
    keep = ("schema", "run", "command", "commit", "dirty", "subject", "date", "machine", "device", "versions",
            "passed", "wall_s")
    return {**{k: rec.get(k) for k in keep}, "figures": figs}


def append_history(files: list, history: Path = HISTORY) -> list:
    """Append each run of ``files`` not yet in ``history`` (by its ``run`` id); returns the runs added."""
    seen = set()
    if history.exists():
        for line in history.read_text().splitlines():
            if line.strip():
                seen.add(json.loads(line)["run"])
    added = []
    recs = []
    for f in files:
        rec = json.loads(Path(f).read_text())
        if rec.get("schema") != SCHEMA or "run" not in rec or rec["run"] in seen:
            continue
        seen.add(rec["run"])
        recs.append(rec)
    recs.sort(key=lambda r: r.get("date", ""))
    with history.open("a") as out:
        for rec in recs:
            out.write(json.dumps(history_line(rec), sort_keys=True) + "\n")
            added.append(rec["run"])
    return added


def read_history(history: Path = HISTORY) -> list:
    if not history.exists():
        return []
    return [json.loads(line) for line in history.read_text().splitlines() if line.strip()]


HEADLINE_INSTRUCTIONS = ("fake-gpu EMA.update, 6 tensors", "fake-gpu EMA.update, 148 tensors",
                         "fake-gpu EMA.update, 3000 tensors", "cpu EMA.update, 6 tensors",
                         "cpu EMA.update, 148 tensors", "cpu EMA.update, 3000 tensors",
                         "cpu TargetNetwork.update, 6 tensors", "cpu FlatShadow.update, 148 tensors")


def plot_history(runs: list, path: Path = PLOT) -> Path:
    """Each headline figure over the commits of ``runs`` (x: the commits in history order; one series per
    device): host instructions per update (thousands, log) and the same-run ratios (fastema / baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commits: list = []
    for r in runs:
        label = (r.get("commit") or "?")[:7] + ("+" if r.get("dirty") else "")
        if label not in commits:
            commits.append(label)
    x_of = {c: i for i, c in enumerate(commits)}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 8.5), sharex=True)
    markers = "osD^v<>phX*"
    for i, name in enumerate(HEADLINE_INSTRUCTIONS):
        for dev in sorted({r.get("device", "cpu") for r in runs}):
            pts = [(x_of[(r.get("commit") or "?")[:7] + ("+" if r.get("dirty") else "")],
                    r["figures"]["instructions"][name] / 1e3) for r in runs if r.get("device", "cpu") == dev
                   and name in r.get("figures", {}).get("instructions", {})]
            if pts:
                ax1.plot(*zip(*pts), marker=markers[i % len(markers)],
                         label=name + ("" if dev == "cpu" else f" [{dev}]"))
    ax1.set_yscale("log")
    ax1.set_ylabel("host instructions per update (thousands)")
    ax1.set_title("fastema's gates over commits (bench/history.jsonl)")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax1.grid(alpha=0.3)
    for i, name in enumerate(RATIOS):
        for dev in sorted({r.get("device", "cpu") for r in runs}):
            pts = [(x_of[(r.get("commit") or "?")[:7] + ("+" if r.get("dirty") else "")],
                    r["figures"]["ratios"][name]["ratio"]) for r in runs if r.get("device", "cpu") == dev
                   and name in r.get("figures", {}).get("ratios", {})]
            if pts:
                ax2.plot(*zip(*pts), marker=markers[i % len(markers)], linestyle=":",
                         label=name.split(":")[0] + ("" if dev == "cpu" else f" [{dev}]"))
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    ax2.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    ax2.yaxis.set_major_locator(FixedLocator([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20]))
    ax2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.set_ylabel("fastema / baseline, CPU time\n(same run, 1 thread; < 1: fastema faster)")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.grid(alpha=0.3)
    ax2.set_xticks(range(len(commits)))
    ax2.set_xticklabels(commits, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
