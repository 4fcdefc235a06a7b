"""``python -m bench.suite``: run the benchmark suite, write its JSON, table and plot.

The suite is ``bench/suite/`` of a source checkout (pytest-benchmark; the ``bench`` extra), run
from the repository's root; it is not part of the wheel. One command runs it and writes, into
``--out`` (default ``bench/out``):

- ``bench.json``: pytest-benchmark's raw results;
- ``bench.md``: per scenario and implementation the median time, GB/s, the share of the
  machine's copy bandwidth measured in the same run (the ceiling), and fastema's speed-up
  against each baseline of the same run. A GPU row above that ceiling by more than 10% is
  refused (the command fails), one within it flagged ``(!)``; a baseline the scenario did not
  check against fastema's result before timing it says so (``bench/suite/checked.py``);
- ``bench.png``: time against size, log-log, of the flat float32 sweep: the constant
  per-call overhead is the flat part on the left, the bandwidth the slope on the right.

``--quick`` keeps sizes and rounds small (CI); ``--report JSON`` only turns an existing
result file into the table and the plot. Timing noise never fails the command; errors do.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
from collections import defaultdict

from bench.suite.checked import Refused, within_ceiling
from fastema.cli import parse

__all__ = ["main", "report"]

CEILING = "copy (ceiling)"
REFUSED = "refused: "          # a GPU row above the run's copy ceiling by more than the tolerance


def suite_dir() -> pathlib.Path:
    """``bench/suite/``: this package's folder (the scenarios, their conftest)."""
    return pathlib.Path(__file__).resolve().parent


def load(path) -> tuple[dict, dict, list]:
    """(raw data, {(group, case): {impl: stats}}, the (group, case) keys in run order)."""
    with open(path) as f:
        data = json.load(f)
    rows: dict = defaultdict(dict)
    order = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        key = (b["group"], info["case"])
        if key not in rows:
            order.append(key)
        rows[key][info["impl"]] = dict(median=b["stats"]["median"], min=b["stats"]["min"],
                                       bytes=info.get("bytes") or 0, elements=info.get("elements"),
                                       device=info.get("device", "cpu"), checked=info.get("checked"))
    return data, rows, order


def ceilings(rows) -> dict[str, float]:
    """The copy bandwidth (bytes/s) per device: the ceiling row with the most bytes moved."""
    best: dict[str, tuple[int, float]] = {}
    for impls in rows.values():
        st = impls.get(CEILING)
        if st and st["bytes"] and st["bytes"] > best.get(st["device"], (0, 0.0))[0]:
            best[st["device"]] = (st["bytes"], st["bytes"] / st["median"])
    return {dev: bw for dev, (_, bw) in best.items()}


def _within(row: str, bw: float | None, ceiling: float | None, device: str) -> str | None:
    """``bench.suite.checked.within_ceiling`` for a GPU row (bytes/s); a CPU's copy is no ceiling (caches,
    threads: lerps at 150-600% of it in the 2026-11-22 CPU table)."""
    if device == "cpu" or not bw or not ceiling:
        return None
    return within_ceiling(row, bw / 1e9, ceiling / 1e9)


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _ours(impls: dict):
    return next((st for impl, st in impls.items() if impl.startswith("fastema")), None)


def machine_line(data) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {})
    parts = [f"CPU: {cpu.get('brand_raw') or platform.processor() or '?'}, {cpu.get('count', '?')} cores"]
    if m.get("gpu"):
        parts.append(f"GPU: {m['gpu']}")
    versions = m.get("fastema_versions")
    if versions:
        parts.append(versions)
    return "; ".join(parts) + f"; {data.get('datetime', '')[:19]}"


def table(data, rows, order) -> str:
    ceil = ceilings(rows)
    lines = [machine_line(data), ""]
    if ceil:
        lines += ["Copy ceiling (device-to-device copy in this run, bytes read + written): " +
                  ", ".join(f"{d} {bw / 1e9:.0f} GB/s" for d, bw in ceil.items()), ""]
    lines += ["| scenario | case | implementation | median | GB/s | % of copy | fastema speed-up |",
              "|---|---|---|---|---|---|---|"]
    for group, case in order:
        impls = rows[(group, case)]
        ours = _ours(impls)
        for impl, st in impls.items():
            bw = st["bytes"] / st["median"] if st["bytes"] else None
            try:
                flag = _within(f"{group} | {case} | {impl}", bw, ceil.get(st["device"]), st["device"])
            except Refused as err:
                lines.append(f"| {group} | {case} | {impl} | {fmt_time(st['median'])} | {REFUSED}{err.why} | - | |")
                continue
            gbs = f"{bw / 1e9:.1f}" if bw else "-"
            pct = f"{100 * bw / ceil[st['device']]:.0f}%" if bw and st["device"] in ceil else "-"
            pct += " (!)" if flag else ""
            speed = "" if impl.startswith("fastema") or impl == CEILING or ours is None \
                else f"{st['median'] / ours['median']:.2f}x"
            if speed and st.get("checked") is False:
                speed += " (not checked against fastema)"
            lines.append(f"| {group} | {case} | {impl} | {fmt_time(st['median'])} | {gbs} | {pct} | {speed} |")
    return "\n".join(lines) + "\n"


