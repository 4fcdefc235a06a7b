"""The oldest TensorFlow ``fastema.tensorflow`` runs on (``fastema.tensorflow._floor.TF_FLOOR``): the
oldest release its tests passed on, as ``pyproject.toml``'s ``tensorflow`` extra and the install
guide say. Before 2.20 a TensorFlow tensor has no ``__dlpack__`` (by which fastema reads it): an older
TensorFlow is refused at import, by name, with what to do, and the array functions handed such a
tensor say the same (before: the extra said tensorflow >= 2.16, on which every TensorFlow test
failed with "EagerTensor, which fastema cannot read; pass an array or tensor")."""
import pathlib

import numpy as np
import pytest
from support.floors import import_as

import fastema

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_an_older_tensorflow_is_refused_at_import_and_the_floor_imports():
    pytest.importorskip("tensorflow")
    from fastema.tensorflow import _floor

    floor = ".".join(map(str, _floor.TF_FLOOR))
    said = import_as("fastema.tensorflow", "tensorflow", "2.19.1")
    assert f"refused: fastema.tensorflow needs tensorflow >= {floor}, found tensorflow 2.19.1" in said, said
    assert f"pip install -U 'tensorflow>={floor}'" in said and "loaded: []" in said
    assert import_as("fastema.tensorflow", "tensorflow", floor + ".0").strip() == "imported"
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"tensorflow>={floor}" in extras["tensorflow"]
    assert any(r.startswith(f"tensorflow-cpu>={floor};") for r in extras["dev"])
    assert f"| `tensorflow` | `tensorflow>={floor}` |" in (ROOT / "docs" / "install.md").read_text()


def test_a_tensorflow_tensor_without_dlpack_is_named_with_the_release_that_has_it():
    """A stand-in for TensorFlow 2.19's ``EagerTensor`` (its module, no ``__dlpack__``; the real one
    gives this message, seen on 2.19.1): the error names TensorFlow and the release to install, not
    "pass an array or tensor"."""
    eager = type("EagerTensor", (), {"__module__": "tensorflow.python.framework.ops"})
    shadow = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"src is a TensorFlow EagerTensor without __dlpack__.*"
                                        r"pip install -U 'tensorflow>=2\.20'"):
        fastema.ema_update_(shadow, eager(), 0.9)
    assert not shadow.any()
