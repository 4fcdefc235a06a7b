"""The command line: ``python -m bench.gates check|update|history`` (the package's description says what
each does)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from . import __doc__ as PACKAGE_DOC
from .common import (
    DETERMINISTIC,
    EXPECT,
    HISTORY,
    INSTR_TOLERANCE,
    OUT,
    RATIO_FACTOR,
    ROOT,
    SECTIONS,
    ToolMissing,
    use_tree,
)
from .compare import (
    compare_bounds,
    compare_caps,
    compare_exact,
    compare_instructions,
    fmt,
    ratio_gate,
    unjudged_family,
)
from .counts import measure_counts
from .history import append_history, plot_history, read_history
from .instructions import Instructions
from .ratios import CLOCK, RATIOS, measure_ratio
from .record import (
    cpu_family,
    git,
    load_expectations,
    machine,
    record,
    with_family_ratios,
    write_record,
)
from .sass import measure_sass
from .scenarios import BOUNDS, CAPS

ABOUT = ("fastema's performance gates (bench/gates/, issue 53): expected figures per scenario; "
         "the ratios one set per CPU family (bench.gates.record.cpu_family), judged only on a "
         "machine of that family. Rewrite with `python -m bench.gates update [--only SECTION]` "
         "and commit with the change that moved them.")


def measure(sections: list, notes: list, ratios=None, log=print) -> tuple[dict, dict]:
    """Every section of ``sections``: ``counts`` first (it runs every host scenario natively, so a kernel
    missing from numba's cache is compiled here, not under valgrind), then the valgrind process starts and
    ``sass`` and the ratios (``ratios()``: their figures) run here beside it, one core each: valgrind's
    neighbour is the same for fastema and its baseline, interleaved. Returns ``(figures, seconds)``."""
    figures, seconds = {}, {}
    instr = None

    def timed(section, fn):
        t = time.perf_counter()
        figures[section] = fn()
        seconds[section] = round(time.perf_counter() - t, 1)
        log(f"{section}: measured in {seconds[section]} s")

    if "counts" in sections:
        timed("counts", lambda: measure_counts(notes))
    if "instructions" in sections:
        instr = Instructions()
        log("instructions: valgrind started (one process, every scenario)")
    try:
        if "sass" in sections:
            timed("sass", measure_sass)
        if "ratios" in sections and ratios is not None:
            timed("ratios", ratios)
    except BaseException:
        if instr is not None:
            instr.proc.kill()
        raise
    if instr is not None:
        figures["instructions"] = instr.result()
        seconds["instructions"] = round(instr.seconds, 1)
        log(f"instructions: measured in {seconds['instructions']} s (since it started)")
    return figures, seconds


def _table(section: str, expected: dict, measured: dict, failures: list) -> str:
    bad = {(f.scenario, f.figure) for f in failures if f.section == section}
    lines = []
    for name in sorted(set(expected) | set(measured)):
        e, m = expected.get(name), measured.get(name)
        if section == "instructions":
            state = "FAIL" if (name, "instructions per update") in bad else "ok"
            moved = f"{m / e - 1:+.2%}" if e and m else "-"
            lines.append(f"  {state:4} {name}: {fmt(m) if m is not None else '-'} (expected "
                         f"{fmt(e) if e is not None else '-'}, {moved})")
        else:
            state = "FAIL" if any(s == name for s, _ in bad) else "ok"
            shown = ", ".join(f"{k} {v}" for k, v in sorted((m or {}).items())) if section == "counts" else ""
            lines.append(f"  {state:4} {name}" + (f": {shown}" if shown else ""))
    return "\n".join(lines)


def _ratios_header(family: str, committed: dict, stamps: dict) -> str:
    """The ratios' first line: the clock and threads, this CPU and whose expectations judge it."""
    cpu = machine()["cpu"]
    head = (f"  one thread each; a call's time is its wall time, less the waits for other "
            f"processes where it ran on the calling thread alone; this CPU: {cpu} (family "
            f"{family}): ")
    if family not in committed:
        return head + "NOT JUDGED: " + unjudged_family(family, committed)
    stamp = stamps.get(family, {})
    where = ", ".join(f"{k} {stamp[k]}" for k in ("machine", "commit", "date") if k in stamp)
    return head + f"judged against {family}'s expectations" + (f" ({where})" if where else "")


def cmd_check(args) -> int:
    t0 = time.perf_counter()
    exp = load_expectations()
    tol = exp.get("tolerance", {})
    itol, factor = tol.get("instructions", INSTR_TOLERANCE), tol.get("ratio_factor", RATIO_FACTOR)
    sections = args.only
    notes: list = []
    results: list = []

    family = cpu_family()
    committed = exp.get("ratios", {})

    def ratios():
        found, fails = ratio_gate(committed, family, measure_ratio, factor, rerun=not args.no_rerun,
                                  names=list(RATIOS))
        results.extend(found)
        ratio_failures.extend(fails)
        return {r.scenario: {"ratio": round(r.ratio, 4),
                             "rerun": None if r.rerun is None else round(r.rerun, 4),
                             "expected": r.expected, "judged": r.not_judged is None, **r.times}
                for r in found}

    ratio_failures: list = []
    try:
        figures, seconds = measure(sections, notes, ratios)
    except ToolMissing as err:
        print(f"gates: {err}", file=sys.stderr)
        return 2
    failures: list = []
    if "instructions" in figures:
        failures += compare_instructions(exp.get("instructions", {}), figures["instructions"], itol)
        failures += compare_bounds(BOUNDS, figures["instructions"])
        failures += compare_caps(CAPS, figures["instructions"])
    for section in ("counts", "sass"):
        if section in figures:
            failures += compare_exact(section, exp.get(section, {}), figures[section])
    failures += ratio_failures
    for section in SECTIONS:
        if section not in figures:
            continue
        print(f"== {section} ({seconds.get(section, '-')} s)")
        if section == "ratios":
            print(_ratios_header(family, committed, exp.get("measured_on", {}).get("ratios", {})))
            for r in results:
                v = figures["ratios"][r.scenario]
                state = "FAIL" if r.failed else "--" if r.not_judged else "ok"
                print(f"  {state:4} {r.scenario}: {v['ratio']:.3g} (expected "
                      f"{fmt(r.expected) if r.expected else '-'}; ms fastema {v['fastema_ms']}, "
                      f"baseline {v['baseline_ms']}, on the clocks {v['fastema_clock']}, "
                      f"{v['baseline_clock']}; wall-clock ratio {v['wall_ratio']:.3g}) "
                      f"{r.note(factor)}")
        else:
            print(_table(section, exp.get(section, {}), figures[section], failures))
    for n in notes:
        print(f"note: {n}")
    wall = time.perf_counter() - t0
    rec = record(figures, failures, notes, wall, "check " + ",".join(sections))
    rec["seconds"] = seconds
    path = write_record(rec)
    print(f"figures written: {path.relative_to(ROOT)}; the check took {wall:.0f} s")
    if failures:
        print()
        for f in failures:
            print(f.message())
        return 1
    print("gates: all passed")
    return 0


def cmd_update(args) -> int:
    t0 = time.perf_counter()
    exp = load_expectations()
    notes: list = []
    committed: dict = {}

    def ratios():                                     # the median of 3 measurements: a typical run's ratio
        raw = {}
        for name in RATIOS:
            runs = sorted((measure_ratio(name) for _ in range(3)), key=lambda run: run[0])
            committed[name] = round(runs[1][0], 4)
            raw[name] = {"ratio": committed[name], **runs[1][1]}
            print(f"ratios: {name}: {committed[name]:.3g} (3 runs: {', '.join(f'{r:.3g}' for r, _ in runs)})")
        return raw

    try:
        figures, seconds = measure(args.only, notes, ratios)
    except ToolMissing as err:
        print(f"gates: {err}", file=sys.stderr)
        return 2
    for section in DETERMINISTIC:
        if section in figures:
            exp[section] = figures[section]
    exp["tolerance"] = exp.get("tolerance", {"instructions": INSTR_TOLERANCE, "ratio_factor": RATIO_FACTOR})
    exp["about"] = ABOUT
    exp.setdefault("measured_on", {})
    stamp = {"commit": git("rev-parse", "--short", "HEAD"), "date": datetime.date.today().isoformat(),
             "machine": machine()["cpu"], "cores": os.cpu_count()}
    for section in args.only:
        if section != "ratios":
            exp["measured_on"][section] = stamp
    if committed:                                     # this CPU family's, the others' kept
        exp = with_family_ratios(exp, cpu_family(), committed, {**stamp, "clock": CLOCK})
    EXPECT.write_text(json.dumps(exp, indent=1, sort_keys=True) + "\n")
    rec = record(figures, [], notes, time.perf_counter() - t0, "update " + ",".join(args.only))
    rec["seconds"] = seconds
    path = write_record(rec)
    print(f"written: {EXPECT.relative_to(ROOT)} ({', '.join(args.only)}); figures: {path.relative_to(ROOT)}")
    for n in notes:
        print(f"note: {n}")
    return 0


def cmd_history(args) -> int:
    files = args.files or sorted(str(p) for p in OUT.glob("gates-*.json"))
    added = append_history(files)
    print(f"history: {len(added)} run(s) added to {HISTORY.relative_to(ROOT)}" + (f": {', '.join(added)}" if added
                                                                                    else ""))
    if not args.no_plot:
        runs = read_history()
        if runs:
            print(f"plot: {plot_history(runs).relative_to(ROOT)} ({len(runs)} runs)")
    return 0


def _sections(text: str) -> list:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"no section {bad}; the sections are {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    about = " ".join(PACKAGE_DOC.split("\n\n")[0].split())        # the package's first paragraph
    ap = argparse.ArgumentParser(prog="python -m bench.gates", description=about,
                                 epilog="See bench/README.md, 'Gates'.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("check", "update"):
        p = sub.add_parser(name)
        p.add_argument("--only", type=_sections, default=list(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
        if name == "check":
            p.add_argument("--no-rerun", action="store_true", help="a ratio past the factor fails without a rerun")
    h = sub.add_parser("history")
    h.add_argument("files", nargs="*", help="gates JSON files (default: bench/out/gates-*.json)")
    h.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.command in ("check", "update"):
        # before fastema is imported: the ratios' one thread, always (whatever the environment
        # says: an expectation holds for the settings it was recorded with)
        os.environ["FASTEMA_NUM_THREADS"] = "1"
        use_tree()
    return {"check": cmd_check, "update": cmd_update, "history": cmd_history}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
