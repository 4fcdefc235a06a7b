"""What a per-call CUDA path runs, by profile (issue 70, "Done when"): after the first call (which prepares
the launch: the variant found by its numba types, the argument block laid out once), a call of
``ema_update_``, ``copy_``, ``swap_``, ``flag_nonfinite_``, ``ema_update_many_``, ``FlatShadow.update`` or
``EMA.update`` on the fake GPU makes no numba ``typeof``, builds no argument block and makes no ctypes
object or call: the block is patched by ``struct`` (``abi.Block.patch``) where an argument is new. The
profile is ``sys.setprofile``'s: every Python call and every C function call."""
import os
import sys

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the fake GPU's launch path, not the simulator's dispatcher", allow_module_level=True)
pytest.importorskip("numba.cuda")
pytest.importorskip("cuda.core")
torch = pytest.importorskip("torch")

import fastema  # noqa: E402
from fastema.torch import EMA  # noqa: E402
from testkit.fake_gpu import fake_gpu, rl_mlp  # noqa: E402


def _calls(fn, times: int = 3) -> list:
    """``(kind, module or file, name)`` of every call ``fn()`` makes, ``times`` times."""
    seen: list = []

    def profile(frame, event, arg):
        if event == "call":
            seen.append(("py", frame.f_code.co_filename, frame.f_code.co_name))
        elif event == "c_call":
            seen.append(("c", getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__module__,
                         getattr(arg, "__qualname__", repr(arg))))

    sys.setprofile(profile)
    try:
        for _ in range(times):
            fn()
    finally:
        sys.setprofile(None)
    return seen


def _forbidden(seen: list) -> list:
    bad = []
    for kind, where, name in seen:
        where = str(where)
        if "typeof" in name or (kind == "py" and "numba" in where and "typeof" in where):
            bad.append((kind, where, name))                          # numba's typing of an argument
        elif "ctypes" in where:
            bad.append((kind, where, name))                          # a ctypes object or call
        elif kind == "py" and where.endswith(os.path.join("_launch", "cuda", "abi.py")) \
                and name not in ("patch", "patched", "fits", "_scalar", "<lambda>", "to_values", "_f16",
                                 "_array_values"):
            bad.append((kind, where, name))                          # a new block or layout
    return bad


def _scenarios():
    g = torch.Generator().manual_seed(0)
    s, x = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    flag = torch.zeros(1, dtype=torch.int32)
    s16, steps = s.bfloat16(), iter(range(10 ** 6))
    model = rl_mlp()
    params = [p.detach() for p in model.parameters()]
    shadows = [p.clone() for p in params]
    flat = fastema.FlatShadow(params)
    ema = EMA(model, 0.99)
    return {
        "ema_update_": lambda: fastema.ema_update_(s, x, 0.99),
        "ema_update_, stochastic rounding (a new key each step)": lambda: fastema.ema_update_(
            s16, x, 0.99, rounding="stochastic", seed=1, step=next(steps)),
        "copy_": lambda: fastema.copy_(a, b),
        "swap_": lambda: fastema.swap_(a, b),
        "flag_nonfinite_": lambda: fastema.flag_nonfinite_(flag, x),
        "ema_update_many_": lambda: fastema.ema_update_many_(shadows, params, 0.99),
        "FlatShadow.update": lambda: flat.update(0.99),
        "EMA.update": ema.update,
    }


def test_no_numba_type_no_block_and_no_ctypes_per_call():
    with fake_gpu(record=False) as fake, torch.no_grad():
        for name, fn in _scenarios().items():
            fn()
            fn()                                                     # prepared, bound, warm
            before = sum(1 for e in fake.launches if e[0] == "load")
            seen = _calls(fn)
            assert _forbidden(seen) == [], (name, _forbidden(seen)[:5])
            assert sum(1 for e in fake.launches if e[0] == "load") == before, name


def test_the_profile_sees_what_the_first_call_does():
    """The check can fail: a first call (the launch prepared: numba's typeof, a block laid out) is seen."""
    with fake_gpu(record=False):
        a, b = torch.zeros(32), torch.ones(32)
        seen = _calls(lambda: fastema.ema_update_(a, b, np.float64(0.5)), times=1)
    assert any("typeof" in name for _, _, name in _forbidden(seen)), _forbidden(seen)[:5]
