"""A process forked after fastema has run: the child works (CPU kernels, offloaded EMAs) or is told
what to do (CUDA), and nothing the parent had changes.

Forking can kill or hang the child (numba's GNU-OpenMP guard, a worker thread missing in the
child), so the forks happen in one subprocess with a deadline per child; the tests read its report.
"""
import json
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future

import pytest
import torch
from models import mlp
from torch import nn

from fastema.torch import EMA

# The parent forces fastema's parallel kernels on small buffers (so numba's threading layer starts),
# runs every scenario's setup, then forks one child per scenario. A child that hangs past its
# deadline is killed; one that is killed shows its signal.
SCRIPT = textwrap.dedent(r"""
    import concurrent.futures, faulthandler, json, os, signal, sys, time
    import numba, numpy as np, torch
    from torch import nn
    import fastema
    from fastema._launch import config
    from fastema.schedules import PowerWarmup
    from fastema.torch import EMA
    from fastema.torch._placement import folds

    parallel = config.tuned(CPU_SERIAL_BELOW=0, CPU_CHUNK=1024)   # every kernel of these small
    parallel.__enter__()          # models in parallel, all the process long (held, never closed)
    torch.manual_seed(0)
    report = {}

    def model():
        return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8))

    def bump(m, k):
        with torch.no_grad():
            for i, p in enumerate(m.parameters()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * k + i)))

    def state(e):
        s = e.state_dict()
        return {k: v.clone() for k, v in s["averaged"].items()}, (s["calls"], s["updates"])

    def same(a, b):
        return a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])

    def fork(name, child):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the child: report, never return
            try:
                os.close(r)
                faulthandler.dump_traceback_later(120, exit=True)
                torch.set_num_threads(1)               # as DataLoader workers do (torch's own OpenMP pool)
                try:
                    out = child()
                except BaseException as err:
                    out = {"error": f"{type(err).__name__}: {err}"}
                out["parallel"] = getattr(fastema._launch.cpu.pool, "PARALLEL", None)
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 240
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "hung"
                break
            time.sleep(0.05)
        data = os.read(r, 1 << 20)
        os.close(r)
        report[name] = json.loads(data) if data else {"died": status if status == "hung" else
                                                       (os.WTERMSIG(status) if os.WIFSIGNALED(status) else status)}

    # ---- a synchronous EMA and an array function
    m = model()
    e = EMA(m, [PowerWarmup(0.9), PowerWarmup(0.5)], buffers="average")
    for k in range(3):
        bump(m, k); e.update()
    a = np.linspace(-1, 1, 8192, dtype=np.float32); x = np.cos(a) * 3
    fastema.ema_update_(a, x, 0.75)
    report["layer"] = numba.threading_layer()
    before, m_before = state(e), {k: v.clone() for k, v in m.state_dict().items()}

    def sync_child():
        bump(m, 10)
        avg = [e.averaged_state_dict(r) for r in (0, 1)]
        decays = e.decay
        w = {k: v.clone() for k, v in m.state_dict().items()}
        e.update()
        got = [e.averaged_state_dict(r) for r in (0, 1)]
        update_ok = all(torch.allclose(got[r][k], torch.lerp(avg[r][k], w[k], 1 - decays[r]), rtol=2e-6, atol=1e-6)
                        for r in (0, 1) for k in w if w[k].is_floating_point())
        with e.average_parameters(1):
            swapped_ok = all(torch.equal(m.state_dict()[k], got[1][k]) for k in w)
        back_ok = all(torch.equal(m.state_dict()[k], w[k]) for k in w)
        b = a.copy()
        fastema.ema_update_(b, x, 0.75)
        array_ok = bool(np.allclose(b, 0.75 * a + 0.25 * x, rtol=1e-6, atol=1e-6))
        return {"update": update_ok, "swap": swapped_ok, "back": back_ok, "array": array_ok,
                "updates": e.updates}

    fork("sync", sync_child)
    report["sync_parent_kept"] = same(state(e), before) and all(torch.equal(m.state_dict()[k], v)
                                                                 for k, v in m_before.items())
    bump(m, 20); e.update()                          # the parent goes on (parallel kernels, as before)
    report["sync_parent_goes_on"] = e.updates == 4

    # ---- an offloaded EMA, its folds in flight at the fork
    m2 = model()
    off, ref = EMA(m2, 0.9, offload="cpu"), EMA(m2, 0.9)
    for k in range(3):
        bump(m2, k); off.update(); ref.update()      # the last fold may still run when fork() is called
    off_before = state(ref)

    def offload_child():
        joined_ok = same(state(off), off_before)    # the parent waited for the folds: a whole shadow
        for k in range(3, 6):
            bump(m2, k); off.update(); ref.update()
        off.join()
        with off.average_parameters():
            pass
        return {"joined": joined_ok, "equal": same(state(off), state(ref)), "updates": off.updates}

    fork("offload", offload_child)
    report["offload_parent_kept"] = same(state(off), off_before)
    bump(m2, 30); off.update(); ref.update()
    report["offload_parent_goes_on"] = same(state(off), state(ref))

    # ---- a fold that fails just before the fork: the error waits for the next read, in both processes
    def broken(stage, run, *args):
        if stage == "fold":
            raise MemoryError("injected: host fold failed")
        return run(*args)
    with folds.watched(broken):
        bump(m2, 40); off.update()                  # this update is lost
        concurrent.futures.wait([off._avg._queue.pending])   # the worker has run the broken fold (a busy
                                                    # machine may start it late: left first, the fold would succeed)

    def raise_next_read():
        try:
            off.join()
        except MemoryError as err:
            return {"raised": str(err), "kept": same(state(off), state(ref))}
        return {"raised": None}

    fork("failed_fold", raise_next_read)
    report["failed_fold_parent"] = raise_next_read()

    # ---- a free queued in a child (the driver's bindings stood in for: a recorder)
    class Bindings:                                 # cuda-bindings' calls a free makes (results as ints)
        class CUstreamCaptureMode:
            CU_STREAM_CAPTURE_MODE_GLOBAL, CU_STREAM_CAPTURE_MODE_RELAXED = 0, 2

        def __init__(self):
            self.freed, self.mode = [], 0

        def cuThreadExchangeStreamCaptureMode(self, mode):
            before, self.mode = self.mode, mode
            return 0, before

        def cuMemFree(self, handle):
            self.freed.append(handle)
            return (0,)

    def frees():
        from fastema._launch.cuda import frees as deferred
        b = Bindings()
        deferred.defer(b, None, "cuMemFree", 7)
        deferred.free_pending()
        return b.freed

    fork("no_cuda", lambda: {"freed": frees()})     # nothing here has used CUDA: the child may, and frees its own

    # ---- CUDA in a child of a process that had launched on a GPU: refused with the way out
    fastema._launch._cuda()                         # as after a first CUDA launch (no GPU needed to load it)

    def cuda_child():
        from fastema._launch import Group, launch
        try:
            launch("copy", Group("cuda:0", 0, 0, fastema._launch.tables([0], [4], [0], "cpu")),
                   to_shadow=True, row_lo=0, row_hi=1)
        except RuntimeError as err:
            return {"refused": str(err), "freed": frees()}
        return {"refused": None}

    fork("cuda", cuda_child)
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-4000:]
    line = [s for s in out.stdout.splitlines() if s.startswith("REPORT ")]
    assert line, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(line[-1][7:])


def test_a_forked_child_updates_swaps_and_runs_array_functions(report):
    child = report["sync"]
    assert child == {"update": True, "swap": True, "back": True, "array": True, "updates": 4,
                     "parallel": report["layer"] != "omp"}, child
    assert report["sync_parent_kept"] and report["sync_parent_goes_on"]


def test_an_offloaded_ema_in_a_forked_child_gets_a_worker_and_matches_the_synchronous_one(report):
    child = report["offload"]
    assert child.get("joined") and child.get("equal") and child.get("updates") == 6, child
    assert report["offload_parent_kept"] and report["offload_parent_goes_on"]


def test_a_fold_error_from_before_the_fork_is_raised_at_the_next_read_in_both(report):
    for got in (report["failed_fold"], report["failed_fold_parent"]):
        assert got.get("raised") == "injected: host fold failed" and got.get("kept"), got


def test_cuda_in_a_child_of_a_process_that_used_it_is_refused_naming_spawn(report):
    refused = report["cuda"].get("refused") or ""
    assert "forked" in refused and "'spawn'" in refused, report["cuda"]
    assert report["cuda"]["freed"] == [], report["cuda"]            # the parent's objects: the parent's to free


def test_a_child_of_a_process_that_had_not_used_cuda_frees_what_it_queues(report):
    assert report["no_cuda"].get("freed") == [7], report["no_cuda"]


def test_a_child_forked_while_a_fold_ran_refuses_every_read():
    # Another thread of the parent may queue a fold after the before-fork wait: the child's copy
    # of the shadow may then be half-written. Simulated in process: a fold that never ends.
    model = mlp(8, 16, 4, norm=nn.BatchNorm1d, dtype=torch.float32, seed=0)
    off = EMA(model, 0.9, offload="cpu")
    off.update()
    off.join()
    before = off.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    queue = off._avg._queue
    running = Future()                                   # never finishes: its thread "is not in the child"
    queue.open().futures.append(running)
    queue.pending = running
    queue._forked()
    for read in (off.join, off.state_dict, off.update):
        with pytest.raises(RuntimeError, match="forked while an offloaded EMA was folding"):
            read()
    assert (off.updates, off.calls) == (before["updates"], before["calls"])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_the_fork_hook_waits_for_queued_folds_and_raises_nothing():
    from fastema.torch._placement import folds as _folds

    model = mlp(8, 16, 4, norm=nn.BatchNorm1d, dtype=torch.float32, seed=0)
    off = EMA(model, 0.9, offload="cpu")
    gate = threading.Event()

    def slow_then_fail(stage, run, *args):
        if stage != "fold":
            return run(*args)
        gate.wait(5)
        raise MemoryError("injected")

    with _folds.watched(slow_then_fail):
        off.update()
        threading.Timer(0.2, gate.set).start()
        _folds._before_fork()                            # waits for the fold; keeps its error
        assert off._avg._queue.pending.done()
    with pytest.raises(MemoryError, match="injected"):
        off.join()
    assert off.updates == 0 and off.calls == 0


@pytest.mark.parametrize("make", ["ema", "offloaded", "flat"])
def test_an_average_sent_to_another_process_is_refused_before_it_leaves(make):
    # The way to a 'spawn' child is pickle: a copy's kernel tables held the parent's addresses, and
    # the child crashed (SIGSEGV) at its first update. Refused in the parent, naming what to send.
    import copy
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import fastema

    model = mlp(8, 16, 4, norm=nn.BatchNorm1d, dtype=torch.float32, seed=0)
    obj = {"ema": lambda: EMA(model, 0.9), "offloaded": lambda: EMA(model, 0.9, offload="cpu"),
           "flat": lambda: fastema.FlatShadow([p for p in model.parameters()])}[make]()
    if make != "flat":
        obj.update()
    for send in (pickle.dumps, ForkingPickler.dumps, copy.deepcopy):
        with pytest.raises(TypeError, match=r"cannot be (pickled or )?copied.*state_dict\(\)"):
            send(obj)
