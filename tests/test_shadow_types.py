"""mypy holds every shadow class to the shadow protocols (issue 61 item 3): the engine takes
``shadow: Updatable`` (``fastema.average._core.Average``) and the picker returns
``AveragingShadow`` / ``WindowingShadow`` (``fastema.torch._placement.pick.make_shadow``), so a
method deleted from a shadow class fails ``mypy`` where the class is handed over. Proved on
``FlatShadow`` (``Average.over`` hands one to the engine), in a subprocess, with mypy reading a
copy of ``fastema/flat.py`` without the method in place of the real one (``--shadow-file``). To
keep it cheap mypy reads only the modules the check needs (``--follow-imports=skip``: no torch,
numpy or numba stubs; ~3 s of CPU cold, in a cache of its own in tmp_path that the two runs share)
and the errors that count are the engine's (``_layout.py``, which the project's mypy run does not
check, reports its own)."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAT = ROOT / "fastema" / "flat.py"


def _without(source: str, cls: str, method: str) -> str:
    """``source`` with ``cls.method`` deleted (its lines, decorators included)."""
    tree = ast.parse(source)
    node = next(n for c in tree.body if isinstance(c, ast.ClassDef) and c.name == cls
                for n in c.body if isinstance(n, ast.FunctionDef) and n.name == method)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    assert node.end_lineno is not None
    lines = source.splitlines(keepends=True)
    return "".join(lines[:first - 1] + lines[node.end_lineno:])


#: the engine, the shadow classes it is handed and their bases (the rest is skipped)
MODULES = ["fastema/_shadow.py", "fastema/_layout.py", "fastema/_steps.py", "fastema/flat.py",
           "fastema/average/_core.py"]


def _mypy(tmp_path: pathlib.Path, *shadow: str) -> list[str]:
    """The errors mypy reports in the engine's and the shadow's modules."""
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(tmp_path / "cache"), "--follow-imports=skip", "--no-error-summary",
           *shadow, *MODULES]
    got = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert got.returncode in (0, 1) and not got.stderr, got.stdout + got.stderr
    return [line for line in got.stdout.splitlines()
            if line.startswith(("fastema/average/_core.py", "fastema/flat.py"))]


@pytest.mark.parametrize("method", ["update"])
def test_deleting_a_method_of_a_shadow_class_fails_mypy(tmp_path, method):
    pytest.importorskip("mypy")
    source = FLAT.read_text()
    assert _mypy(tmp_path) == []                                 # the real code passes
    cut = tmp_path / "flat.py"
    cut.write_text(_without(source, "FlatShadow", method))
    assert f"def {method}(" not in cut.read_text()
    got = "\n".join(_mypy(tmp_path, "--shadow-file", "fastema/flat.py", str(cut)))
    assert "fastema/average/_core.py" in got and '"Updatable"' in got, got   # Average.over
    assert "missing following" in got and got.endswith(f"note:     {method}"), got   # named
    assert FLAT.read_text() == source                            # the real file untouched
