"""The metric smoothers' serial CPU kernels keep no reference counts inside their loop (``kernels.cpu``'s
``_NO_REFCOUNTS``): with numba's counts on, each stream paid an atomic increment and decrement of every
array argument and the loop did not vectorise (``Smoother.update`` at 10**6 streams on one thread:
150-320 ms against 15 ms)."""
import numba
import numpy as np
import pytest

from fastema.kernels import cpu as K
from fastema.kernels.kinds import DEBIASED, EMA_PART, F32, F64, SMA_PART, STREAM_SCALE


@pytest.mark.parametrize("kind", [F32, F64])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_serial_metric_kernels_are_built_without_reference_counts(kind, weighted):
    for parts in (EMA_PART, SMA_PART, EMA_PART | SMA_PART):
        kernel = K.streams_kernel(kind, parts, True, weighted, False)
        assert kernel.targetoptions.get("_nrt") is False, (parts, kernel.py_func.__qualname__)


def test_the_serial_ema_kernel_counts_no_references_in_its_code():
    """The machine code itself (compiled afresh: the cached code cannot be inspected), with non-finite
    values skipped: the body that branches on them, where the counts stayed in the loop."""
    shipped = K.streams_kernel(F64, EMA_PART, True, False, False)
    options = {k: v for k, v in shipped.targetoptions.items() if k != "nopython"}     # njit sets it
    fresh = numba.njit(**options)(shipped.py_func)
    ab, f64, i32 = np.zeros(8), np.zeros(1), np.zeros(1, np.int32)
    fresh(np.array([1.0, np.nan, 3.0, 4.0]), 1.0, f64, False, DEBIASED, 0.5, ab, f64, f64, i32, f64, f64, i32,
          0, 0, False)
    assert (ab / STREAM_SCALE).tolist() == [1.0, 1.0, 0.0, 0.0, 3.0, 1.0, 4.0, 1.0]
    ir = fresh.inspect_llvm(fresh.signatures[0])
    counted = ir.count("@NRT_incref(") + ir.count("@NRT_decref(")
    assert counted == 0, f"{counted} reference-count calls in the serial kernel's code"
