"""The metric smoothers' serial CPU kernels keep no reference counts inside their loop (``kernels.cpu``'s
``_NO_REFCOUNTS``): with numba's counts on, each stream paid an atomic increment and decrement of every
array argument and the loop did not vectorise (``Smoother.update`` at 10**6 streams on one thread:
150-320 ms against 15 ms)."""
import numba
import numpy as np
import pytest

from fastema.kernels import cpu as K
from fastema.kernels.kinds import DEBIASED, F32, F64


@pytest.mark.parametrize("kind", [F32, F64])
@pytest.mark.parametrize("skip", [False, True])
def test_the_serial_metric_kernels_are_built_without_reference_counts(kind, skip):
    for kernel in (K.ema_kernel(kind, DEBIASED, skip, False), K.sma_kernel(kind, skip, False)):
        assert kernel.targetoptions.get("_nrt") is False, kernel.py_func.__qualname__


def test_the_serial_ema_kernel_counts_no_references_in_its_code():
    """The machine code itself (compiled afresh: the cached code cannot be inspected), with non-finite
    values skipped: the body that returns early, where the counts stayed in the loop."""
    shipped = K.ema_kernel(F64, DEBIASED, True, False)
    options = {k: v for k, v in shipped.targetoptions.items() if k != "nopython"}     # njit sets it
    fresh = numba.njit(**options)(shipped.py_func)
    a, b = np.zeros(4), np.zeros(4)
    fresh(np.array([1.0, np.nan, 3.0, 4.0]), 1.0, np.zeros(1), False, a, b, 0.5)
    assert a.tolist() == [1.0, 0.0, 3.0, 4.0] and b.tolist() == [1.0, 0.0, 1.0, 1.0]
    ir = fresh.inspect_llvm(fresh.signatures[0])
    counted = ir.count("@NRT_incref(") + ir.count("@NRT_decref(")
    assert counted == 0, f"{counted} reference-count calls in the serial kernel's code"
