"""The CPU kernels run on the user's thread count (reliability review T2).

A parallel CPU kernel takes as many threads as ``FASTEMA_NUM_THREADS`` says, else
``torch.get_num_threads()`` where torch is imported, else ``OMP_NUM_THREADS``, else numba's own
count; one thread runs the serial twin, and numba's threading layer is then never started. Before,
every parallel-size update ran on numba's full pool (one thread per core) whatever the user set.

Each case runs in a fresh process (numba's pool starts once per process, and the settings are read
at import), with ``NUMBA_NUM_THREADS=3`` so that numba's own count differs from the 1 and 2 the
user sets, whatever the machine. The process replaces the kernel factories that
``fastema._launch.cpu.pool`` calls with ones whose kernels note, at each call, which twin ran and the
calling thread's numba thread count then: the count numba's parallel region reads for its team
(numba's own parallel launch calls ``get_num_threads()`` on the launching thread).
"""
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest

from fastema._launch import config

SCRIPT = r"""
import inspect, json, os, sys, threading
import numpy as np
case = json.loads(sys.argv[1])
if case["numba"]:                                  # the user's own numba setting, made before anything
    import numba
    numba.set_num_threads(case["numba"])
if case["torch"]:
    import torch
    torch.set_num_threads(case["torch"])
import numba
import fastema
from fastema._launch.cpu import pool as C

seen = []                                          # [factory, parallel twin, numba threads at the call, thread]


class Spy:
    # fastema._launch.cpu.pool's view of fastema.kernels.cpu: every kernel it builds notes its calls
    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        real = getattr(self._module, name)
        if not name.endswith("_kernel"):
            return real
        sig = inspect.signature(real)

        def factory(*a, **kw):
            par = bool(sig.bind(*a, **kw).arguments.get("parallel", False))
            kernel = real(*a, **kw)

            def call(*args):
                seen.append([name, par, layer() and numba.get_num_threads(), threading.current_thread().name])
                return kernel(*args)
            return call
        return factory


def layer():                                       # numba's threading layer, None if never started
    try:
        return numba.threading_layer()
    except ValueError:
        return None


spying = C.kernels_from(Spy(C.K))
spying.__enter__()                                 # for the whole process (held, so never closed)
rng = np.random.default_rng(0)
worst = 0.0
if case["path"] == "numpy":                        # the array level: torch is never imported
    a = rng.standard_normal(1 << 20).astype(np.float32)
    ref = a.astype(np.float64)
    for _ in range(2):
        b = rng.standard_normal(1 << 20).astype(np.float32)
        fastema.ema_update_(a, b, 0.9)
        ref = ref + 0.1 * (b - ref)
    worst = float(np.abs(a - ref).max())
else:
    import torch
    from fastema.torch import EMA
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)              # 262k parameters: a parallel-size update
    ema = EMA(model, decay=0.9, offload="cpu" if case["path"] == "offload" else None)
    ref = {k: v.double().clone() for k, v in model.state_dict().items()}
    for step in range(3):
        if case.get("then_torch") and step == 2:  # a new setting between two updates holds from the next
            seen.append("then")
            torch.set_num_threads(case["then_torch"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        ref = {k: r + 0.1 * (v.double() - r) for (k, v), r in zip(model.state_dict().items(), ref.values())}
    got = ema.averaged_state_dict()
    worst = max(float((got[k].double() - r).abs().max()) for k, r in ref.items())
    small = EMA(torch.nn.Linear(8, 8), decay=0.9)  # 72 parameters: always serial
    seen.append("small")
    small.update()
print(json.dumps({"seen": seen, "layer": layer(), "worst": worst, "torch_imported": "torch" in sys.modules,
                  "torch": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
                  "numba": numba.get_num_threads() if layer() else None}))
"""


