"""Long-lived gloo worlds for the distributed tests: one world per size, per test process.

A world is ``size`` spawned processes (spawn, never fork: numba's OpenMP layer is not fork-safe), one
thread each (torch and numba), joined in one gloo process group through a FileStore in the world's own
temporary folder. Each ``World.run(fn, ...)`` sends ``fn(rank, size, *args)`` to every rank; each rank
saves what it returns as ``rank{r}.pt`` in the test's folder, as a fresh world did (tests/dist.py).
Starting a world costs every rank its imports (torch, fastema, numba's kernels, DeepSpeed, ...): the
~50 calls of ``run_ranks`` paid it each; a world pays it once.

Each test still runs as in a fresh world:
- before the body: the test process's ``sys.path`` (pytest adds each test folder to it), the process
  group's collective timeout (``pg_timeout``, set on the default group: every collective times out),
  torch's generator reseeded from the OS as a fresh process's is;
- after it: the environment variables, the working folder, torch's default dtype and device, grad mode,
  deterministic and anomaly modes, the thread counts (torch, numba: 1), the resource limits, the
  signal handlers and the warning filters are put back as they were before the body; then a
  collection (FSDP2's reference cycles freed while every rank still talks; after the state is put back,
  where the test imported modules, what is alive is frozen, gc.freeze, so that the next tests'
  collections do not walk it), a barrier, and a check that
  every rank ran the same number of collectives (an all-reduce of the job's number within a bound).
- a world that a test broke is never reused: a rank raised (the parent stops the whole world at
  once: the other ranks may wait in a collective), the test's wall-clock limit passed, a rank died, the
  barrier or the check failed (a collective timed out or ranks disagree on the collectives they ran),
  the default process group was destroyed or replaced, or a state above could not be put back (a hard
  resource limit lowered). The next test gets a fresh world.

``run_ranks(..., fresh=True)`` (tests/dist.py) spawns a one-off world for a test and ends it after.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing.connection import wait as _wait_any

import torch
import torch.multiprocessing as mp

_INIT_TIMEOUT_S = 120.0       # the group's timeout while it forms (and the default when a test names none)
_CHECK_TIMEOUT_S = 30.0       # the all-reduce after the barrier: every rank is there already
_CLOSE_TIMEOUT_S = 30.0       # a graceful close: a barrier, destroy_process_group, exit
_LIMITS = ("RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CORE", "RLIMIT_STACK")


# ------------------------------------------------------------------------------------------ the ranks

class _Saved:
    """The process-global state a test body may change, taken before it and put back after it."""

    def __init__(self) -> None:
        import resource

        self.env = dict(os.environ)
        self.cwd = os.getcwd()
        self.dtype = torch.get_default_dtype()
        self.device = torch.get_default_device()
        self.grad = torch.is_grad_enabled()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.deterministic_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        self.anomaly = torch.is_anomaly_enabled()
        self.limits = {n: resource.getrlimit(getattr(resource, n)) for n in _LIMITS if hasattr(resource, n)}
        self.handlers = {}
        for s in signal.valid_signals():
            try:
                self.handlers[s] = signal.getsignal(s)
            except (ValueError, OSError):
                pass
        self.filters = list(warnings.filters)

    def restore(self) -> str | None:
        """Puts the state back; returns what could not be (the world is then not reused)."""
        import resource

        import numba

        failed = []
        if dict(os.environ) != self.env:
            os.environ.clear()
            os.environ.update(self.env)
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)
        torch.set_default_dtype(self.dtype)
        if torch.get_default_device() != self.device:         # "cpu" is no device context at all
            torch.set_default_device(None if self.device.type == "cpu" else self.device)
        torch.set_grad_enabled(self.grad)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn)
        torch.set_anomaly_enabled(self.anomaly)
        torch.set_num_threads(1)
        numba.set_num_threads(1)
        for name, limit in self.limits.items():
            if resource.getrlimit(getattr(resource, name)) != limit:
                try:
                    resource.setrlimit(getattr(resource, name), limit)
                except (ValueError, OSError) as err:          # a hard limit lowered: not raised again
                    failed.append(f"{name}: {err}")
        for s, handler in self.handlers.items():
            try:
                if signal.getsignal(s) is not handler and handler is not None:
                    signal.signal(s, handler)
            except (ValueError, OSError, TypeError):
                pass
        warnings.filters[:] = self.filters
        getattr(warnings, "_filters_mutated", lambda: None)()   # the once-per-place registries start over
        return "; ".join(failed) or None


def _agreed(job: int, size: int, group) -> str | None:
    """A barrier (every rank done: nothing torn down under another), then an all-reduce of the job's
    number, waited for within a bound: ranks that ran different collectives (one timed out in a
    collective the other never entered) fail or disagree here."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.distributed_c10d._get_default_group() is not group:
        return "the default process group was destroyed or replaced"
    try:
        dist.barrier()
        t = torch.tensor([job, 7919], dtype=torch.int64)
        dist.all_reduce(t, async_op=True).wait(timeout=datetime.timedelta(seconds=_CHECK_TIMEOUT_S))
        if t.tolist() != [job * size, 7919 * size]:
            return f"the ranks' collectives are out of step (all-reduce gave {t.tolist()})"
    except Exception as err:                                     # a timeout, a closed connection
        return f"the barrier or the check after the test failed: {type(err).__name__}: {err}"
    return None


