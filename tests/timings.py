"""The tests' measured times, read from pytest's JUnit XML (``tests-*.xml``, written by
scripts/test.sh; its comments say where), and what the suite does with them:

- ``python tests/timings.py table XML...``: the files by total time (the top ones), the
  test cases counted in each XML and in all (CI's count, which must never go down);
- ``python tests/timings.py write XML...``: records them in ``tests/durations.json``:
  each file's total (conftest.py hands the files to pytest-xdist's workers longest first, so the cores
  end together) and the tests over ``SLOW_S`` (conftest.py marks them ``slow``: the edit-test loop,
  ``pytest -m "not slow" -n 2``, leaves them out; CI runs them). Refresh it after a full run when
  tests were added or got slower or faster.

A test's key is its JUnit name, ``classname::name`` (``tests.torch.test_ddp::test_x[param]``).
"""
from __future__ import annotations

import collections
import json
import os
import sys
import xml.etree.ElementTree as ET

SLOW_S = 5.0
DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def key(nodeid: str) -> str:
    """A pytest node id as its JUnit name: ``tests/a/test_b.py::C::test_d[x]`` -> ``tests.a.test_b.C::test_d[x]``."""
    path, *rest = nodeid.split("::")
    if path.endswith(".py"):
        path = path[:-3]
    names = [path.replace("/", ".")] + rest
    return ".".join(names[:-1]) + "::" + names[-1]


def file_of(classname: str) -> str:
    """``tests.torch.test_ddp.TestX`` -> ``tests/torch/test_ddp.py`` (test modules are named test_*)."""
    parts = classname.split(".")
    for i, p in enumerate(parts):
        if p.startswith("test_") or p == "test":
            return "/".join(parts[:i + 1]) + ".py"
    return "/".join(parts) + ".py"


def cases(paths: list[str]) -> list[tuple[str, str, float, str]]:
    """(xml path, key, seconds, outcome) of every test case in the JUnit files."""
    out = []
    for path in paths:
        for tc in ET.parse(path).getroot().iter("testcase"):
            outcome = "passed"
            for child in tc:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
            out.append((path, f"{tc.get('classname', '')}::{tc.get('name', '')}", float(tc.get("time", 0.0)),
                        outcome))
    return out


def per_file(found) -> dict[str, tuple[float, int]]:
    files: dict = collections.defaultdict(lambda: [0.0, 0])
    for _, k, s, _ in found:
        classname, name = k.split("::", 1)
        f = files[file_of(classname or name)]          # no class name: a module skipped whole (its name)
        f[0] += s
        f[1] += 1
    return {f: (round(t, 2), n) for f, (t, n) in files.items()}


def table(paths: list[str], top: int = 25) -> None:
    found = cases(paths)
    files = per_file(found)
    total = sum(t for t, _ in files.values())
    print(f"{'seconds':>8} {'tests':>6}  file (the {min(top, len(files))} slowest of {len(files)}; "
          f"{total:.0f} s in all)")
    for f, (t, n) in sorted(files.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{t:8.1f} {n:6d}  {f}")
    slow = sum(1 for _, _, s, _ in found if s > SLOW_S)
    outcomes = collections.Counter(o for *_, o in found)
    for path in paths:
        print(f"{sum(1 for p, *_ in found if p == path):6d} test cases in {path}")
    print(f"{len(found):6d} test cases in all ({', '.join(f'{n} {o}' for o, n in sorted(outcomes.items()))}; "
          f"{slow} over {SLOW_S:.0f} s)")


def write(paths: list[str]) -> None:
    found = cases(paths)
    files = per_file(found)
    data = {
        "about": "tests/timings.py write tests-*.xml (seconds on CI's 2 cores); conftest.py reads it",
        "slow_s": SLOW_S,
        "files": {f: t for f, (t, _) in sorted(files.items())},
        "slow": sorted({k for _, k, s, o in found if s > SLOW_S and o != "skipped"}),
    }
    with open(DURATIONS, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {DURATIONS}: {len(data['files'])} files, {len(data['slow'])} tests over {SLOW_S:.0f} s")


def load() -> dict:
    try:
        with open(DURATIONS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"files": {}, "slow": []}


if __name__ == "__main__":
    what, *xmls = sys.argv[1:] or ["table"]
    xmls = [p for p in xmls if os.path.exists(p)]
    if not xmls:
        sys.exit("usage: python tests/timings.py table|write XML... "
                 "(the tests-*.xml of scripts/test.sh)")
    {"table": table, "write": write}[what](xmls)
