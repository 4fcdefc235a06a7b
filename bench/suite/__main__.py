"""``python -m bench.suite``: run the benchmark suite, write its JSON, table and plot.

The suite is ``bench/suite/`` of a source checkout (pytest-benchmark; the ``bench`` extra), run
from the repository's root; it is not part of the wheel. One command runs it and writes, into
``--out`` (default ``bench/out``):

- ``bench.json``: pytest-benchmark's raw results;
- ``bench.md``: per scenario and implementation the end-to-end time (a call and a sync) and, on a
  GPU, the device time (CUDA events), each a median with its min-max, in columns of their own; GB/s
  of each; on a GPU the share of the run's device-time ceiling (the fastest round of the copy and
  the in-place ``add_`` at the largest size: ``bench/suite/checked.py``), a row above it refused (the
  command fails), one above the copy flagged ``(!)``; and each baseline's speed-up, read from its
  rounds and those of fastema's checked update taken in turn with them (``conftest.time_rounds``):
  a baseline without them reads no speed-up;
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
import statistics
import subprocess
import sys
from collections import defaultdict

from bench.suite.checked import Ceiling, Refused, device_ceiling, within_ceiling
from fastema.cli import parse

__all__ = ["main", "report"]

CEILING = "copy (ceiling)"
REFUSED = "refused: "          # a GPU row above the run's copy ceiling by more than the tolerance


def suite_dir() -> pathlib.Path:
    """``bench/suite/``: this package's folder (the scenarios, their conftest)."""
    return pathlib.Path(__file__).resolve().parent


def _per_call(values, calls: int) -> list | None:
    return [v / calls for v in values] if values else None


def load(path) -> tuple[dict, dict, list]:
    """(raw data, {(group, case): {impl: stats}}, the (group, case) keys in run order); times per call."""
    with open(path) as f:
        data = json.load(f)
    rows: dict = defaultdict(dict)
    order = []
    for b in data["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        key = (b["group"], info["case"])
        if key not in rows:
            order.append(key)
        calls = info.get("calls") or 1
        pair = info.get("pair") or {}
        rows[key][info["impl"]] = dict(
            median=stats["median"] / calls, min=stats["min"] / calls, max=stats.get("max", stats["min"]) / calls,
            bytes=info.get("bytes") or 0, elements=info.get("elements"), device=info.get("device", "cpu"),
            checked=info.get("checked"), e2e_s=_per_call(info.get("e2e_s"), calls),
            device_s=_per_call(info.get("device_s"), calls),
            pair_e2e_s=_per_call(pair.get("e2e_s"), calls), pair_device_s=_per_call(pair.get("device_s"), calls))
    return data, rows, order


def _is_ceiling(impl: str) -> bool:
    return impl.startswith("copy") or impl.endswith("(ceiling)")


def ceilings(rows) -> dict[str, Ceiling | str]:
    """Per GPU device the run's ceiling (``checked.device_ceiling``): the ceiling streams of the case with
    the most elements, by their device times; where they have none (a run before device times were
    kept: end-to-end figures), why there is no ceiling. A CPU's copy is no ceiling (caches, threads:
    lerps at 150-600% of it in the 2026-11-22 CPU table): none."""
    best: dict[str, dict] = {}
    for impls in rows.values():
        streams = {i: st for i, st in impls.items() if _is_ceiling(i) and st["bytes"] and st["device"] != "cpu"}
        if not streams:
            continue
        st = next(iter(streams.values()))
        if (st["elements"] or 0) > (best.get(st["device"], {}).get("_n") or -1):
            best[st["device"]] = {"_n": st["elements"] or 0, **streams}
    out: dict[str, Ceiling | str] = {}
    for dev, found in best.items():
        n = found.pop("_n")
        timed = all(st["device_s"] for st in found.values())
        try:
            out[dev] = device_ceiling({i: (st["bytes"], st["device_s"] if timed else [st["median"]] * 2)
                                       for i, st in found.items()}, elements=n, timing="device" if timed else "e2e")
        except Refused as err:
            out[dev] = err.why
    return out


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _spread(values) -> str:
    if not values:
        return "-"
    return f"{fmt_time(statistics.median(values))} ({fmt_time(min(values))}-{fmt_time(max(values))})"


def _speedup(st: dict, figure: str) -> str:
    """The baseline's ``figure`` over fastema's checked update's, both from the rounds they took in
    turn; none without them (``pair_*``)."""
    mine, ours = st.get(f"{figure}_s"), st.get(f"pair_{figure}_s")
    if not mine or not ours:
        return "-" if figure == "device" and not mine else "no fastema timed in its rounds"
    return f"{statistics.median(mine) / statistics.median(ours):.2f}x"


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
    for dev, c in ceil.items():
        lines += [f"Ceiling ({dev}): " + (f"{c.GBps:.0f} GB/s, the fastest round of {c.source} by device time at "
                                          f"{c.elements} elements; the copy {c.copy_GBps:.0f} GB/s (median)"
                                          if isinstance(c, Ceiling) else f"none: {c}"), ""]
    lines += ["e2e: a call and a sync; device: CUDA events around the call (a GPU); each median (min-max) of the "
              "row's rounds. Speed-up: the baseline's time over fastema's checked update's, their rounds taken "
              "in turn.", "",
              "| scenario | case | implementation | e2e | device | e2e GB/s | device GB/s | % of copy (device) "
              "| speed-up e2e | speed-up device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for group, case in order:
        for impl, st in rows[(group, case)].items():
            dev_s = st["device_s"]
            gbs = st["bytes"] / st["median"] if st["bytes"] else None
            dev_gbs = st["bytes"] / statistics.median(dev_s) / 1e9 if st["bytes"] and dev_s else None
            c = ceil.get(st["device"])
            c = c if isinstance(c, Ceiling) else None
            try:
                flag = within_ceiling(f"{group} | {case} | {impl}", dev_gbs, c)
            except Refused as err:
                lines.append(f"| {group} | {case} | {impl} | {fmt_time(st['median'])} | {REFUSED}{err.why} "
                             f"| | | | | |")
                continue
            e2e = _spread(st["e2e_s"]) if st["e2e_s"] else \
                f"{fmt_time(st['median'])} ({fmt_time(st['min'])}-{fmt_time(st['max'])})"
            pct = f"{100 * dev_gbs / c.copy_GBps:.0f}%" + (" (!)" if flag else "") if dev_gbs and c else "-"
            base = not impl.startswith("fastema") and not _is_ceiling(impl)
            lines.append(f"| {group} | {case} | {impl} | {e2e} | {_spread(dev_s)} | "
                         f"{f'{gbs / 1e9:.1f}' if gbs else '-'} | {f'{dev_gbs:.1f}' if dev_gbs else '-'} | {pct} | "
                         f"{_speedup(st, 'e2e') if base else ''} | {_speedup(st, 'device') if base else ''} |")
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
