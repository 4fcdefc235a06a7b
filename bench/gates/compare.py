"""Expectations against measurements (pure, tested): a :class:`Failure` per figure that moved, with the
message naming the command that rewrites it; the ratio gate with its confirming rerun, judged
against the machine's CPU family's expectations only."""
from __future__ import annotations

import dataclasses


def update_command(section: str) -> str:
    """The one command that rewrites ``section``'s expectations (to commit with the change that moved them):
    the instructions' in clean clones, as CI counts them (``scripts/gates_update.sh``)."""
    if section == "instructions":
        return "bash scripts/gates_update.sh instructions"
    return f"python -m bench.gates update --only {section}"


@dataclasses.dataclass
class Failure:
    section: str
    scenario: str
    figure: str
    expected: object
    measured: object
    rule: str

    def message(self) -> str:
        return (f"GATE FAILED [{self.section}] {self.scenario}: {self.figure} measured {fmt(self.measured)}, "
                f"expected {fmt(self.expected)} ({self.rule}). If the change is meant, rewrite the expectation "
                f"and commit bench/gates.json with it: {update_command(self.section)}")


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return repr(v)


def compare_instructions(expected: dict, measured: dict, tolerance: float) -> list[Failure]:
    """A failure for each scenario whose instructions per update moved more than ``tolerance`` (relative,
    either way: a gain is locked in by updating), is not measured, or has no expectation."""
    out = []
    for name in sorted(set(expected) | set(measured)):
        e, m = expected.get(name), measured.get(name)
        if e is None:
            out.append(Failure("instructions", name, "instructions per update", "none committed", m,
                               "a new scenario has no expectation"))
        elif m is None:
            out.append(Failure("instructions", name, "instructions per update", e, "not measured",
                               "the scenario did not run"))
        else:
            moved = m / e - 1.0
            if abs(moved) > tolerance:
                out.append(Failure("instructions", name, "instructions per update", e, m,
                                   f"{moved:+.1%}, tolerance {tolerance:.0%}"
                                   + ("; fewer is good: update to keep the gain" if moved < 0 else "")))
    return out


def compare_bounds(bounds: tuple, measured: dict) -> list[Failure]:
    """A failure for each ``(scenario, reference, factor)`` of ``bounds`` whose scenario took more than
    ``factor`` times the reference's instructions in this run (both measured; one not measured fails)."""
    out = []
    for name, ref, factor in bounds:
        m, r = measured.get(name), measured.get(ref)
        if m is None or r is None:
            out.append(Failure("instructions", name, f"instructions per update / {ref}'s", f"<= {factor}",
                               "not measured", "the scenario or its reference did not run"))
        elif m > factor * r:
            out.append(Failure("instructions", name, f"instructions per update / {ref}'s", f"<= {factor}",
                               round(m / r, 3), "the bound of issue 70 (scenarios.BOUNDS)"))
    return out


def compare_caps(caps: tuple, measured: dict) -> list[Failure]:
    """A failure for each ``(scenario, most)`` of ``caps`` whose scenario took more than ``most``
    instructions per update in this run, or did not run."""
    out = []
    for name, most in caps:
        m = measured.get(name)
        if m is None or m > most:
            out.append(Failure("instructions", name, "instructions per update", f"<= {most:,}",
                               "not measured" if m is None else m, "the cap of issue 86 (scenarios.CAPS)"))
    return out


def compare_exact(section: str, expected: dict, measured: dict) -> list[Failure]:
    """A failure for each figure of each scenario that differs from its expectation (exact)."""
    out = []
    for name in sorted(set(expected) | set(measured)):
        e, m = expected.get(name), measured.get(name)
        if e is None or m is None:
            out.append(Failure(section, name, "all figures", "none committed" if e is None else e,
                               "not measured" if m is None else m,
                               "a new scenario has no expectation" if e is None else "the scenario did not run"))
            continue
        for fig in sorted(set(e) | set(m)):
            if e.get(fig, "absent") != m.get(fig, "absent"):
                out.append(Failure(section, name, fig, e.get(fig, "absent"), m.get(fig, "absent"), "exact"))
    return out


