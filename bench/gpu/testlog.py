"""A pytest plugin for the CUDA tests of the GPU command (``bench/gpu/cuda_tests.py`` loads it with
``-p``): one line a test as soon as it ends, so that a run cut at its time limit still names every
test that ran, with its result and time:

    [test] PASSED 0.41s nvvm=0 tests/kernels/test_cuda.py::test_nonfinite_kernel[1]

the outcome (PASSED, FAILED, SKIPPED, XFAIL, XPASS, or ERROR where its set-up or tear-down failed),
its seconds (set-up, call and tear-down), and NVVM's calls during it (``tests/support/shipped.py``
counts them on a GPU; ``-`` where not counted: the simulator, a test skipped before its call). A
test module that cannot be collected is a line ``[test] ERROR 0.00s nvvm=- PATH (collection: ...)``.
pytest's own progress letters are left out (``-q`` then prints no dots); everything else of
pytest's output (failures, the summary) is kept. Works under pytest-xdist too (the lines come from
the controller as the workers' reports arrive).
"""
from __future__ import annotations

import pytest

_SEEN: dict = {}


def _write(config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line, flush=True)
    else:
        print(line, flush=True)


_RANK = {None: -1, "SKIPPED": 0, "PASSED": 1, "XFAIL": 2, "XPASS": 3, "FAILED": 4, "ERROR": 5}


def _outcome(report) -> str | None:
    """What this phase's report says of the test (None: nothing; the worst phase's word wins)."""
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return "XFAIL" if report.skipped else "XPASS"
        return report.outcome.upper()
    if report.failed:
        return "ERROR"
    return "SKIPPED" if report.skipped else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report) -> None:
    if _WORKER:                                   # an xdist worker: the controller writes the line
        return
    row = _SEEN.setdefault(report.nodeid, {"outcome": None, "s": 0.0, "nvvm": "-"})
    row["s"] += report.duration
    for key, value in report.user_properties:
        if key == "nvvm_calls":
            row["nvvm"] = value
    outcome = _outcome(report)
    if _RANK[outcome] > _RANK[row["outcome"]]:
        row["outcome"] = outcome
    if report.when == "teardown":
        del _SEEN[report.nodeid]
        word = row["outcome"] or "PASSED"
        _write(_CONFIG[0], f"[test] {word} {row['s']:.2f}s nvvm={row['nvvm']} {report.nodeid}")


def pytest_collectreport(report) -> None:
    if report.failed and not _WORKER:
        text = str(report.longrepr).strip().splitlines()
        _write(_CONFIG[0], f"[test] ERROR 0.00s nvvm=- {report.nodeid} (collection: "
                           f"{text[-1][:200] if text else 'failed'})")


@pytest.hookimpl(wrapper=True)
def pytest_report_teststatus(report, config):
    """pytest's own status, its progress letter dropped (the ``[test]`` line says it)."""
    status = yield
    if isinstance(status, tuple) and len(status) == 3:
        return status[0], "", status[2]
    return status


_CONFIG: list = []
_WORKER = False


def pytest_configure(config) -> None:
    global _WORKER
    _CONFIG[:] = [config]
    _WORKER = hasattr(config, "workerinput")
