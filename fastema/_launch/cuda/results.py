"""A cuda-bindings call's result checked: every ``CUresult`` fastema's CUDA path gets is read here,
an error raised as :class:`CudaDriverError` naming the call and the result (``CUDA_ERROR_...``), the
driver's own shutdown at the interpreter's exit (:func:`_gone`) told apart. Imports nothing (the
lowest piece of :mod:`.memory` and :mod:`.frees`)."""
from __future__ import annotations


class CudaDriverError(RuntimeError):
    """A driver call's error: ``call`` (the entry point's name), ``result`` (the ``CUresult``'s
    name, ``CUDA_ERROR_...``) and ``code`` (its number)."""

    def __init__(self, call: str, result: str, code: int):
        super().__init__(f"fastema: the CUDA driver's {call} failed: {result} ({code})")
        self.call, self.result, self.code = call, result, code


def api_error(call: str, err) -> CudaDriverError:
    """The error of ``call``'s result ``err`` (a ``CUresult``; its name, else its number)."""
    return CudaDriverError(call, getattr(err, "name", None) or f"CUresult {int(err)}", int(err))


def check(call: str, result: tuple):
    """``result``'s values after its ``CUresult`` (one: that value; none: None); raises
    :class:`CudaDriverError` on an error."""
    err = result[0]
    if err:
        raise api_error(call, err)
    return result[1] if len(result) == 2 else (result[1:] or None)


def _gone(err) -> bool:
    """The driver shut down (the interpreter's exit): what it held is freed with it."""
    return getattr(err, "name", "") == "CUDA_ERROR_DEINITIALIZED"
