"""The oldest jax ``fastema.jax`` runs on (``fastema._floors.FLOORS``): the oldest release its
tests passed on, as ``pyproject.toml``'s ``jax`` extra and the install guide say. An older jax is
refused at import, by name, with what to do (before: the extra said jax >= 0.4.30, which has no
public ``jax.lax.optimization_barrier``, and on 0.4.35 a vmapped update failed)."""
import pathlib
import re

import pytest
from support.floors import import_as

pytest.importorskip("jax")

from fastema._floors import floor  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLOOR = floor("jax")


@pytest.mark.parametrize("version", ["0.4.30", "0.4.35", "0.6.0", "0.6.1"])
def test_an_older_jax_is_refused_at_import_naming_both_versions_and_what_to_do(version):
    said = import_as("fastema.jax", "jax", version)
    assert f"refused: fastema.jax needs jax >= {FLOOR}, found jax {version}" in said, said
    assert f"pip install -U 'jax>={FLOOR}'" in said and "loaded: []" in said


@pytest.mark.parametrize("version", [FLOOR, "0.7.0", "0.10.2", "1.0.0.dev20261129"])
def test_the_floor_and_newer_releases_import(version):
    assert import_as("fastema.jax", "jax", version).strip() == "imported"


def test_the_extras_and_the_install_guide_name_the_same_floor():
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("jax", "flax", "dev"):
        named = {r for r in extras[extra] if re.match(r"jax\b", r)}
        assert named == {f"jax>={FLOOR}"}, (extra, named)
    text = (ROOT / "docs" / "install.md").read_text()
    assert f"| `jax` | `jax>={FLOOR}` |" in text and f"`fastema.jax` needs jax {FLOOR} or newer" in text
