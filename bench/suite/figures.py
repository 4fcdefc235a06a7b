"""What a benchmark table may print (issue 86 item 1): the rules of the GPU plan's tables
(``bench/gpu``: headline, targets, the compiled step, the probe) and of the suite's
(``bench/suite/__main__.py``), beside ``bench/suite/checked.py``'s (a baseline checked before it is
timed; no row above the run's device-time ceiling).

- **Three figures, never mixed** (:data:`FIGURES`): *host*, the host's time a call while the GPU is
  busy (it neither waits for the GPU nor sees it idle); *device*, CUDA events around the calls; *e2e*,
  one call then a sync. Each has its column, and a ratio names the figure it is of.
- **A median carries its spread** (:func:`spread`, :func:`cell`): printed ``median (min-max)``; a median
  of fewer than :data:`MIN_ROUNDS` rounds, or one without its spread, is refused (:class:`Refused`).
- **A host figure taken while the host waited for the GPU is no host cost** (:func:`cell`): a row whose
  host batches saw the GPU catch up (``host_waited`` > 0: the launch queue filled, or the call synchronised,
  as the bfloat16 baseline's "40 ms" of host time did on the H200) reads ``invalid``; a row that carries
  such a figure as a number is refused.
- **A ratio is read only against a baseline of the same run** (:func:`ratio`): one timed in the same
  interleaved call as fastema's row (the same ``run``), checked against fastema's result before it was
  timed (``checked``); else :class:`Refused`, naming the row. A device figure whose batches were
  host-bound (the GPU waited for the host) and an invalid host figure give no ratio (None).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.suite.checked import Refused, is_baseline

__all__ = ["FIGURES", "MIN_ROUNDS", "cell", "check_row", "ratio", "spread", "table"]

FIGURES = ("host", "device", "e2e")
MIN_ROUNDS = 2
"""The fewest rounds (batches) a median is printed from: its spread needs two (the simulator's CI runs
time 2; a GPU run 7 batches a row, the compiled step 21)."""


def spread(values: Sequence[float], scale: float = 1e6) -> dict:
    """``{"median", "min", "max", "rounds"}`` of ``values`` (seconds) in ``scale`` units (us)."""
    if not values:
        raise ValueError("no rounds to take a median of")
    return {"median": statistics.median(values) * scale, "min": min(values) * scale,
            "max": max(values) * scale, "rounds": len(values)}


def _num(v, fmt: str) -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def cell(m: dict, figure: str, fmt: str = "{:.1f}", row: str = "row") -> str:
    """``figure`` (:data:`FIGURES`) of the row ``m`` (``{figure}_us``, ``_min``, ``_max``, ``batches``) as
    ``median (min-max)``; ``invalid: ...`` for a host figure taken while the host waited for the GPU;
    ``-`` where not measured. Refused (:class:`Refused`, naming ``row``): a median without its spread or
    of fewer than :data:`MIN_ROUNDS` rounds, a host figure that waited carried as a number."""
    med = m.get(f"{figure}_us")
    if figure == "host" and m.get("host_waited"):
        if med is not None:
            raise Refused(row, f"its host figure ({med:.1f} us) was taken while the host waited for the GPU "
                               f"in {m['host_waited']} of {m.get('batches')} batches: it is no host cost")
        return f"invalid: waited for the GPU in {m['host_waited']}/{m.get('batches')} batches"
    if med is None:
        return "-"
    lo, hi = m.get(f"{figure}_us_min"), m.get(f"{figure}_us_max")
    rounds = m.get(f"{figure}_rounds", m.get("batches"))
    if lo is None or hi is None or not rounds or rounds < MIN_ROUNDS:
        raise Refused(row, f"its {figure} median ({med:.1f} us) comes without its spread ({rounds} rounds, "
                           f"min {lo}, max {hi}): a median is printed with its min-max over >= {MIN_ROUNDS} rounds")
    text = f"{_num(med, fmt)} ({_num(lo, fmt)}-{_num(hi, fmt)})"
    if figure == "device" and m.get("host_bound_batches"):
        text += f" host-bound {m['host_bound_batches']}/{m.get('batches')}"
    return text


def check_row(row: str, m: dict) -> None:
    """Every figure of ``m`` printable by :func:`cell` (see there), or :class:`Refused`."""
    for figure in FIGURES:
        cell(m, figure, row=row)


def _valid(m: dict, figure: str) -> float | None:
    if figure == "host" and m.get("host_waited"):
        return None
    if figure == "device" and m.get("host_bound_batches"):
        return None                                         # the GPU waited for the host: no device time
    v = m.get(f"{figure}_us")
    return v if isinstance(v, (int, float)) and v > 0 else None


def ratio(scenario: str, rows: dict, ours: str, baseline: str, figure: str) -> float | None:
    """The baseline's ``figure`` over fastema's (> 1: fastema takes less), both rows of ``rows``
    (``impl -> figures``), or None where either figure is invalid (a host figure that waited, a host-bound
    device time). Refused (:class:`Refused`) where the baseline is missing, was not checked against
    fastema's result before it was timed, or was timed in another call than fastema's row (``run``). A
    fastema row read against another of fastema's (``compat.PostHocEMA`` against the native one) needs no
    check: it is no baseline (``checked.is_baseline``)."""
    name = f"{scenario} | {baseline}"
    if ours not in rows:
        raise Refused(f"{scenario} | {ours}", "not measured: no ratio")
    if baseline not in rows:
        raise Refused(name, f"no baseline row in the same run as {ours!r}: a figure is read against a "
                            f"baseline timed beside it, never one of another run or script")
    a, b = rows[ours], rows[baseline]
    if is_baseline(baseline) and not b.get("checked"):
        raise Refused(name, "not checked against fastema's result from the same inputs before it was timed")
    if a.get("run") is None or a.get("run") != b.get("run"):
        raise Refused(name, f"timed in another call (run {b.get('run')}) than {ours!r} (run {a.get('run')}): "
                            f"a ratio is read from batches taken in turn")
    x, y = _valid(a, figure), _valid(b, figure)
    return None if x is None or y is None else y / x


def table(timings: dict, ours_prefix: str = "fastema") -> str:
    """Markdown: per scenario and implementation the three figures apart (median (min-max) us), GB/s
    and % of the copy by device time, and each other row's time over the scenario's first fastema row's
    (``ours_prefix``), per figure (:func:`ratio`; a refused ratio reads ``refused: why``)."""
    lines = ["| scenario | impl | calls x batches | host us | device us | e2e us | device GB/s | "
             "% of copy (device) | this row / fastema's: host, device, e2e |", "|---|---|---|---|---|---|---|---|---|"]
    for sc, impls in timings.items():
        ours = next((k for k, m in impls.items() if k.startswith(ours_prefix) and "e2e_us" in m), None)
        for impl, m in impls.items():
            if "e2e_us" not in m:
                why = m.get("refused") or m.get("skipped") or m.get("detail") or "not measured"
                lines.append(f"| {sc} | {impl} | - | {why} | | | | | |")
                continue
            cells = [cell(m, f, row=f"{sc} | {impl}") for f in FIGURES]
            pct = _num(m.get("pct_of_copy"), "{:.1f}") + (" (!)" if m.get("above_copy") else "")
            vs = ""
            if ours and impl != ours and not impl.startswith(ours_prefix) and not impl.startswith("copy") \
                    and not impl.endswith("(ceiling)"):
                try:
                    vs = ", ".join(_num(ratio(sc, impls, ours, impl, f), "{:.2f}x") for f in FIGURES)
                except Refused as err:
                    vs = f"refused: {err.why}"
            lines.append(f"| {sc} | {impl} | {m.get('calls')} x {m.get('batches')} | {' | '.join(cells)} | "
                         f"{_num(m.get('device_GBps'), '{:.0f}')} | {pct} | {vs} |")
    return "\n".join(lines) + "\n"
