"""The oldest TensorFlow ``fastema.tensorflow`` runs on (``fastema._floors.FLOORS``): the oldest release
its tests passed on, as ``pyproject.toml``'s ``tensorflow`` extra and the install guide say. Before 2.20
a TensorFlow tensor has no ``__dlpack__`` (by which fastema reads it): an older TensorFlow is refused at
import, by name, with what to do, and the array functions handed a TensorFlow object without
``__dlpack__`` say what to do with it: upgrade such a TensorFlow, else pass an eager dense tensor
(before: the extra said tensorflow >= 2.16, on which every TensorFlow test failed with "EagerTensor,
which fastema cannot read; pass an array or tensor")."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from support.floors import import_as

import fastema
from fastema._floors import floor

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLOOR = floor("tensorflow")


def test_an_older_tensorflow_is_refused_at_import_and_the_floor_imports():
    pytest.importorskip("tensorflow")
    said = import_as("fastema.tensorflow", "tensorflow", "2.19.1")
    assert f"refused: fastema.tensorflow needs tensorflow >= {FLOOR}, found tensorflow 2.19.1" in said, said
    assert f"pip install -U 'tensorflow>={FLOOR}'" in said and f"'tensorflow-cpu>={FLOOR}'" in said
    assert "loaded: []" in said
    assert import_as("fastema.tensorflow", "tensorflow", FLOOR + ".0").strip() == "imported"
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"tensorflow>={FLOOR}" in extras["tensorflow"]
    assert any(r.startswith(f"tensorflow-cpu>={FLOOR};") for r in extras["dev"])
    assert f"| `tensorflow` | `tensorflow>={FLOOR}` |" in (ROOT / "docs" / "install.md").read_text()


_SPARSE = """
import numpy as np
import tensorflow as tf
import fastema
{set_version}
shadow = np.zeros(4, np.float32)
try:
    fastema.ema_update_(shadow, tf.sparse.from_dense(tf.ones(4)), 0.9)
except TypeError as e:
    print(e)
assert not shadow.any()
"""


@pytest.mark.parametrize("version", [None, "2.19.1"], ids=["this TensorFlow", "TensorFlow 2.19"])
def test_a_tensorflow_object_without_dlpack_says_what_to_do(version):
    """A real ``tf.SparseTensor`` (no ``__dlpack__`` on any release): on a TensorFlow that gives its
    dense tensors one, pass an eager dense tensor; on one that gives none (2.19, its version set),
    upgrade (seen on the real 2.19.1, for its ``EagerTensor``)."""
    pytest.importorskip("tensorflow")
    code = _SPARSE.format(set_version=f"tf.__version__ = {version!r}" if version else "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    said = out.stdout.strip().splitlines()[-1]
    assert said.startswith("src is a TensorFlow SparseTensor"), said
    if version is None:
        assert "pass an eager dense tensor or a tf.Variable" in said and "pip install" not in said
    else:
        assert f"TensorFlow {version} gives its tensors no __dlpack__" in said
        assert f"pip install -U 'tensorflow>={FLOOR}'" in said


def test_a_stand_in_tensorflow_object_is_read_as_tensorflow_without_tensorflow_loaded():
    """An object of a ``tensorflow`` module where TensorFlow is not loaded (no version to judge):
    what to pass, never "pass an array or tensor"."""
    eager = type("EagerTensor", (), {"__module__": "tensorflow.python.framework.ops"})
    shadow = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"src is a TensorFlow EagerTensor, which has no __dlpack__.*"
                                        r"pass an eager dense tensor"):
        fastema.ema_update_(shadow, eager(), 0.9)
    assert not shadow.any()
