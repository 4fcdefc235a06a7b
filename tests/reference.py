"""Test references: naive float64 formulas, ulp tolerances, dtype names, and a guard against
host reads of tensor values. Imported by the test modules as ``from reference import ...``
(``tests/`` is on ``sys.path`` through its conftest)."""
import contextlib
import os

import numpy as np

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DTYPES = ("float32", "bfloat16", "float16")

# One unit in the last place, relative, of each storage dtype.
ULP = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def torch_dtype(name):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def naive_ema(shadow64, src64, decay):
    """The textbook formula in float64, element by element."""
    return decay * shadow64 + (1.0 - decay) * src64


def assert_close_to_reference(got, ref64, dtype, scale64):
    """``got`` (any dtype) within a few ulps of the float64 reference.

    The kernels compute in float32 and round once to the storage dtype, so the error is
    at most half an ulp of the storage dtype plus a few float32 ulps of the operands'
    magnitude ``scale64`` (|shadow| + |src|).
    """
    got64 = np.asarray(got, np.float64)
    tol = ULP[dtype] * np.abs(ref64) + 4 * 2.0 ** -23 * scale64 + 1e-38
    if dtype == "float16":
        tol = tol + 2.0 ** -24                      # float16 subnormal spacing
    bad = ~(np.abs(got64 - ref64) <= tol)
    bad &= ~(np.isnan(got64) & np.isnan(ref64))
    assert not bad.any(), (f"{bad.sum()} of {bad.size} elements off: got {got64[bad][:5]}, "
                           f"expected {ref64[bad][:5]}")


@contextlib.contextmanager
def no_host_reads():
    """Fail on any read of a tensor value by the host (item, float, bool, tolist): each syncs a GPU."""
    import torch

    def boom(*a, **k):
        raise AssertionError("a tensor value was read by the host (a host sync on a GPU)")

    saved = {n: getattr(torch.Tensor, n) for n in ("item", "tolist", "__float__", "__bool__")}
    for n in saved:
        setattr(torch.Tensor, n, boom)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def assert_cuda_plan_kernel_equals_the_cpu_one(plan, seed: int, steps, exact: bool) -> None:
    """The CUDA plan kernel (simulator or GPU) against the CPU one over ``steps`` calls of ``plan``
    (its device parameters with ``seed``): bit for bit where ``exact`` (or for the flag and keys),
    else the float64 and float32 arrays to 4 ulps (a GPU's double cos, sin or pow)."""
    from numba import cuda
    from support.shipped import launch  # the shipped plan kernel, never compiled

    from fastema.average._device_plan import parameters
    from fastema.kernels import cpu
    from fastema.kernels import cuda as ema_cuda
    from fastema.kernels.kinds import S_NORMS

    params, decays = parameters(plan, seed)
    rows = plan.rows
    host = dict(state=np.zeros(S_NORMS + rows), w32=np.zeros(rows, np.float32), w64=np.zeros(rows),
                flag=np.zeros(1, np.int32), keys=np.zeros(rows, np.int64))
    dev = {k: cuda.to_device(v) for k, v in host.items()}
    d_params, d_decays = cuda.to_device(params), cuda.to_device(decays)
    for call, step in enumerate(steps):
        cpu.plan_kernel()(host["state"], params, decays, step, host["w32"], host["w64"], host["flag"], host["keys"])
        launch(ema_cuda.plan_kernel(), 1, 1, dev["state"], d_params, d_decays, np.int64(step),
               dev["w32"], dev["w64"], dev["flag"], dev["keys"])
        for k, v in host.items():
            got = dev[k].copy_to_host()
            if exact or k in ("flag", "keys"):
                assert np.array_equal(got, v), (call, k)
            else:
                np.testing.assert_allclose(got, v, rtol=4 * np.finfo(v.dtype).eps, atol=0)
