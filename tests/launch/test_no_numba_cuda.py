"""numba-cuda off the run-time path (issue 70, item 3): a process that uses the shipped device code on
the stub driver (``testkit/fake_gpu.py``, ``stub_driver=True``: fastema's real ``CudaCoreDriver``
over a ``libcuda`` that does nothing) imports no ``numba.cuda`` through ``EMA.update()``,
``fastema.ema_update_``, the swap (``average_parameters()`` in and out), ``TargetNetwork.update``,
``Smoother.update`` and ``Tracker.update``:
the kernels are asked for by name (``fastema._launch.cuda.kernel_refs``), their arguments typed without numba
(``fastema._launch.cuda.argtypes``), the driver imports numba-cuda only for the device work it does through
it and reads ``NUMBA_ENABLE_CUDASIM`` itself.

Here the fake GPU does the device work (uploads, pinned staging, events, context push, compute
capability); ``CudaCoreDriver`` doing it through cuda-bindings, with no numba-cuda, on the stub driver:
``tests/launch/test_cuda_memory.py``. Each check runs in a fresh process (what it asserts is what the
process imported)."""
import os
import subprocess
import sys
import textwrap

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("a process on the stub driver, not the simulator's", allow_module_level=True)
pytest.importorskip("cuda.core")
pytest.importorskip("torch")

from testkit.fake_gpu import stub_driver_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HOOK = """
import importlib.abc, os, sys, traceback
FIRST = []
class _Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numba.cuda" and not FIRST:
            FIRST.append([f"{os.path.relpath(f.filename, ROOT)}:{f.name}"
                          for f in traceback.extract_stack()[:-1] if f.filename.startswith(ROOT)])
        return None
sys.meta_path.insert(0, _Watch())
sys.path.insert(0, os.path.join(ROOT, "tests"))
"""


def _run(body: str, **env) -> str:
    stub = stub_driver_dir()
    if stub is None:
        pytest.skip("no C compiler for the stub driver")
    code = f"ROOT = {ROOT!r}\n" + _HOOK + textwrap.dedent(body)
    environ = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (stub, os.environ.get("LD_LIBRARY_PATH")) if p)}
    environ.pop("NUMBA_ENABLE_CUDASIM", None)
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=environ, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow                                           # a fresh process importing torch (~5-8 s)
def test_choosing_the_driver_and_the_stub_driver_import_no_numba_cuda():
    out = _run("""
        import torch, fastema
        from fastema.torch import EMA
        from fastema._launch.cuda import drivers
        from testkit.fake_gpu import fake_gpu
        assert not drivers.simulator()
        assert type(drivers.default()).__name__ == "CudaCoreDriver", drivers.default()
        with fake_gpu(record=False, stub_driver=True) as fake:
            assert drivers.current() is fake
        print("numba.cuda" in sys.modules, FIRST)
    """)
    assert out.strip() == "False []", out


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_simulator_switch_reads_as_numba_cuda_reads_it(value):
    """:func:`drivers.simulator` before numba-cuda is imported equals numba-cuda's own
    ``ENABLE_CUDASIM`` after (an integer; anything else off)."""
    out = _run("""
        from fastema._launch.cuda import drivers
        before = drivers.simulator()
        assert "numba.cuda" not in sys.modules
        from numba.cuda.core import config
        print(before, bool(config.ENABLE_CUDASIM), drivers.simulator())
    """, NUMBA_ENABLE_CUDASIM=value)
    before, numba_says, after = out.split()
    assert before == numba_says == after, (value, out)


@pytest.mark.slow                                           # a fresh process importing torch (~5-8 s)
def test_the_entry_points_on_shipped_code_import_no_numba_cuda():
    out = _run("""
        import copy
        import torch, fastema
        from fastema.torch import EMA, TargetNetwork
        from testkit.fake_gpu import fake_gpu, rl_mlp

        seen = {}
        with fake_gpu(stub_driver=True) as fake, torch.no_grad():
            model = rl_mlp()
            ema = EMA(model, 0.99)
            ema.update()
            seen["EMA.update"] = "numba.cuda" in sys.modules
            s, x = torch.randn(64), torch.randn(64)
            fastema.ema_update_(s, x, 0.9)
            seen["ema_update_"] = "numba.cuda" in sys.modules
            with ema.average_parameters():
                pass
            seen["swap"] = "numba.cuda" in sys.modules
            net = rl_mlp()
            target = copy.deepcopy(net).requires_grad_(False)
            tn = TargetNetwork(net, target, tau=0.005)
            tn.update()
            seen["TargetNetwork.update"] = "numba.cuda" in sys.modules
            before = sum(1 for e in fake.launches if e[0] == "load")
            sm = fastema.Smoother(decay=0.9, window=5)
            for i in range(3):
                sm.update(torch.full((4,), float(i)))
            seen["Smoother.update"] = "numba.cuda" in sys.modules
            tr = fastema.Tracker(("loss", "acc"), ema=0.9, sma=5)
            for i in range(3):
                tr.update(loss=torch.tensor(float(i)), acc=torch.tensor(0.5))
            seen["Tracker.update"] = "numba.cuda" in sys.modules
            loads = sum(1 for e in fake.launches if e[0] == "load")
            dispatched = sum(1 for e in fake.launches if e[0] == "dispatcher")
        print(seen, FIRST, loads > before >= 4, dispatched)   # shipped code loaded (the streams' too), none dispatched
        import numba.cuda                                   # the watch sees an import (the check can fail)
        print(bool(FIRST))
    """)
    first, watched = out.strip().splitlines()
    assert first == ("{'EMA.update': False, 'ema_update_': False, 'swap': False, 'TargetNetwork.update': False, "
                     "'Smoother.update': False, 'Tracker.update': False} [] True 0"), first
    assert watched == "True"
