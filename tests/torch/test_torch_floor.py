"""The oldest torch ``fastema.torch`` runs on (``fastema.torch._face.floor.TORCH_FLOOR``): the torch CI
tests, as ``pyproject.toml``'s ``torch`` extra and the install guide say. An older torch is refused
at import, by name, with what to do, before any of fastema.torch is loaded (before: the extra said
torch >= 2.3, and on torch 2.10-2.12 compiled updates failed or rounded otherwise, and a DCP load
with ``broadcast_from_rank0`` of an FSDP2-sharded attached average came back wrong)."""
import pathlib
import re

import pytest
from support.floors import import_as

from fastema._floors import refuse_older, release
from fastema.torch._face import floor as _floor

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLOOR = ".".join(map(str, _floor.TORCH_FLOOR))


@pytest.mark.parametrize("version", ["2.12.1", "2.10.0+cu128", "1.13.1"])
def test_an_older_torch_is_refused_at_import_naming_both_versions_and_what_to_do(version):
    said = import_as("fastema.torch", "torch", version,
                     after='print("operators:", hasattr(torch.ops.fastema, "update_"))')
    assert f"refused: fastema.torch needs torch >= {FLOOR}, found torch {version}" in said, said
    assert f"pip install -U 'torch>={FLOOR}'" in said
    # nothing of fastema.torch but the package that holds the check (a docstring), no operator
    assert "loaded: ['fastema.torch._face']" in said and "operators: False" in said


@pytest.mark.parametrize("version, refused", [("2.12.9", True), ("2.9.0", True), ("2.13.0", False),
                                              ("2.13.0a0+git1a2b3c4", False), ("2.13.1+cpu", False),
                                              ("2.100.0", False), ("3.0.0", False)])
def test_the_floor_compares_releases_as_numbers(version, refused):
    """``2.9`` is older than ``2.13`` (not as strings); a pre-release or local build of the floor
    is the floor."""
    older = release(version) < _floor.TORCH_FLOOR
    assert older == refused
    if refused:
        with pytest.raises(ImportError, match=re.escape(f"found torch {version}")):
            refuse_older("fastema.torch", "torch", version, _floor.TORCH_FLOOR, "torch", "why")
    else:
        refuse_older("fastema.torch", "torch", version, _floor.TORCH_FLOOR, "torch", "why")


def test_the_installed_torch_is_at_the_floor_or_newer():
    assert import_as("fastema.torch", "torch", "2.13.0").strip() == "imported"


def test_the_extra_and_the_install_guide_name_the_same_floor():
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"torch>={FLOOR}" in extras["torch"]
    for doc in ("README.md", "docs/install.md"):
        text = (ROOT / doc).read_text()
        named = set(re.findall(r"torch ?>= ?(\d+\.\d+)", text))
        assert named == {FLOOR}, (doc, named)
