"""What the allow-list unpickler of DCP metadata trusts (:mod:`.dcp_unpickler`, the security
boundary): the globals a ``.metadata`` may name (:data:`ALLOWED`), the opcodes that build plain
data (:data:`DATA_OPCODES`), DCP's metadata classes and the exact types of their fields
(:func:`field_types`), the bounds of a parse (:data:`MAX_METADATA`, :data:`MAX_ITEM`,
:data:`MAX_DEPTH`, :data:`LOOK_EVERY`; :class:`BoundedInput`) and how an object of a pickle is
named without calling anything of it (:func:`named`). Imports no framework (torch: when used)."""
from __future__ import annotations

import pickle
import types
from typing import Any

__all__ = ["ALLOWED", "DATA_OPCODES", "DCP_METADATA", "FILESYSTEM", "LOOK_EVERY", "MAX_DEPTH",
           "MAX_ITEM", "MAX_METADATA", "PATHS", "PLAIN", "BoundedInput", "field_types", "named",
           "size_args"]

DCP_METADATA = "torch.distributed.checkpoint.metadata"
FILESYSTEM = "torch.distributed.checkpoint.filesystem"
PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")
#: What a DCP ``.metadata`` may name (module -> names), besides ``torch.Size`` and
#: ``torch.<dtype>``.
ALLOWED = {
    DCP_METADATA: ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                    "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    FILESYSTEM: ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),          # a layout by its name, from torch's own table
    "pathlib": PATHS,
    "pathlib._local": PATHS,
    "collections": ("OrderedDict",),
}
# Opcodes that only build plain data (numbers, strings, bytes, tuples, lists, dicts), move it on the
# stack or the memo, or frame the stream; GLOBAL and STACK_GLOBAL go through find_class, the
# container opcodes through DcpMetadataUnpickler's bookkeeping. Sets and bytearrays: refused.
DATA_OPCODES = (
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG "
    "LONG1 LONG4 FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE "
    "SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8 EMPTY_LIST LIST EMPTY_TUPLE "
    "TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT "
    "MEMOIZE GLOBAL STACK_GLOBAL").split()
# bytes of a .metadata fastema reads (a snapshot's: ~100 bytes a tensor and shard)
MAX_METADATA = 256 << 20
MAX_ITEM = 4 << 20           # bytes of one string, line or frame in it (the pickler frames 64 KiB)
MAX_DEPTH = 32               # objects nested in it, and MARKs open at once (DCP's nest 8 deep)
LOOK_EVERY = 1 << 16         # opcodes between two looks at the memory the parse holds
PLAIN = (type(None), bool, int, float, str)      # a field DCP may add later: plain values only


class BoundedInput:
    """A ``.metadata`` as :class:`DcpMetadataUnpickler` reads it: no read (a string, bytes or a
    frame) and no line longer than :data:`MAX_ITEM`, and ``size`` bytes in all (what it had when
    it was opened): a length field or a line without end asks for nothing more."""

    def __init__(self, file: Any, size: int) -> None:
        self._file, self._left = file, size

    def read(self, n: int = -1) -> bytes:
        if not 0 <= n <= MAX_ITEM:
            raise pickle.UnpicklingError(f"it holds a string, bytes or frame of {n} bytes, more "
                                         f"than the {MAX_ITEM} DCP metadata holds in one")
        return self._take(self._file.read(n))

    def readline(self) -> bytes:
        line = self._file.readline(MAX_ITEM + 1)
        if len(line) > MAX_ITEM:
            raise pickle.UnpicklingError(f"it holds a line longer than {MAX_ITEM} bytes, which "
                                         "DCP metadata never does")
        return self._take(line)

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise pickle.UnpicklingError("it grew while it was read")
        return data


def size_args(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) in (tuple, list) and len(args[0]) <= 64 and \
        all(type(d) is int for d in args[0])


def field_types(md, fs, torch, paths: tuple) -> dict:
    """DCP's metadata classes -> field -> the exact types a ``.metadata`` may give it (checked at
    BUILD; :func:`fastema._io.dcp.check_dcp_metadata` then checks what the containers hold). A
    declared field not listed here (one a later torch adds) may hold a plain value only."""
    import collections
    import dataclasses

    none, size, dicts = type(None), torch.Size, (dict, collections.OrderedDict)
    known: dict[Any, dict[str, tuple]] = {
        md.Metadata: {"state_dict_metadata": dicts, "planner_data": (none, *dicts),
                      "storage_data": (none, *dicts), "storage_meta": (none, md.StorageMeta),
                      "version": (none, str)},
        md.TensorStorageMetadata: {"properties": (md.TensorProperties,), "size": (size,),
                                   "chunks": (list,)},
        md.BytesStorageMetadata: {},
        md.ChunkStorageMetadata: {"offsets": (size,), "sizes": (size,)},
        md.MetadataIndex: {"fqn": (str,), "offset": (none, size), "index": (none, int)},
        md.StorageMeta: {"checkpoint_id": (none, str, *paths), "save_id": (none, str),
                         "load_id": (none, str), "modules": (list,)},
        fs._StorageInfo: {"relative_path": (str,), "offset": (int,), "length": (int,),
                          "transform_descriptors": (none, list, tuple)},
        # its __getstate__'s tuple, in order
        md.TensorProperties: {"__state__": (torch.dtype, type(torch.strided), bool,
                                            md._MEM_FORMAT_ENCODING, bool)},
    }
    out: dict = {}
    for cls, given in known.items():
        fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
        declared = {f.name for f in fields}
        out[cls] = {**{name: PLAIN for name in declared}, **given}
    return out


def named(obj) -> str:
    """What an object of a pickle is, without calling anything of it (no repr, no str)."""
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"the function {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"
