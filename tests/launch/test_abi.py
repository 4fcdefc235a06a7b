"""fastema's own kernel argument ABI (``fastema._launch.cuda.abi``, issue 54 item 2) against numba-cuda's.

For every variant the launchers ask for (``fastema._launch.shipped.variants.every_variant``), arguments of the
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

from fastema._launch.cuda import abi  # noqa: E402
from fastema._launch.shipped.variants import every_variant  # noqa: E402
from testkit.fake_driver import FakeDeviceArray, numba_marshalling  # noqa: E402

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
    from fastema._launch.cuda import device_code

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
        if "numba.cuda" not in text and "_launch/cuda/" not in path.as_posix():
            continue                                      # the CPU dispatcher's overloads (cpu/) are numba's own
        code = re.sub(r'"""(.|\n)*?"""', "", text)        # docstrings name them
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in private.finditer(code)]
    assert not found, found


# ---------------------------------------------------------------- the shipped images themselves (issue 78 item 4)

def _sections(elf: bytes) -> dict:
    """``{name: bytes}`` of a 64-bit ELF's sections."""
    import struct

    shoff, = struct.unpack_from("<Q", elf, 0x28)
    size, count, names = struct.unpack_from("<HHH", elf, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", elf, shoff + i * size) for i in range(count)]
    table = heads[names][4]
    return {elf[table + n:elf.index(b"\0", table + n)].decode(): elf[o:o + s] for n, _, _, _, o, s in heads}


def _kparams(info: bytes) -> tuple:
    """``([(ordinal, offset, size)], bank size)`` of a kernel's ``.nv.info.<kernel>`` attributes:
    ``EIATTR_KPARAM_INFO`` (0x17: index, ordinal, offset, flags with the size in bits 18..31) and
    ``EIATTR_PARAM_CBANK`` (0x0a: the bank's size in the high half); each attribute a format byte, an
    attribute byte, then (format 4) a 2-byte length and the value, or (formats 1-3) 2 bytes."""
    import struct

    i, params, bank = 0, [], None
    while i + 3 < len(info):
        fmt, attr = info[i], info[i + 1]
        i += 2
        if fmt == 4:
            n, = struct.unpack_from("<H", info, i)
            value = info[i + 2:i + 2 + n]
            i += 2 + n
            if attr == 0x17:
                _, ordinal, offset, word = struct.unpack_from("<IHHI", value)
                params.append((ordinal, offset, (word >> 18) & 0x3FFF))
            elif attr == 0x0A:
                bank = struct.unpack_from("<IHH", value)[2]
        elif fmt in (1, 2, 3):
            i += 2
        else:
            raise ValueError(f"EIATTR format {fmt} at {i - 2}")
    return sorted(params), bank


@pytest.mark.parametrize("name", ["cu13", "cu12"])
def test_every_shipped_image_declares_the_parameters_fastemas_block_lays_out(name):
    """Every cubin of the shipped set (cu13: sm_80, sm_90, sm_100, sm_120; cu12: sm_70 to sm_120) declares,
    for every variant the launchers ask for, the parameter count, sizes and offsets and the bank size that
    ``abi.Layout`` packs (the driver copies each parameter from fastema's block by the image's own offsets:
    gpu_contract.md appendix B); its PTX declares the sizes. Pure parsing of what ships, no GPU."""
    import struct

    from fastema._launch.cuda import device_code

    shipped = device_code.sets().get(name)
    if shipped is None:
        pytest.skip(device_code.problem(name) or f"no shipped {name} set")
    images = shipped.index["images"]
    cubins = sorted(i for i, m in images.items() if m["kind"] == "cubin")
    ptx = [i for i, m in images.items() if m["kind"] == "ptx"]
    assert len(cubins) == {"cu13": 4, "cu12": 8}[name] and len(ptx) == 1, images
    wrong = []
    for key, (_, types) in VARIANTS.items():
        lay = abi.layout(tuple(types))
        sizes = [struct.calcsize(c) for c in lay.codes]
        for image in cubins:
            entry = device_code.entry(name, key, image)
            assert entry is not None, (name, key, image)
            params, bank = _kparams(_sections(entry.code)[".nv.info." + entry.name])
            if ([o for _, o, _ in params], [s for _, _, s in params], bank) != (lay.offsets, sizes, lay.nbytes) \
                    or [o for o, _, _ in params] != list(range(len(sizes))):
                wrong.append((image, key, params, bank))
        entry = device_code.entry(name, key, ptx[0])
        text = entry.code.decode()
        start = text.index(f".entry {entry.name}(")
        if [int(b) // 8 for _, b in _PARAM.findall(text[start:text.index(")", start)])] != sizes:
            wrong.append((ptx[0], key))
    assert len(VARIANTS) >= 298 and not wrong, wrong[:3]