def _trim() -> None:
    """The freed heap back to the system: a world's ranks live through many tests (their memory adds up)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_FROZEN_AT = [0]                # len(sys.modules) at the rank's last freeze


def _freeze_imports() -> None:
    """After a test, its state put back: where it imported modules, what is alive (the modules, the
    frameworks' objects) is frozen out of the next collections' walk (gc.freeze; the test process does
    the same, tests/support/frozen.py). Only then: a frozen object in a garbage cycle is never freed,
    so freezing after every test would keep, for the rank's life, whatever a later test drops."""
    gc.collect()
    if len(sys.modules) != _FROZEN_AT[0]:
        gc.freeze()
        _FROZEN_AT[0] = len(sys.modules)


def _serve(rank: int, size: int, store: str, conn) -> None:
    """A rank: join the group, then run the jobs the parent sends until it says close or goes away."""
    import numba
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=_INIT_TIMEOUT_S))
    group = c10d._get_default_group()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):                               # the parent is gone
            os._exit(1)
        if msg[0] == "close":
            try:
                gc.collect()
                dist.barrier()
                dist.destroy_process_group()
            finally:
                conn.send(("closed",))
            return
        _, job, path, payload, out, pg_timeout = msg
        sys.path[:] = path
        c10d._set_pg_timeout(datetime.timedelta(seconds=pg_timeout), group)
        torch.seed()                                              # as a fresh process: a seed from the OS
        try:
            fn, args = pickle.loads(payload)      # imports the test's module: what its import sets stays set
            saved = _Saved()
            result = fn(rank, size, *args)
            torch.save(result, os.path.join(out, f"rank{rank}.pt"))
            del result, fn, args
            gc.collect()            # FSDP2 state (reference cycles) freed before the barrier, not in the next test
        except BaseException:
            text = traceback.format_exc()
            print(f"[rank {rank}] " + text, flush=True)
            conn.send(("raised", text))
            try:
                conn.recv()                                       # the parent ends the world
            finally:
                os._exit(1)
        broken = saved.restore()
        _freeze_imports()
        _trim()
        broken = _agreed(job, size, group) or broken
        if broken is None:
            c10d._set_pg_timeout(datetime.timedelta(seconds=_INIT_TIMEOUT_S), group)
        conn.send(("done", broken))


def _entry(rank: int, size: int, store: str, conn) -> None:
    try:
        _serve(rank, size, store, conn)
    except BaseException:
        try:
            conn.send(("raised", traceback.format_exc()))
        except Exception:
            pass
        raise


# ------------------------------------------------------------------------------------------ the parent