@dataclasses.dataclass
class RatioResult:
    scenario: str
    expected: float | None          # this CPU family's committed ratio
    ratio: float                    # the first measurement
    rerun: float | None = None      # the confirming measurement, when the first was past the factor
    times: dict = dataclasses.field(default_factory=dict)
    failed: bool = False
    not_judged: str | None = None   # why it is shown but not judged (none expected on this family)

    def note(self, factor: float) -> str:
        if self.not_judged is not None:
            return f"not judged: {self.not_judged}"
        assert self.expected is not None
        limit = factor * self.expected
        if self.rerun is None:
            return f"ok (limit {limit:.3g})"
        if self.failed:
            return f"FAILED: {self.ratio:.3g} then {self.rerun:.3g} on the rerun, limit {limit:.3g}"
        return f"ok: {self.ratio:.3g} was past {limit:.3g}, the rerun gave {self.rerun:.3g} (noise)"


def unjudged_family(family: str, committed: dict) -> str:
    """Why a CPU family's ratios are not judged, and how to record its expectations (one line)."""
    known = ", ".join(sorted(committed)) or "none"
    return (f"bench/gates.json has no ratios for this CPU family, {family} (it has: {known}); a "
            f"ratio measured on another family is no expectation here (a ratio moves with the "
            f"CPU's caches, memory and vector units). To judge them on {family}, record its "
            f"expectations on a quiet machine of it and commit bench/gates.json: "
            f"{update_command('ratios')}")


def ratio_gate(committed: dict, family: str, measure, factor: float, rerun: bool = True,
               names: list | None = None) -> tuple[list[RatioResult], list[Failure]]:
    """Each scenario of ``names`` (default: those ``family`` has) measured by ``measure(name) ->
    (ratio, times)`` and judged against ``committed[family]`` (``{family: {scenario: ratio}}``:
    each CPU family's expectations, as ``update`` recorded them on one of its machines): one past
    ``factor`` x its expected ratio is measured again (``rerun``: ``measure(name, True)``, which
    may take more rounds) and fails only if the rerun is past it too. A family with no
    expectations, or a scenario its expectations lack, is measured and printed but not judged
    (``RatioResult.not_judged`` says why and what records it): no ratio is compared across CPU
    families."""
    mine = committed.get(family)
    results, failures = [], []
    for name in (names if names is not None else sorted(mine or {})):
        exp = None if mine is None else mine.get(name)
        ratio, times = measure(name)
        r = RatioResult(name, exp, ratio, times=times)
        if mine is None:                              # the header says why, once: unjudged_family
            r.not_judged = f"no {family} expectations"
        elif exp is None:
            r.not_judged = (f"no {family} expectation for this scenario (a new one, or its "
                            f"code changed since {family}'s were recorded); record it on a quiet "
                            f"{family} machine and commit bench/gates.json: "
                            f"{update_command('ratios')}")
        elif ratio > factor * exp:
            if rerun:
                r.rerun, r.times["rerun"] = measure(name, True)
            r.failed = not rerun or r.rerun > factor * exp
            if r.failed:
                confirmed = f"confirmed by a rerun ({r.rerun:.3g})" if rerun else "no rerun asked"
                sides = (f"; fastema {times['fastema_ms']} ms, baseline {times['baseline_ms']} ms"
                         if "fastema_ms" in times and "baseline_ms" in times else "")
                figure = f"fastema / baseline time (min of N, same run, {family})"
                rule = f"past {factor:g}x {family}'s ratio ({factor * exp:.3g}), {confirmed}{sides}"
                failures.append(Failure("ratios", name, figure, exp, ratio, rule))
        results.append(r)
    return results, failures
