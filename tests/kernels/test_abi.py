"""fastema's own kernel argument ABI (``fastema._launch.abi``, issue 54 item 2) against numba-cuda's.

For every variant the launchers ask for (``fastema._launch.variants.every_variant``), arguments of the
variant's numba types are packed by fastema (``abi.Block``) and by numba-cuda 0.30's own
``_Kernel._prepare_args`` followed by cuda.core's ``ParamHolder`` (what numba-cuda's launch hands the
driver): the two blocks must hold the same parameters, value for value, in the same C types, byte for
byte. While numba-cuda 0.30 is installed this documents the ABI the shipped code was compiled against;
the private names are used here only, never in library code (checked below).
"""
import ctypes
import os
import pathlib
import re

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the simulator has no kernel ABI", allow_module_level=True)
pytest.importorskip("numba.cuda.dispatcher")
ParamHolder = pytest.importorskip("cuda.core._kernel_arg_handler").ParamHolder

from support.fake_driver import FakeDeviceArray, numba_marshalling  # noqa: E402

from fastema._launch import abi  # noqa: E402
from fastema._launch.variants import every_variant  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]

VARIANTS = every_variant()


def _value(ty, i: int):
    """A value of numba type ``ty`` (distinct per argument ``i``), as a launcher passes it."""
    from numba.cuda.np import numpy_support

    name = str(ty)
    if hasattr(ty, "ndim"):
        dtype = numpy_support.as_dtype(ty.dtype)
        return FakeDeviceArray(3 + i, dtype, ptr=0x7F0000001000 + 0x1000 * i)
    if hasattr(ty, "types"):
        return tuple(_value(t, i + k) for k, t in enumerate(ty.types))
    if name == "bool":
        return bool(i % 2)
    if name.startswith(("int", "uint")):
        return getattr(np, name)(i + 5)
    return getattr(np, name)(0.25 + i)


def _bytes(address: int, sizes: list) -> list:
    pointers = (ctypes.c_void_p * len(sizes)).from_address(address)
    return [ctypes.string_at(pointers[i], n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("key", list(VARIANTS))
def test_fastemas_block_is_numba_cudas_byte_for_byte(key):
    _, types = VARIANTS[key]
    args = tuple(_value(t, i) for i, t in enumerate(types))
    with numba_marshalling() as params:                   # numba-cuda 0.30's own values for them
        want = params(types, args)
    block = abi.Block(types, args)
    holder = ParamHolder(want)
    sizes = block.sizes
    assert len(sizes) == len(want)
    assert _bytes(block.address, sizes) == _bytes(holder.ptr, sizes)
    for i, value in enumerate(args):                      # patching an argument in place packs the same
        block.patch(i, value)
    assert _bytes(block.address, sizes) == _bytes(holder.ptr, sizes)
    assert sizes == _ptx_parameter_sizes(key), key        # and each is the size the shipped kernel declares


_PARAM = re.compile(r"\.param\s+\.([a-z]+)(\d+)\s+\S+_param_\d+")


def _ptx_parameter_sizes(key: str) -> list:
    """The byte size of each parameter the shipped PTX of variant ``key`` declares (``.param .u64 ...``)."""
    from fastema._launch import device_code

    entry = device_code.entry("cu13", key, "compute_80")
    assert entry is not None, device_code.problem("cu13") or f"not shipped: {key}"
    ptx = entry.code.decode()
    start = ptx.index(f".entry {entry.name}(")
    head = ptx[start:ptx.index(")", start)]
    return [int(bits) // 8 for _, bits in _PARAM.findall(head)]


def test_an_array_argument_must_be_device_memory():
    from numba.cuda import types

    with pytest.raises(abi.NotDeviceMemory, match="must be device memory"):
        abi.Block((types.Array(types.int64, 1, "C"),), (np.zeros(3, np.int64),))


def test_library_code_uses_no_numba_cuda_private_name():
    """Issue 54 item 2: the launch path rested on numba-cuda 0.30's private ``_Kernel._prepare_args``, a
    dispatcher's ``overloads`` and the overload's ``_codelibrary``; no module of fastema uses them now."""
    private = re.compile(r"\._prepare_args\(|\.overloads\b|_codelibrary|\._Kernel\b")
    found = []
    for path in list((ROOT / "fastema").rglob("*.py")) + list((ROOT / "kernels").glob("*.py")):
        text = path.read_text()
        if "numba.cuda" not in text and "cuda_bound" not in path.name and "device_code" not in path.name:
            continue                                      # the CPU dispatcher's overloads (cpu.py) are numba's own
        code = re.sub(r'"""(.|\n)*?"""', "", text)        # docstrings name them
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in private.finditer(code)]
    assert not found, found
