"""The lower bounds of the extras whose faces do not refuse an older release themselves, held to
the install guide's table ("Which framework release" says why each is what it is): transformers
4.46.3's ``Trainer`` could not resume under torch >= 2.6 (its own ``torch.load`` of its RNG state),
4.49.0 could (before: the extras said transformers >= 4.46)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_transformers_extras_and_the_install_guide_agree():
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    bounds = {r for name in ("transformers", "dev") for r in extras[name] if re.match(r"transformers\b", r)}
    assert {re.match(r"transformers>=([\d.]+)", b).group(1) for b in bounds} == {"4.49"}, bounds
    assert "| `transformers` | `transformers>=4.49`, `accelerate>=1.0` |" in (
        ROOT / "docs" / "install.md").read_text()
