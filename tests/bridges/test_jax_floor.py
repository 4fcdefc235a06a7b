"""The oldest jax ``fastema.jax`` runs on (``fastema.jax._floor.JAX_FLOOR``): the oldest release its
tests passed on, as ``pyproject.toml``'s ``jax`` extra and the install guide say. An older jax is
refused at import, by name, with what to do (before: the extra said jax >= 0.4.30, which has no
public ``jax.lax.optimization_barrier``, and on 0.4.35 a vmapped update failed)."""
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("jax")

from fastema.jax import _floor  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLOOR = ".".join(map(str, _floor.JAX_FLOOR))

_IMPORT = """
import sys
import jax
jax.__version__ = {version!r}
try:
    import fastema.jax
except ImportError as e:
    print("refused:", e)
    print("loaded:", sorted(m for m in sys.modules if m.startswith("fastema.jax.")))
else:
    print("imported")
"""


def _run(version: str) -> str:
    out = subprocess.run([sys.executable, "-c", _IMPORT.format(version=version)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.mark.parametrize("version", ["0.4.30", "0.4.35", "0.6.0", "0.6.1"])
def test_an_older_jax_is_refused_at_import_naming_both_versions_and_what_to_do(version):
    said = _run(version)
    assert f"refused: fastema.jax needs jax >= {FLOOR}, found jax {version}" in said, said
    assert f"pip install -U 'jax>={FLOOR}'" in said and "loaded: []" in said


@pytest.mark.parametrize("version", [FLOOR, "0.7.0", "0.10.2", "1.0.0.dev20261129"])
def test_the_floor_and_newer_releases_import(version):
    assert _run(version).strip() == "imported"


def test_the_extras_and_the_install_guide_name_the_same_floor():
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("jax", "flax", "dev"):
        named = {r for r in extras[extra] if re.match(r"jax\b", r)}
        assert named == {f"jax>={FLOOR}"}, (extra, named)
    text = (ROOT / "docs" / "install.md").read_text()
    assert f"| `jax` | `jax>={FLOOR}` |" in text and f"`fastema.jax` needs jax {FLOOR} or newer" in text
