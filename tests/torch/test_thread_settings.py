"""fastema leaves torch's and the process's thread settings as the user set them (issue 41, T1).

numba's OpenMP threading layer starts by setting the starting thread's OpenMP thread count to
``NUMBA_NUM_THREADS`` (and nesting on); torch's intra-op pool reads that count when both use one
GNU OpenMP, so a run that set ``torch.set_num_threads(1)`` ran torch on every core after
fastema's first parallel CPU launch. numba's pool starts once per process, so each entry point
runs in a fresh process here. ``NUMBA_NUM_THREADS=3`` makes numba's count differ from both thread
counts the user sets (1 and 2), whatever the machine's core count.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

# Every snippet makes at least one parallel-size CPU launch (>= 2^15 elements over several chunks).
PATHS = {
    "ema_update_": """
        import numpy as np, fastema
        a, b = np.zeros(1 << 20, np.float32), np.ones(1 << 20, np.float32)
        fastema.ema_update_(a, b, decay=0.9); fastema.ema_update_(a, b, decay=0.9)
        assert abs(float(a[0]) - 0.19) < 1e-6
    """,
    "FlatShadow": """
        import numpy as np, fastema
        src = np.ones(1 << 20, np.float32)
        flat = fastema.FlatShadow([src], rows=2, init="zeros")
        flat.update([0.9, 0.5]); flat.update([0.9, 0.5])
        assert abs(float(flat.view(0)[0]) - 0.19) < 1e-6
    """,
    "EMA": """
        from fastema.torch import EMA
        m = torch.nn.Linear(1 << 10, 1 << 10, bias=False)
        ema = EMA(m, decay=0.9); ema.update(); ema.update()
    """,
    "EMA offloaded": """
        from fastema.torch import EMA
        m = torch.nn.Linear(1 << 10, 1 << 10, bias=False)
        ema = EMA(m, decay=0.9, offload="cpu"); ema.update(); ema.update(); ema.join()
    """,
    "TargetNetwork": """
        import copy
        from fastema.torch import TargetNetwork
        m = torch.nn.Linear(1 << 10, 1 << 10, bias=False)
        t = TargetNetwork(m, copy.deepcopy(m), tau=0.1); t.update(); t.update()
    """,
    "compat.ModelEmaV3": """
        from fastema.torch.compat import ModelEmaV3
        m = torch.nn.Linear(100_000, 1, bias=False)
        ema = ModelEmaV3(m, decay=0.9); ema.update(m, step=1); ema.update(m, step=2)
    """,
    "Smoother": """
        import numpy as np, fastema
        s = fastema.Smoother(decay=0.9, window=4)
        s.update(np.ones(1 << 17, np.float32)); s.update(np.ones(1 << 17, np.float32))
    """,
    "merge": """
        import numpy as np, tempfile, os
        from safetensors.numpy import save_file
        import fastema.merge._engine as engine
        from fastema.merge import merge_checkpoints
        tuned = engine.tuned(parallel_cores=1)      # the merge's kernel is parallel from 4 cores: force it here
        tuned.__enter__()
        d = tempfile.mkdtemp()
        ins = [os.path.join(d, f"{i}.safetensors") for i in range(2)]
        for i, p in enumerate(ins):
            save_file({"w": np.full(1 << 21, i, np.float32)}, p)
        merge_checkpoints(ins, os.path.join(d, "out.safetensors"), read="mmap")   # its parallel kernel
    """,
}

SCRIPT = """
import json, sys, torch
threads, when = int(sys.argv[1]), sys.argv[2]
if when == "before":
    torch.set_num_threads(threads)
torch.get_num_threads()                         # torch's pool initialised, as in any loop that ran an op


def openmp():                                   # each GNU OpenMP loaded now: (its max threads, max active levels)
    import ctypes
    libs = sorted({{line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}})
    return {{p: (ctypes.CDLL(p).omp_get_max_threads(), ctypes.CDLL(p).omp_get_max_active_levels()) for p in libs}}


omp_before = openmp()
{body}
after_first = torch.get_num_threads()
if when == "after":                             # a setting made after fastema's first launch holds too
    torch.set_num_threads(threads)
    {body_again}
omp_after = openmp()
print(json.dumps({{"torch": torch.get_num_threads(), "after_first": after_first,
                  "openmp_kept": all(omp_after[p] == v for p, v in omp_before.items())}}))
"""


def run_path(name: str, threads: int, when: str, env: dict | None = None) -> dict:
    body = textwrap.dedent(PATHS[name])
    script = SCRIPT.format(body=body, body_again=textwrap.indent(body, "    ").strip())
    full_env = {**os.environ, "NUMBA_NUM_THREADS": "3", **(env or {})}
    full_env.pop("NUMBA_THREADING_LAYER", None)
    done = subprocess.run([sys.executable, "-c", script, str(threads), when], capture_output=True, text=True,
                          env=full_env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(PATHS))
def test_a_parallel_update_leaves_torch_at_the_one_thread_the_user_set(name):
    out = run_path(name, 1, "before")
    assert out["after_first"] == 1 and out["torch"] == 1 and out["openmp_kept"], out


@pytest.mark.parametrize("name", ["ema_update_", "compat.ModelEmaV3"])
def test_a_parallel_update_leaves_torch_at_two_threads_the_user_set(name):
    out = run_path(name, 2, "before")
    assert out["after_first"] == 2 and out["torch"] == 2, out


def test_a_thread_count_set_after_the_first_launch_holds_over_later_launches():
    out = run_path("ema_update_", 1, "after")
    assert out["torch"] == 1, out


def test_omp_num_threads_from_the_environment_holds_after_a_parallel_update():
    out = run_path("ema_update_", 0, "env", env={"OMP_NUM_THREADS": "1"})
    assert out["after_first"] == 1 and out["torch"] == 1, out
