"""The dtypes a merge meets: their names (torch's, without ``torch.``), safetensors codes, sizes,
and which are averaged (the kernels' storage kinds)."""
from __future__ import annotations

from ..kernels.kinds import BF16, F16, F32, F64

#: safetensors code -> dtype name (torch's spelling)
FROM_CODE = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
             "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
             "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64"}
TO_CODE = {v: k for k, v in FROM_CODE.items()}
#: the dtypes an input may hold -> bytes per element: exactly those with a safetensors code (TO_CODE),
#: so whatever is read can be written; any other (complex128: safetensors has no C128) is refused by
#: name when the input is read
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "complex64": 8}
#: the dtypes that are averaged -> their storage kind in the kernels
KIND = {"float32": F32, "bfloat16": BF16, "float16": F16, "float64": F64}
#: what ``dtype=`` takes for the averaged tensors ("same": each tensor's input dtype)
OUTPUT_DTYPES = ("same", "float32", "bfloat16", "float16")
OBJECT = "object"                     # an entry that is not a tensor (a step counter, a string, bytes)


def averaged(dtype: str) -> bool:
    """True for a dtype fastema averages (float64, float32, bfloat16, float16); float8, integers,
    booleans, complex numbers and objects are copied."""
    return dtype in KIND
