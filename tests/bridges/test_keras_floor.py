"""The oldest Keras ``fastema.keras`` runs on (``fastema._floors.FLOORS``): the oldest
release its tests passed on (the torch backend), as ``pyproject.toml``'s ``keras`` extra and the
install guide say. An older Keras is refused at import, by name, with what to do (before: the extra
said keras >= 3.0, and on Keras 3.6.0 ``MovingAverageLogs`` found none of a model's running-mean
metrics)."""
import os
import pathlib

import pytest
from support.floors import import_as

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("keras")

from fastema._floors import floor  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLOOR = floor("keras")


def test_an_older_keras_is_refused_at_import_and_the_floor_imports():
    said = import_as("fastema.keras", "keras", "3.6.0")
    assert f"refused: fastema.keras needs keras >= {FLOOR}, found keras 3.6.0" in said, said
    assert f"pip install -U 'keras>={FLOOR}'" in said and "loaded: []" in said
    assert import_as("fastema.keras", "keras", FLOOR + ".0").strip() == "imported"
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"keras>={FLOOR}" in extras["keras"] and f"keras>={FLOOR}" in extras["dev"]
    text = (ROOT / "docs" / "install.md").read_text()
    assert f"| `keras` | `keras>={FLOOR}` |" in text and f"`fastema.keras` needs Keras {FLOOR} or newer" in text