def run_case(path: str, *, torch: int | None = None, numba: int | None = None, then_torch: int | None = None,
             env: dict | None = None) -> dict:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("FASTEMA_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_THREADING_LAYER")}
    full_env.update({"NUMBA_NUM_THREADS": "3", **(env or {})})
    case = {"path": path, "torch": torch, "numba": numba, "then_torch": then_torch}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), json.dumps(case)], capture_output=True,
                          text=True, env=full_env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["worst"] < 1e-6, out["worst"]              # the float64 reference, whichever twin ran
    return out


def launches(out: dict, upto: str | None = None) -> list:
    """The kernel calls noted (before the marker ``upto``, if given)."""
    seen = out["seen"]
    return [s for s in (seen[:seen.index(upto)] if upto else seen) if not isinstance(s, str)]


@pytest.mark.parametrize("path", ["EMA", "offload"])
def test_one_torch_thread_runs_the_serial_twins(path):
    out = run_case(path, torch=1)
    calls = launches(out)
    assert calls and not any(par for _, par, _, _ in calls), calls
    if path == "offload":                                # the folds ran on the worker thread, serial there too
        assert any(thread.startswith("fastema-offload") for *_, thread in calls), calls
    assert out["layer"] is None, out                     # numba's threading layer never started
    assert out["torch"] == 1, out


@pytest.mark.parametrize("numba", [None, 1])
def test_torch_threads_are_the_parallel_team_and_numbas_count_stays(numba):
    out = run_case("EMA", torch=2, numba=numba, then_torch=1)
    before = launches(out, "then")
    assert any(par for _, par, _, _ in before), before
    assert all(threads == 2 for _, par, threads, _ in before if par), before   # not numba's 3 (or the user's 1)
    after = launches(out, "small")[len(before):]
    assert after and not any(par for _, par, _, _ in after), after   # torch.set_num_threads(1) between updates
    small = out["seen"][out["seen"].index("small") + 1:]
    assert small and not any(par for _, par, _, _ in small), small   # a small update stays serial
    assert out["torch"] == 1 and out["numba"] == (numba or 3), out   # the user's counts, as they set them


def assert_team(out: dict, calls: list, team: int | None) -> None:
    """The launches ``calls`` of the run ``out`` ran serially (``team`` None: no thread layer
    loaded), or in parallel on a team of ``team`` threads of numba's 3."""
    if team is None:
        assert calls and not any(par for _, par, _, _ in calls) and out["layer"] is None, out
    else:
        assert any(par for _, par, _, _ in calls), calls
        assert all(threads == team for _, par, threads, _ in calls if par), calls
        assert out["numba"] == 3, out


@pytest.mark.parametrize("omp, team", [("1", None), ("2", 2)])
def test_omp_num_threads_without_torch(omp, team):
    out = run_case("numpy", env={"OMP_NUM_THREADS": omp})
    assert not out["torch_imported"], out
    calls = launches(out)
    assert_team(out, calls, team)


@pytest.mark.parametrize("override, torch, team", [("1", 2, None), ("2", 1, 2)])
def test_fastema_num_threads_wins(override, torch, team):
    out = run_case("EMA", torch=torch, env={"FASTEMA_NUM_THREADS": override, "OMP_NUM_THREADS": "3"})
    calls = launches(out, "small")
    assert_team(out, calls, team)
    assert out["torch"] == torch, out


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5", "²", "4²", "9" * 5000])
def test_a_bad_thread_count_is_named_and_ignored(value):
    """'²' is a digit (``str.isdigit``) that ``int`` refuses: it made ``import fastema`` raise
    (round 7 L4), as would a count of more digits than ``int`` reads; each is named in one warning
    and ignored."""
    said = re.escape(f"FASTEMA_NUM_THREADS={value!r} is not a positive")
    with pytest.warns(RuntimeWarning, match=said):
        assert config.thread_count("FASTEMA_NUM_THREADS", value, "what then") is None
    for good, count in [("4", 4), (" 2 ", 2), ("", None), ("٣", 3)]:    # '٣': a decimal digit
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert config.thread_count("FASTEMA_NUM_THREADS", good, "what then") == count
