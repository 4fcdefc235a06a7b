"""``fastema._launch.cuda.argtypes.typeof`` against numba-cuda's ``typeof(value, Purpose.argument)``, value
by value: the name (the variant's key in the shipped code's index, which the build makes with numba's)
and the numba type it stands for (what the fallback compiler is given)."""
import numpy as np
import pytest

pytest.importorskip("numba.cuda")

from numba.cuda.typing.typeof import Purpose  # noqa: E402
from numba.cuda.typing.typeof import typeof as numba_typeof  # noqa: E402

from fastema._launch.cuda import abi, argtypes  # noqa: E402
from testkit.fake_driver import FakeDeviceArray  # noqa: E402


class _Interface:
    def __init__(self, shape, typestr, strides=None, readonly=False):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0x1000, readonly),
                                         "strides": strides, "version": 3}


_NUMPY = [np.dtype(n).type(1) for n in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                        "uint64", "float16", "float32", "float64")]
VALUES = [True, False, 0, 1, -5, 2 ** 40, 2 ** 63 - 1, -(2 ** 63) + 1, 0.5, np.bool_(True), *_NUMPY,
          (0.1,), (np.float32(1),) * 5, (1, 2.0), (np.float64(1), np.int64(2)), ((1, 2), (3, 4)),
          FakeDeviceArray(8, np.float32), FakeDeviceArray(8, np.int64), FakeDeviceArray(4, np.uint16),
          _Interface((8,), "<f4"), _Interface((8,), "<f4", readonly=True), _Interface((8,), "<u4"),
          _Interface((8,), "<f4", strides=(4,)),            # numba-cuda measures strides in bits: A
          _Interface((8,), "<f4", strides=(32,)),           # ... and so takes these for C
          _Interface((2, 8), "<f8", strides=(512, 64)), _Interface((2, 8), "<f8", strides=(64, 128)),
          _Interface((2, 8), "<f8", strides=(8, 16)), _Interface((), "<i8"),
          2 ** 63, (), 1j, np.complex64(1)]                 # typed by numba-cuda itself


@pytest.mark.parametrize("value", VALUES, ids=[f"{i}-{type(v).__name__}" for i, v in enumerate(VALUES)])
def test_typeof_is_numba_cudas(value):
    mine, numbas = argtypes.typeof(value), numba_typeof(value, Purpose.argument)
    assert str(mine) == str(numbas)
    assert argtypes.as_numba(mine) == numbas


def test_what_the_launchers_pass_is_typed_without_numba():
    """The shipped variants' argument kinds are fastema's own types (no numba type object)."""
    for value in (1, 0.5, True, np.uint32(1), np.float32(1), (np.float32(1),) * 3,
                  FakeDeviceArray(8, np.int64), _Interface((8,), "<u2")):
        assert isinstance(argtypes.typeof(value), argtypes.ArgType), value


def test_the_block_laid_out_from_either_is_one():
    values = (FakeDeviceArray(8, np.int64), FakeDeviceArray(8, np.float32), (np.float32(0.5),) * 3,
              np.uint32(7), True, 3)
    mine = abi.Layout(tuple(map(argtypes.typeof, values)))
    numbas = abi.Layout(tuple(numba_typeof(v, Purpose.argument) for v in values))
    assert (mine.codes, mine.offsets, mine.nbytes) == (numbas.codes, numbas.offsets, numbas.nbytes)


def test_types_are_equal_by_name_and_hashable():
    a, b = argtypes.typeof(FakeDeviceArray(4, np.float32)), argtypes.typeof(FakeDeviceArray(9, np.float32))
    assert a == b and hash(a) == hash(b) and a != argtypes.typeof(FakeDeviceArray(4, np.float64))
    assert argtypes.Scalar("int64") != argtypes.Array("int64", 1, "C")