def plot(rows, out) -> str | None:
    """Time against elements, log-log, for every flat sweep group; None when the run has none."""
    sweeps: dict = defaultdict(lambda: defaultdict(list))     # group -> impl -> [(elements, seconds)]
    for (group, _), impls in rows.items():
        if group.startswith("flat float32"):
            for impl, st in impls.items():
                if st["elements"]:
                    sweeps[group][impl].append((st["elements"], st["median"]))
    if not sweeps:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.suite: matplotlib is not installed; no plot (pip install 'fastema[plot]')", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 4.8), dpi=110, squeeze=False)
    for ax, (group, impls) in zip(axes[0], sorted(sweeps.items())):
        for impl, pts in impls.items():
            pts.sort()
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                      lw=2.2 if impl.startswith("fastema") else 1.2,
                      ls="--" if impl == CEILING else "-", label=impl)
        ax.set_xlabel("elements (float32)")
        ax.set_ylabel("median time per update [s]")
        ax.set_title(group)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return str(out)


def report(json_path, out_dir) -> str:
    """Write bench.md (and bench.png) for ``json_path`` into ``out_dir``; return the table."""
    data, rows, order = load(json_path)
    text = table(data, rows, order)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(text)
    plot(rows, out_dir / "bench.png")
    return text


def _refused(text: str) -> int:
    """Print the table; 1 (and why) where a row of it was refused, else 0."""
    print(text)
    if REFUSED in text:
        print("bench.suite: a row reads above the run's copy ceiling (refused in the table)", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description="Run the benchmark suite (bench/suite/ of a fastema source checkout, pytest-benchmark) and write "
                    "bench.json (the raw results), bench.md (per scenario the median time, GB/s, the share of the "
                    "copy bandwidth measured in the same run, and the speed-up against each baseline) and bench.png "
                    "(time against size of the float32 sweep). Timing noise never fails the command; errors do.",
        epilog="Other arguments go to pytest as they are (e.g. --benchmark-min-rounds=10).")
    ap.add_argument("--quick", action="store_true", help="small sizes and few rounds, as CI runs it (default: off)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="the folder to write into (default: bench/out of the checkout; with --report, the JSON's "
                         "folder)")
    ap.add_argument("-k", dest="select", metavar="EXPR",
                    help="a pytest -k expression: run part of the suite (default: all of it)")
    ap.add_argument("--report", metavar="JSON",
                    help="write only the table and the plot of an existing bench.json, running nothing "
                         "(default: run the suite)")
    return ap


def main(argv=None) -> int:
    parsed = parse(_parser(), argv, known=True)
    if isinstance(parsed, int):                  # --help: 0; a usage error: 2 (its line printed)
        return parsed
    args, extra = parsed
    try:
        if args.report:
            out = pathlib.Path(args.out or pathlib.Path(args.report).parent)
            return _refused(report(args.report, out))
        suite = suite_dir()
        out = pathlib.Path(args.out or suite.parent / "out").resolve()
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={json_path}", "--rootdir", str(suite)]
        if args.select:
            cmd += ["-k", args.select]
        env = dict(os.environ, FASTEMA_BENCH_QUICK="1" if args.quick else "0", PYTHONUNBUFFERED="1")
        started = datetime.datetime.now()
        rc = subprocess.call(cmd + extra, env=env)
        if rc != 0:
            print(f"bench.suite: the suite failed (pytest exit {rc})", file=sys.stderr)
            return rc
        if _refused(report(json_path, out)):
            return 1
        took = (datetime.datetime.now() - started).total_seconds()
        print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'} ({took:.0f} s)")
        return 0
    except (OSError, ValueError, KeyError) as e:
        print(f"bench.suite: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
