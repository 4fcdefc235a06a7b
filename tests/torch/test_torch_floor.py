"""The oldest torch ``fastema.torch`` runs on (``fastema._floors.FLOORS``): the oldest release its
tests passed on, as ``pyproject.toml``'s ``torch`` extra and the install guide say. An older torch is
refused at import, by name, with what to do, before any of fastema.torch is loaded (before: the extra
said torch >= 2.3; on torch 2.8 DCP could not flatten an attached average's optimizer state)."""
import pathlib
import re

import pytest
import torch
from support.floors import import_as

from fastema._floors import FLOORS, floor, refuse_older, release

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLOOR = floor("torch")


@pytest.mark.parametrize("version", ["2.9.1", "2.8.0+cu128", "1.13.1"])
def test_an_older_torch_is_refused_at_import_naming_both_versions_and_what_to_do(version):
    said = import_as("fastema.torch", "torch", version,
                     after='print("operators:", hasattr(torch.ops.fastema, "update_"))')
    assert f"refused: fastema.torch needs torch >= {FLOOR}, found torch {version}" in said, said
    assert f"pip install -U 'torch>={FLOOR}'" in said
    # nothing of fastema.torch but the package that holds the check (a docstring), no operator
    assert "loaded: ['fastema.torch._face']" in said and "operators: False" in said


@pytest.mark.parametrize("version, refused", [("2.9.9", True), ("2.1.0", True), ("2.10.0", False),
                                              ("2.10.0a0+git1a2b3c4", False), ("2.11.0+cu130", False),
                                              ("2.100.0", False), ("3.0.0", False)])
def test_the_floor_compares_releases_as_numbers(version, refused):
    """``2.9`` is older than ``2.10`` (not as strings); a pre-release or local build of the floor
    is the floor."""
    found = release(version)
    assert found is not None and (found < FLOORS["torch"]) == refused
    if refused:
        with pytest.raises(ImportError, match=re.escape(f"found torch {version}")):
            refuse_older("fastema.torch", "torch", version, "why")
    else:
        refuse_older("fastema.torch", "torch", version, "why")


@pytest.mark.parametrize("version", ["unknown", "", None])
def test_a_version_that_names_no_release_is_not_judged(version):
    """A build whose version names no release (a local build saying ``unknown``) is let through:
    nothing to compare, and refusing it would stop a working install."""
    assert release(version) is None
    refuse_older("fastema.torch", "torch", version, "why")


def test_the_floor_release_imports_and_the_installed_torch_is_at_it_or_newer():
    assert import_as("fastema.torch", "torch", FLOOR + ".0").strip() == "imported"
    installed = release(torch.__version__)
    assert installed is not None and installed >= FLOORS["torch"], torch.__version__


def test_the_extra_and_the_install_guide_name_the_same_floor():
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"torch>={FLOOR}" in extras["torch"]
    for doc in ("README.md", "docs/install.md"):
        text = (ROOT / doc).read_text()
        named = set(re.findall(r"torch ?>= ?(\d+\.\d+)", text))
        assert named == {FLOOR}, (doc, named)