class World:
    """``size`` ranks in one gloo group, serving test bodies in turn (see the module's text)."""

    _jobs = 0

    def __init__(self, size: int, start_timeout: float = 300.0) -> None:
        self.size = size
        self.broken: str | None = None
        self.dir = tempfile.mkdtemp(prefix=f"fastema-world{size}-")
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe() for _ in range(size)]
        self.conns = [p[0] for p in pipes]
        child_ends = [p[1] for p in pipes]
        store = os.path.join(self.dir, "store")
        self.procs = []
        for r in range(size):
            p = ctx.Process(target=_entry, args=(r, size, store, child_ends[r]), daemon=False,
                            name=f"fastema-world{size}-rank{r}")
            p.start()
            self.procs.append(p)
        for c in child_ends:
            c.close()
        try:
            self._gather("ready", time.monotonic() + start_timeout, f"{size} ranks did not join in {start_timeout} s")
        except BaseException:
            self.kill()
            raise

    def _gather(self, want: str, deadline: float, late: str) -> list:
        """Each rank's answer (a ``want`` message), in rank order. A rank that raises, dies or is late
        ends the world: the other ranks may wait in a collective for it."""
        got: dict = {}
        pending = {c: r for r, c in enumerate(self.conns)}
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(late)
            ready = _wait_any(list(pending) + list(sentinels), timeout=min(left, 1.0))
            for obj in ready:
                if obj in pending:
                    r = pending[obj]
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        continue                                    # its sentinel says how it ended
                    del pending[obj]
                    if msg[0] == "raised":
                        pid = self.procs[r].pid
                        self.kill()
                        raise mp.ProcessRaisedException(
                            f"\n\n-- Process {r} terminated with the following error:\n{msg[1]}", r, pid)
                    got[r] = msg
                elif sentinels[obj] in pending.values():
                    r = sentinels[obj]
                    conn = self.conns[r]
                    if conn.poll():                                 # its last words came before its end
                        continue
                    self.procs[r].join(timeout=5)
                    code = self.procs[r].exitcode
                    pid = self.procs[r].pid
                    self.kill()
                    raise mp.ProcessExitedException(
                        f"process {r} ({pid}) of a {self.size}-rank world exited with code {code}", r, pid, code)
        return [got[r] for r in range(self.size)]

    def alive(self) -> bool:
        return self.broken is None and all(p.is_alive() for p in self.procs)

    def run(self, fn, args: tuple, out: str, timeout: float, pg_timeout: float) -> None:
        """``fn(rank, size, *args)`` on every rank, each saving its dict in ``out``; raises as the ranks
        did. Afterwards ``self.broken`` says why this world must not serve another test (or is None)."""
        World._jobs += 1
        payload = pickle.dumps((fn, args))
        msg = ("job", World._jobs, list(sys.path), payload, out, float(pg_timeout))
        try:
            for c in self.conns:
                c.send(msg)
            answers = self._gather("done", time.monotonic() + timeout,
                                   f"{self.size} ranks did not finish in {timeout} s")
        except BaseException as err:
            self.broken = f"{type(err).__name__}"
            self.kill()
            raise
        reasons = sorted({a[1] for a in answers if a[1]})
        if reasons:
            self.broken = "; ".join(reasons)

    def close(self) -> None:
        """A barrier and ``destroy_process_group`` on every rank (a world that is whole), else a kill."""
        if self.alive():
            try:
                for c in self.conns:
                    c.send(("close",))
                self._gather("closed", time.monotonic() + _CLOSE_TIMEOUT_S, "the ranks did not close")
                for p in self.procs:
                    p.join(timeout=_CLOSE_TIMEOUT_S)
            except BaseException:
                pass
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        for c in self.conns:
            c.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.broken is None:
            self.broken = "closed"


_worlds: dict[int, World] = {}


def world(size: int) -> World:
    """This process's world of ``size`` ranks, started when first asked for or after one was broken."""
    w = _worlds.get(size)
    if w is None or not w.alive():
        if w is not None:
            w.kill()
        w = _worlds[size] = World(size)
    return w


def close_all() -> None:
    while _worlds:
        _, w = _worlds.popitem()
        w.close()


atexit.register(close_all)
