"""CUDA tests that cannot rot (issue 70 item 6): ``test_smoother_on_gpu_without_host_sync`` called
``Smoother.update(v, weight=)`` rounds after the keyword was renamed, because it only ever ran on a GPU.

- mypy checks every test's calls into fastema (pyproject's ``[tool.mypy]``: ``tests`` among its files,
  the test bodies checked, ``call-arg`` reported), so a renamed keyword fails CI's lint stage wherever
  the test runs;
- a test skipped unless a real GPU is there (not run by the simulator nor on the fake GPU) says which
  behaviour of the hardware it checks: its skip reason starts with ``hardware:``.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GPU_ONLY = [
    re.compile(r"skipif\(\s*SIM\s*,\s*reason=(\"[^\"]*\"|'[^']*')"),
    re.compile(r"skipif\(\s*not\s+(?:torch\.)?cuda\.is_available\(\)\s*,\s*reason=(\"[^\"]*\"|'[^']*')"),
    re.compile(r"if not (?:torch\.)?cuda\.is_available\(\):\s*\n\s*pytest\.skip\((\"[^\"]*\"|'[^']*')"),
]
"""A skip that only a real GPU lifts: under the simulator (``SIM``), or without a CUDA device (torch's
or numba's), when the simulator's run does not lift it either."""
REASON = re.compile(r"hardware: \S.{12,}")


def test_mypy_checks_the_calls_of_every_test():
    """pyproject's mypy run covers ``tests`` with the test bodies checked and ``call-arg`` reported
    (the class of the ``weight=`` error), and the tests' fake driver still in full."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "tests" in config["files"]
    overrides = {tuple(o["module"]): o for o in config["overrides"]}
    tests = overrides[("tests.*",)]
    assert tests["check_untyped_defs"] is True
    assert "call-arg" not in tests["disable_error_code"]
    assert set(overrides[("tests.support.*",)]["enable_error_code"]) == set(tests["disable_error_code"])


def test_every_test_only_a_gpu_runs_says_what_of_the_hardware_it_checks():
    """Every skip that only a real GPU lifts gives its reason as ``hardware: what``: the simulator
    and the fake GPU run every other CUDA test's Python in CI, and mypy checks these ones' calls.
    Fails on the tests of before ("needs a GPU", nine times in ``test_cuda.py``)."""
    found, vague = 0, []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        text = path.read_text()
        for pattern in GPU_ONLY:
            for m in pattern.finditer(text):
                found += 1
                if not REASON.fullmatch(m.group(1)[1:-1]):
                    vague.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1} {m.group(1)}")
    assert found >= 14, found                       # the scan still sees them
    assert not vague, "a GPU-only test must say what of the hardware it checks:\n" + "\n".join(vague)
