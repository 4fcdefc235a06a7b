"""The fake GPU of the tests (``tests/support``: :class:`FakeDriver`, :func:`fake_gpu`), re-exported
for ``bench/``'s scripts until bench/ is reorganised (they import ``gpu_fake`` from ``bench/``)."""
import pathlib
import sys

_TESTS = str(pathlib.Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support.fake_driver import PRIMARY, FakeDeviceArray, FakeDriver  # noqa: E402,F401
from support.fake_gpu import STUB_CONTEXT, fake_gpu, rl_mlp, stub_driver_dir  # noqa: E402,F401
