"""A face's import in a fresh interpreter where its framework says another version (the floor
tests of torch, JAX, TensorFlow and Keras: ``tests/torch/test_torch_floor.py``,
``tests/bridges/test_*_floor.py``)."""
import subprocess
import sys

_IMPORT = """
import sys
import {package}
{package}.__version__ = {version!r}
try:
    import {face}
except ImportError as e:
    print("refused:", e)
    print("loaded:", sorted(m for m in sys.modules if m.startswith("{face}.")))
    {after}
else:
    print("imported")
"""


def import_as(face: str, package: str, version: str, after: str = "pass") -> str:
    """What ``import face`` printed with ``package.__version__`` set to ``version`` first:
    ``refused: <the ImportError>`` then ``loaded: <face's submodules left>`` (then what ``after``,
    one statement, prints), or ``imported``."""
    code = _IMPORT.format(package=package, version=version, face=face, after=after)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout
