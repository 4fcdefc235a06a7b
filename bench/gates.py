"""Performance gates that can fail CI (issue 53): deterministic figures against committed expectations,
same-run ratios with a wide factor, and a history of every run.

    python -m bench.gates check   [--only SECTIONS] [--no-rerun]   # CI: exit 1 on a failed gate
    python -m bench.gates update  [--only SECTIONS]                # rewrite bench/gates.json (commit it)
    python -m bench.gates history [FILE ...] [--no-plot]           # bench/out -> bench/history.jsonl, plot

``python bench/gates.py ...`` is the same. SECTIONS is a comma list of :data:`SECTIONS`:

- ``instructions``: host instructions of one steady-state update, counted by valgrind (callgrind's
  ``Ir``: cachegrind's instruction count, with client requests to count only the measured region), for
  ``EMA.update()`` at 6 / 148 / 3000 tensors, ``TargetNetwork.update()``, ``FlatShadow.update()`` and
  ``ema_update_many_``, on the CPU kernels and under the fake GPU (``bench/gpu_fake.py``: fastema's CUDA
  launch path down to the driver call). One valgrind process runs every scenario: imports and warm-up
  uninstrumented, then per scenario a region of N and one of 2N updates; the figure is their
  difference / N. Gate: within ``tolerance.instructions`` (3 %) of the expectation, either way.
- ``counts``: per update, natively: kernel launches, host syncs, allocations on the device and the host,
  collectives (0 on every per-step path; a one-rank gloo group is up while counting), the bytes the
  update's kernels move, and under the fake GPU the bytes uploaded and the blocks launched. Gate: exact.
- ``sass``: the sm_90 machine code of every per-step CUDA kernel as shipped (``kernels/device``), read by
  ``bench/gpu_sass.py`` (registers, spills, stack frame, blocks per SM, the streaming loop's load and
  store widths, bytes in flight). Gate: exact, so a change shows in review.
- ``ratios``: time, fastema over its baseline, both in this process, interleaved, min of N (one thread
  each; the thread's CPU time, so that preemption by other processes is not charged; the wall-time
  ratio is recorded beside it). Gate: fails only past ``tolerance.ratio_factor`` (1.5x) times the
  committed ratio, and only when a rerun of that scenario (twice the rounds) confirms it.

Every ``check`` and ``update`` writes its figures (commit, date, machine, versions) to
``bench/out/gates-STAMP.json``; ``history`` appends those not yet there to ``bench/history.jsonl`` (one
JSON object a line, committed) and plots the headline figures over commits to
``docs/_static/bench_history.png``. A GPU run's file (same format, its ``device`` named) goes in the
same way: ``python -m bench.gates history path/to/gates-....json``.

Needs valgrind (with its headers, ``valgrind/callgrind.h``) and a C compiler for ``instructions``, the
cuda extra (numba-cuda, nvdisasm) for ``counts``' fake GPU and ``sass``. See bench/README.md, "Gates".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
EXPECT = BENCH / "gates.json"
HISTORY = BENCH / "history.jsonl"
PLOT = ROOT / "docs" / "_static" / "bench_history.png"
OUT = BENCH / "out"
SECTIONS = ("instructions", "counts", "sass", "ratios")
DETERMINISTIC = ("instructions", "counts", "sass")
INSTR_TOLERANCE = 0.03            # defaults; the committed file's "tolerance" wins
RATIO_FACTOR = 1.5
SCHEMA = 1

# ---------------------------------------------------------------- comparison (pure, tested)


def update_command(section: str) -> str:
    """The one command that rewrites ``section``'s expectations (to commit with the change that moved them)."""
    return f"python -m bench.gates update --only {section}"


@dataclasses.dataclass
class Failure:
    section: str
    scenario: str
    figure: str
    expected: object
    measured: object
    rule: str

    def message(self) -> str:
        return (f"GATE FAILED [{self.section}] {self.scenario}: {self.figure} measured {_fmt(self.measured)}, "
                f"expected {_fmt(self.expected)} ({self.rule}). If the change is meant, rewrite the expectation "
                f"and commit bench/gates.json with it: {update_command(self.section)}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return repr(v)


def compare_instructions(expected: dict, measured: dict, tolerance: float) -> list[Failure]:
    """A failure for each scenario whose instructions per update moved more than ``tolerance`` (relative,
    either way: a gain is locked in by updating), is not measured, or has no expectation."""
    out = []
    for name in sorted(set(expected) | set(measured)):
        e, m = expected.get(name), measured.get(name)
        if e is None:
            out.append(Failure("instructions", name, "instructions per update", "none committed", m,
                               "a new scenario has no expectation"))
        elif m is None:
            out.append(Failure("instructions", name, "instructions per update", e, "not measured",
                               "the scenario did not run"))
        else:
            moved = m / e - 1.0
            if abs(moved) > tolerance:
                out.append(Failure("instructions", name, "instructions per update", e, m,
                                   f"{moved:+.1%}, tolerance {tolerance:.0%}"
                                   + ("; fewer is good: update to keep the gain" if moved < 0 else "")))
    return out


def compare_exact(section: str, expected: dict, measured: dict) -> list[Failure]:
    """A failure for each figure of each scenario that differs from its expectation (exact)."""
    out = []
    for name in sorted(set(expected) | set(measured)):
        e, m = expected.get(name), measured.get(name)
        if e is None or m is None:
            out.append(Failure(section, name, "all figures", "none committed" if e is None else e,
                               "not measured" if m is None else m,
                               "a new scenario has no expectation" if e is None else "the scenario did not run"))
            continue
        for fig in sorted(set(e) | set(m)):
            if e.get(fig, "absent") != m.get(fig, "absent"):
                out.append(Failure(section, name, fig, e.get(fig, "absent"), m.get(fig, "absent"), "exact"))
    return out


@dataclasses.dataclass
class RatioResult:
    scenario: str
    expected: float | None
    ratio: float                    # the first measurement
    rerun: float | None = None      # the confirming measurement, when the first was past the factor
    times: dict = dataclasses.field(default_factory=dict)
    failed: bool = False

    def note(self, factor: float) -> str:
        if self.expected is None:
            return "no committed ratio"
        limit = factor * self.expected
        if self.rerun is None:
            return f"ok (limit {limit:.3g})"
        if self.failed:
            return f"FAILED: {self.ratio:.3g} then {self.rerun:.3g} on the rerun, limit {limit:.3g}"
        return f"ok: {self.ratio:.3g} was past {limit:.3g}, the rerun gave {self.rerun:.3g} (noise)"


def ratio_gate(expected: dict, measure, factor: float, rerun: bool = True,
               names: list | None = None) -> tuple[list[RatioResult], list[Failure]]:
    """Each scenario of ``names`` (default: ``expected``'s) measured by ``measure(name) -> (ratio, times)``;
    one past ``factor`` x its committed ratio is measured again (``rerun``: ``measure(name, True)``, which
    may take more rounds) and fails only if the rerun is past it too. A scenario without a committed
    ratio fails (run update)."""
    results, failures = [], []
    for name in (names if names is not None else sorted(expected)):
        exp = expected.get(name)
        ratio, times = measure(name)
        r = RatioResult(name, exp, ratio, times=times)
        if exp is None:
            r.failed = True
            failures.append(Failure("ratios", name, "fastema / baseline time", "none committed", ratio,
                                    "a new scenario has no committed ratio"))
        elif ratio > factor * exp:
            if rerun:
                r.rerun, r.times["rerun"] = measure(name, True)
            r.failed = not rerun or r.rerun > factor * exp
            if r.failed:
                confirmed = f"confirmed by a rerun ({r.rerun:.3g})" if rerun else "no rerun asked"
                sides = (f"; fastema {times['fastema_ms']} ms, baseline {times['baseline_ms']} ms"
                         if "fastema_ms" in times and "baseline_ms" in times else "")
                failures.append(Failure("ratios", name, "fastema / baseline time (min of N, same run)", exp, ratio,
                                        f"past {factor:g}x the committed ratio ({factor * exp:.3g}), {confirmed}"
                                        + sides))
        results.append(r)
    return results, failures


# ---------------------------------------------------------------- the tree, the machine, the record


def use_tree() -> None:
    """Import fastema (and ``fastema.kernels``, which the package maps from ``kernels/``) from this tree,
    whatever is installed, and the bench helpers (``gpu_fake``, ``gpu_sass``) from ``bench/``."""
    import importlib.abc
    import importlib.util

    class _Tree(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            folder = {"fastema": ROOT / "fastema", "fastema.kernels": ROOT / "kernels"}.get(name)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "_Tree" for f in sys.meta_path):
        sys.meta_path.insert(0, _Tree())
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}"}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "numba", "numpy", "llvmlite", "numba-cuda", "nvidia-cuda-nvdisasm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "absent"
    vg = shutil.which("valgrind")
    if vg:
        out["valgrind"] = subprocess.run([vg, "--version"], capture_output=True, text=True).stdout.strip()
    return out


def gpu() -> str | None:
    """The machine's GPU, where torch sees one (the gates' figures are still the CPU's and the fake's)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:                                # noqa: BLE001 - no torch: no GPU
        pass
    return None


def record(figures: dict, failures: list, notes: list, wall_s: float, command: str, on: str = "cpu") -> dict:
    """One run's figures with where and when they were measured (what ``bench/out`` and the history keep).
    ``on``: the device the figures were measured on (``device``; the history draws one series per device:
    a GPU run's file, with its device named, goes in beside the CPU's)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"schema": SCHEMA, "run": f"{now.strftime('%Y%m%dT%H%M%SZ')}-{commit[:10]}", "command": command,
            "commit": commit, "dirty": dirty, "subject": _git("log", "-1", "--format=%s")[:100],
            "date": now.isoformat(timespec="seconds"), "machine": {**machine(), "gpu": gpu()}, "device": on,
            "versions": versions(), "figures": figures, "passed": not failures,
            "failures": [f.message() for f in failures], "notes": notes, "wall_s": round(wall_s, 1)}


def write_record(rec: dict, folder: Path = OUT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gates-{rec['run']}.json"
    path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------- host scenarios (instructions, counts)

DECAY = 0.999
HOST = (("EMA.update", 6), ("EMA.update", 148), ("EMA.update", 3000), ("TargetNetwork.update", 6),
        ("FlatShadow.update", 148), ("ema_update_many_", 148))
WHERE = ("cpu", "fake-gpu")


def host_names() -> list[str]:
    return [f"{where} {what}, {n} tensors" for where in WHERE for what, n in HOST]


def _net(n: int):
    """``n`` tensors of 4x4 ``Linear`` layers: the host path, not bandwidth (as bench/gpu_host_cost.py)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(max(1, n // 2))])


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _cuda_factories_on_cpu():
    """Tensors asked for on ``cuda`` made on the CPU (the fake GPU's stand-ins), for a constructor that
    makes its own (``TargetNetwork``'s flags); used around construction only."""
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs = dict(kwargs, device="cpu")
            return func(*args, **kwargs)

    with Mode():
        yield


def build(what: str, n: int, fake: bool):
    """``(update, bytes the update's kernels move)`` for one host scenario (public names only)."""
    import copy

    import fastema
    from fastema.torch import EMA, TargetNetwork

    net = _net(n)
    params = [p.detach() for p in net.parameters()]
    if what == "EMA.update":
        ema = EMA(net, DECAY)
        shadow = sum(parts.get("shadow", 0) for parts in ema.memory(parts=True).values())
        return ema.update, 2 * shadow + _bytes(params)
    if what == "TargetNetwork.update":
        target = copy.deepcopy(net).requires_grad_(False)
        with _cuda_factories_on_cpu() if fake else contextlib.nullcontext():
            tn = TargetNetwork(net, target, tau=0.005)
        return tn.update, 2 * _bytes(target.parameters()) + _bytes(params)
    if what == "FlatShadow.update":
        flat = fastema.FlatShadow(params)
        return (lambda: flat.update(DECAY)), 2 * flat.nbytes + _bytes(params)
    if what == "ema_update_many_":
        shadows = [p.clone() for p in params]
        return (lambda: fastema.ema_update_many_(shadows, params, DECAY)), 3 * _bytes(params)
    raise ValueError(what)


def region_updates(n_tensors: int) -> int:
    """N of the instruction regions (N and 2N updates): short regions, valgrind is ~50x slow."""
    return 20 if n_tensors <= 6 else 8 if n_tensors <= 200 else 3


# ---------------------------------------------------------------- instructions (valgrind)

CLIENT_SOURCE = r"""
#include <valgrind/callgrind.h>
int gates_on_valgrind(void) { return RUNNING_ON_VALGRIND; }
void gates_instrument(void) { CALLGRIND_START_INSTRUMENTATION; }
void gates_zero(void) { CALLGRIND_ZERO_STATS; }
void gates_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void gates_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""
# glibc's memcpy/memset choose ``rep movsb``/``rep stosb`` (counted per byte) or vector loops by the
# addresses' alignment: a realloc'd list's copy then moved ema3000's count by 2-4 % between runs. Never
# the rep forms: runs agree within 0.02 % even with address randomisation on.
GLIBC_TUNABLES = "glibc.cpu.x86_rep_movsb_threshold=1000000000000:glibc.cpu.x86_rep_stosb_threshold=1000000000000"


class ToolMissing(RuntimeError):
    pass


def client_library() -> str:
    """A shared library of callgrind client requests (built once per user with the C compiler)."""
    vg = shutil.which("valgrind")
    if vg is None:
        raise ToolMissing("valgrind is not installed (apt-get install valgrind; it brings valgrind/callgrind.h)")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ToolMissing("no C compiler for the callgrind client requests (apt-get install gcc)")
    include = Path(vg).resolve().parents[1] / "include"
    digest = hashlib.sha256((CLIENT_SOURCE + str(include)).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"fastema-gates-{os.getuid()}"
    lib = folder / f"client-{digest}.so"
    if lib.exists():
        return str(lib)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"client-{digest}.c"
    src.write_text(CLIENT_SOURCE)
    tmp = folder / f"client-{digest}.{os.getpid()}.so"
    done = subprocess.run([cc, "-shared", "-fPIC", "-O2", f"-I{include}", "-o", str(tmp), str(src)],
                          capture_output=True, text=True)
    if done.returncode:
        raise ToolMissing(f"the callgrind client requests did not build (valgrind's headers missing?): "
                          f"{done.stderr.strip()[-400:]}")
    os.replace(tmp, lib)
    return str(lib)


def child_env(**extra) -> dict:
    """A fixed environment: the same hash seed, one thread everywhere, glibc's string routines pinned."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "NUMBA_CACHE_DIR", "LANG", "USER")
           if k in os.environ}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               FASTEMA_NUM_THREADS="1", GLIBC_TUNABLES=GLIBC_TUNABLES, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def parse_callgrind(text: str) -> dict:
    """``{dump name: instructions}`` of a callgrind file with one dump per client request."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("desc: Trigger: Client Request: "):
            name = line[len("desc: Trigger: Client Request: "):].strip()
        elif name is not None and line.startswith(("totals:", "summary:")):
            out[name] = int(line.split()[1])
            name = None
    return out


def per_update(dumps: dict) -> dict:
    """Instructions per update from the ``NAME@N`` and ``NAME@2N`` dumps: (I(2N) - I(N)) / N."""
    regions: dict = {}
    for key, value in dumps.items():
        name, _, n = key.rpartition("@")
        if name:
            regions.setdefault(name, {})[int(n)] = value
    out = {}
    for name, r in regions.items():
        if len(r) == 2:
            n, n2 = sorted(r)
            out[name] = round((r[n2] - r[n]) / (n2 - n))
    return out


def precompile() -> None:
    """Byte-compile this tree's Python (as a first import would): the valgrind process then reads the same
    files whether or not anything ran here before (it writes none: a first run's writes moved the counts)."""
    import compileall

    for folder in ("fastema", "kernels", "bench"):
        compileall.compile_dir(str(ROOT / folder), quiet=2, workers=1)


class Instructions:
    """The valgrind process (started at once, so that other sections run beside it); :meth:`result`."""

    def __init__(self, names: list | None = None):
        lib = client_library()
        precompile()
        self.tmp = tempfile.mkdtemp(prefix="fastema-gates-")
        self.out = Path(self.tmp) / "callgrind.out"
        cmd = [shutil.which("valgrind"), "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
               "--combine-dumps=yes", f"--callgrind-out-file={self.out}", sys.executable, str(Path(__file__)),
               "_instructions-child"] + list(names or [])
        setarch = shutil.which("setarch")
        if setarch and subprocess.run([setarch, platform.machine(), "-R", "true"], capture_output=True).returncode == 0:
            cmd = [setarch, platform.machine(), "-R"] + cmd      # no address randomisation: same layout each run
        self.cmd = cmd
        self.started = time.perf_counter()
        self.log = Path(self.tmp) / "valgrind.log"     # a file, not a pipe: nothing waits on this process
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(GATES_CLIENT=lib, PYTHONDONTWRITEBYTECODE="1"),
                                         stdout=log, stderr=subprocess.STDOUT)

    def result(self, timeout: float = 600) -> dict:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the valgrind process ran past {timeout:.0f} s:\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        log = self.log.read_text(errors="replace")
        self.seconds = time.perf_counter() - self.started
        if self.proc.returncode or not self.out.exists():
            raise RuntimeError(f"the valgrind process failed ({self.proc.returncode}):\n{log[-3000:]}")
        figures = per_update(parse_callgrind(self.out.read_text(errors="replace")))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return figures


def _instructions_child(names: list) -> int:
    """Runs inside valgrind (instrumentation off until every scenario is built and warm)."""
    import ctypes
    import gc

    lib = ctypes.CDLL(os.environ["GATES_CLIENT"])
    lib.gates_dump.argtypes = [ctypes.c_char_p]
    if not lib.gates_on_valgrind():
        print("not under valgrind", file=sys.stderr)
        return 2
    use_tree()
    import torch

    torch.set_num_threads(1)
    import gpu_fake as G

    import fastema

    assert Path(fastema.__file__).resolve().is_relative_to(ROOT), fastema.__file__
    wanted = set(names or host_names())
    built: dict = {w: [] for w in WHERE}

    def make(where):
        for what, n in HOST:
            name = f"{where} {what}, {n} tensors"
            if name in wanted:
                update, _ = build(what, n, where == "fake-gpu")
                for _ in range(64):                      # past CPython's specialisation warm-up
                    update()
                built[where].append((name, update, region_updates(n)))

    def measure(where):
        for name, update, n in built[where]:
            for _ in range(3):                           # instrumented, not counted
                update()
            for k in (n, 2 * n):
                lib.gates_zero()
                lib.gates_toggle()
                for _ in range(k):
                    update()
                lib.gates_toggle()
                lib.gates_dump(f"{name}@{k}".encode())

    make("cpu")
    with G.fake_gpu(record=False):
        make("fake-gpu")
        gc.collect()
        gc.disable()
        lib.gates_instrument()
        measure("fake-gpu")
    measure("cpu")
    return 0


# ---------------------------------------------------------------- counts (native)

SYNC_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                "synchronize", "_local_scalar_dense"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
               "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
               "gather_object", "scatter_object_list", "batch_isend_irecv")


@contextlib.contextmanager
def _process_group(notes: list):
    """A one-rank gloo group, so that a collective on a per-step path runs (and is counted)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield
        return
    folder = tempfile.mkdtemp(prefix="fastema-gates-pg-")
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
    except Exception as err:                          # noqa: BLE001 - no gloo here: count the calls only
        notes.append(f"counts: no one-rank gloo group ({err.__class__.__name__}: {err}); collectives counted at "
                     "torch.distributed's functions only")
        shutil.rmtree(folder, ignore_errors=True)
        yield
        return
    try:
        yield
    finally:
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)


class _Counters:
    """What one update does, counted while it runs: torch's functions (syncs), the ops that make a new
    storage (allocations), collectives (c10d ops and torch.distributed's functions), the CPU kernels'
    entry points (C calls into ``fastema.kernels``) and, under the fake GPU, its log."""

    def __init__(self, fake):
        self.fake = fake
        self.c = {"launches": 0, "host_syncs": 0, "device_allocs": 0, "host_allocs": 0, "collectives": 0,
                  "uploaded_bytes": 0}

    @contextlib.contextmanager
    def active(self):
        import torch
        import torch.distributed as dist
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        c = self.c

        class Calls(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in SYNC_METHODS:
                    c["host_syncs"] += 1
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ns = func.namespace
                if ns in ("c10d", "_c10d_functional", "c10d_functional") and depth[0] == 0:
                    c["collectives"] += 1                 # one torch.distributed did not see
                ptrs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
                for t in _tensors(out):                 # a storage no input had: a new allocation
                    s = t.untyped_storage()
                    if s.nbytes() and s.data_ptr() not in ptrs:
                        ptrs.add(s.data_ptr())
                        c["device_allocs"] += 1
                return out

        def _tensors(obj):
            if isinstance(obj, torch.Tensor):
                yield obj
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    yield from _tensors(o)
            elif isinstance(obj, dict):
                for o in obj.values():
                    yield from _tensors(o)

        kernels = str(ROOT / "kernels")

        def profile(frame, event, arg):
            # A CPU kernel runs either through its bound entry point (a C function of module
            # fastema.kernels.*) or through numba's dispatcher, which reports a "call" of the kernel's
            # Python code to a profiler (the compiled code runs, not the Python).
            if event == "c_call":
                if str(getattr(arg, "__module__", "") or "").startswith("fastema.kernels"):
                    c["launches"] += 1
            elif event == "call" and frame.f_code.co_name == "kernel" and frame.f_code.co_filename.startswith(kernels):
                c["launches"] += 1

        patched = []

        def patch(obj, name, value):
            patched.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

        depth = [0]                                   # one count per outermost call (wrappers call inner ones)
        for mod in (dist, getattr(dist, "distributed_c10d", None)):
            for name in COLLECTIVES:
                fn = getattr(mod, name, None) if mod is not None else None
                if callable(fn):
                    def counted(*a, _fn=fn, **k):
                        c["collectives"] += depth[0] == 0
                        depth[0] += 1
                        try:
                            return _fn(*a, **k)
                        finally:
                            depth[0] -= 1
                    patch(mod, name, counted)
        if self.fake is not None:
            import gpu_fake as G

            def to_device(this, a, stream=0, _orig=G.FakeNumbaCuda.to_device):
                c["device_allocs"] += 1
                c["uploaded_bytes"] += int(getattr(a, "nbytes", 0))
                return _orig(this, a, stream)

            def copy_to_device(this, values, stream=0, _orig=G.FakeDeviceArray.copy_to_device):
                c["uploaded_bytes"] += int(getattr(values, "nbytes", 0))
                return _orig(this, values, stream)

            def copy_to_host(this, _orig=G.FakeDeviceArray.copy_to_host):
                c["host_syncs"] += 1
                return _orig(this)

            def pinned_array(this, n, dtype, _orig=G.FakeNumbaCuda.pinned_array):
                c["host_allocs"] += 1
                return _orig(this, n, dtype)

            patch(G.FakeNumbaCuda, "to_device", to_device)
            patch(G.FakeDeviceArray, "copy_to_device", copy_to_device)
            patch(G.FakeDeviceArray, "copy_to_host", copy_to_host)
            patch(G.FakeNumbaCuda, "pinned_array", pinned_array)
            launches0, log0 = len(self.fake.launches), len(self.fake.log)
        try:
            with Calls(), Ops():
                sys.setprofile(profile)
                try:
                    yield c
                finally:
                    sys.setprofile(None)
        finally:
            for obj, name, old in reversed(patched):
                setattr(obj, name, old)
        if self.fake is not None:
            launched = [e for e in self.fake.launches[launches0:] if e[0] in ("launch", "dispatcher")]
            c["launches"] += len(launched)
            c["blocks_launched"] = sum(int(e[2]) for e in launched if e[0] == "launch" and isinstance(e[2], int))
            c["host_syncs"] += sum(1 for e in self.fake.log[log0:] if e[0] in ("stream.synchronize",
                                                                              "event.synchronize"))


HEAP_WINDOW = 16


class _Discard(list):
    def append(self, item):
        pass


def count_one(update, fake, reps: int = 4) -> dict:
    """Per update (``reps`` of them after a warm-up), every counter of :class:`_Counters`, and the net
    Python heap blocks an update leaves behind (``heap_blocks``: 0 for a path that frees what it makes)."""
    import gc

    for _ in range(5):
        update()
    counters = _Counters(fake)
    with counters.active():
        for _ in range(reps):
            update()
    blocks = []
    kept = (fake.log, fake.launches) if fake is not None else None
    if fake is not None:                              # the fake's own records are not the update's
        fake.log, fake.launches = _Discard(), _Discard()
    try:
        gc.collect()
        for _ in range(3):
            blocks.append(sys.getallocatedblocks())
            for _ in range(HEAP_WINDOW):
                update()
            gc.collect()
        blocks.append(sys.getallocatedblocks())
    finally:
        if kept is not None:
            fake.log, fake.launches = kept
    out = {k: (v // reps if v % reps == 0 else round(v / reps, 2)) for k, v in counters.c.items()}
    # a leak of L blocks an update grows every window by L x HEAP_WINDOW; a cache resizing or letting go
    # of a block once moves one window by a block or two: the smaller of the last two, rounded
    out["heap_blocks"] = round(min(blocks[2] - blocks[1], blocks[3] - blocks[2]) / HEAP_WINDOW)
    return out


def measure_counts(notes: list, names: list | None = None) -> dict:
    use_tree()
    import gpu_fake as G

    wanted = set(names or host_names())
    out = {}
    with _process_group(notes):
        for where in WHERE:
            fake_ctx = G.fake_gpu(record=True) if where == "fake-gpu" else contextlib.nullcontext()
            with fake_ctx as fake:
                for what, n in HOST:
                    name = f"{where} {what}, {n} tensors"
                    if name not in wanted:
                        continue
                    update, moved = build(what, n, where == "fake-gpu")
                    figures = count_one(update, fake)
                    figures["bytes_moved"] = moved
                    if where == "cpu":
                        for k in ("uploaded_bytes",):
                            figures.pop(k, None)
                    out[name] = figures
    return out


# ---------------------------------------------------------------- sass (shipped sm_90 code)


def measure_sass() -> dict:
    use_tree()
    import gpu_sass as S

    problem = S.shipped_problem()
    if problem:
        raise ToolMissing(f"sass: {problem}")
    folder = Path(tempfile.mkdtemp(prefix="fastema-gates-sass-"))
    try:
        reports = [S.analyse(b) for b in S.build_all(S.variants(), folder, source="shipped")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {}
    for r in reports:
        out[r.variant.name] = {
            "registers": r.registers, "spill_bytes": r.spill_stores + r.spill_loads, "stack_frame": r.frame,
            "blocks_per_sm": r.blocks_per_sm, "streaming_loop": "; ".join(lp.widths() for lp in r.streaming) or "-",
            "scalar_fallback_loops": sum(1 for lp in r.loops if lp.fallback),
            "in_flight_B_per_thread": round(r.in_flight_thread, 1),
            "in_flight_KiB_per_SM": round(r.in_flight_sm_kib, 1)}
    return out


# ---------------------------------------------------------------- ratios (wall time, same run)

RATIOS = {
    "flat float32 2^20 (in cache): ema_update_ / torch.lerp_": "flat",
    "GPT-2 small float32: FlatShadow.update / torch._foreach_lerp_": "gpt2",
    "bfloat16 model -> float32 shadow, 3000 x 4096: FlatShadow.update / _foreach_mul_ + _foreach_add_": "bf16",
    "3000 x 4096 float32: FlatShadow.update / torch._foreach_lerp_": "many",
    "swap for evaluation, 3000 x 4096: EMA.swap() x2 / torch_ema store + copy_to + restore": "swap",
    "smoother, 10^6 streams: Smoother.update / torch ops": "smooth",
}
ROUNDS = {"flat": 31, "gpt2": 7, "bf16": 11, "many": 15, "swap": 11, "smooth": 7}   # by a call's cost


class _TorchSmoother:
    """bench/test_bench_smooth.py's baseline: the debiased EMA and an SMA(50) ring in float64 torch ops."""

    def __init__(self, decay, window, shape):
        import torch

        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.d, self.window, self.i = decay, window, 0
        self.num, self.den = z(shape), z(shape)
        self.ring, self.valid = z(window, shape), z(window, shape)

    def update(self, v):
        import torch

        v = v.double()
        ok = torch.isfinite(v)
        v0 = torch.where(ok, v, torch.zeros_like(v))
        self.num = torch.where(ok, self.d * self.num + v0, self.num)
        self.den = torch.where(ok, self.d * self.den + 1, self.den)
        self.ring[self.i % self.window] = v0
        self.valid[self.i % self.window] = ok.double()
        self.i += 1


def ratio_setup(kind: str):
    """``(fastema, baseline)``: two callables doing the same update, on the same inputs."""
    import torch

    import fastema
    from fastema.smooth import Smoother
    from fastema.torch import EMA

    g = torch.Generator().manual_seed(0)

    def params(shapes, dtype=torch.float32):
        return [torch.randn(s, generator=g).to(dtype) for s in shapes]

    many = [(4096,)] * 3000
    if kind == "flat":                                # in cache: 2^24 moved 0.75-2.1 with the VM's load, 2^20 by 8%
        shadow, src = torch.randn(1 << 20, generator=g), torch.randn(1 << 20, generator=g)
        base = shadow.clone()
        return (lambda: fastema.ema_update_(shadow, src, decay=DECAY)), (lambda: base.lerp_(src, 1 - DECAY))
    if kind in ("gpt2", "many", "bf16"):
        from shapes import gpt2_small

        ps = params(gpt2_small() if kind == "gpt2" else many, torch.bfloat16 if kind == "bf16" else torch.float32)
        flat = fastema.FlatShadow(ps, dtype="float32") if kind == "bf16" else fastema.FlatShadow(ps)
        shadows = [p.float() if kind == "bf16" else p.clone() for p in ps]
        if kind == "bf16":
            def base():                               # timm ModelEmaV3's mixed-dtype path
                torch._foreach_mul_(shadows, DECAY)
                torch._foreach_add_(shadows, ps, alpha=1 - DECAY)
        else:
            def base():
                torch._foreach_lerp_(shadows, ps, 1 - DECAY)
        return (lambda: flat.update(DECAY)), base
    if kind == "swap":
        model = torch.nn.Module()
        model.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params(many)])
        ema = EMA(model, DECAY)
        plist = list(model.parameters())
        shadow = [p.detach().clone() for p in plist]
        held: list = []

        def fast():
            ema.swap()
            ema.swap()

        def base():                                   # torch_ema 0.3's store / copy_to / restore, written out
            held[:] = [p.clone() for p in plist]
            for s, p in zip(shadow, plist):
                p.data.copy_(s.data)
            for c, p in zip(held, plist):
                p.data.copy_(c.data)
        return fast, base
    if kind == "smooth":
        values = torch.randn(10 ** 6, generator=g)
        s, t = Smoother(decay=0.99, window=50), _TorchSmoother(0.99, 50, 10 ** 6)
        return (lambda: s.update(values)), (lambda: t.update(values))
    raise ValueError(kind)


def measure_ratio(name: str, again: bool = False, rounds: int | None = None) -> tuple[float, dict]:
    """fastema's time over its baseline's, each the minimum of ``rounds`` (:data:`ROUNDS`; twice as many
    ``again``, a rerun) single calls, interleaved (the order alternating each round) in this process, on
    one thread. The time is the thread's CPU time (both sides run on this thread only: one torch thread,
    fastema's serial kernels): on a shared machine a call preempted by other processes is not charged for
    the wait (wall time moved the 10^6-stream smoother's ratio 6.0-9.6 at a load of 8 on 2 cores, CPU
    time 6.6-7.5), memory stalls are. The wall-time ratio is kept beside it."""
    import gc

    import torch

    torch.set_num_threads(1)
    rounds = rounds or ROUNDS[RATIOS[name]] * (2 if again else 1)
    fast, base = ratio_setup(RATIOS[name])
    for fn in (fast, base, fast, base):               # compile, first touch
        fn()
    cpu: dict = {fast: [], base: []}
    wall: dict = {fast: [], base: []}
    clock, wall_clock = time.thread_time, time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for fn in ((fast, base) if r % 2 == 0 else (base, fast)):
                w, c = wall_clock(), clock()
                fn()
                c, w = clock() - c, wall_clock() - w
                cpu[fn].append(c)
                wall[fn].append(w)
    finally:
        gc.enable()
    out = {"fastema_ms": round(min(cpu[fast]) * 1e3, 3), "baseline_ms": round(min(cpu[base]) * 1e3, 3),
           "wall_ratio": round(min(wall[fast]) / min(wall[base]), 4), "rounds": rounds}
    ratio = min(cpu[fast]) / min(cpu[base])
    del fast, base, cpu, wall
    gc.collect()
    return ratio, out


# ---------------------------------------------------------------- commands


def load_expectations(path: Path = EXPECT) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def measure(sections: list, notes: list, ratios=None, log=print) -> tuple[dict, dict]:
    """Every section of ``sections``: ``counts`` first (it runs every host scenario natively, so a kernel
    missing from numba's cache is compiled here, not under valgrind), then the valgrind process starts and
    ``sass`` and the ratios (``ratios()``: their figures) run here beside it, one core each: valgrind's
    neighbour is the same for fastema and its baseline, interleaved. Returns ``(figures, seconds)``."""
    figures, seconds = {}, {}
    instr = None

    def timed(section, fn):
        t = time.perf_counter()
        figures[section] = fn()
        seconds[section] = round(time.perf_counter() - t, 1)
        log(f"{section}: measured in {seconds[section]} s")

    if "counts" in sections:
        timed("counts", lambda: measure_counts(notes))
    if "instructions" in sections:
        instr = Instructions()
        log("instructions: valgrind started (one process, every scenario)")
    try:
        if "sass" in sections:
            timed("sass", measure_sass)
        if "ratios" in sections and ratios is not None:
            timed("ratios", ratios)
    except BaseException:
        if instr is not None:
            instr.proc.kill()
        raise
    if instr is not None:
        figures["instructions"] = instr.result()
        seconds["instructions"] = round(instr.seconds, 1)
        log(f"instructions: measured in {seconds['instructions']} s (since it started)")
    return figures, seconds


def _table(section: str, expected: dict, measured: dict, failures: list) -> str:
    bad = {(f.scenario, f.figure) for f in failures if f.section == section}
    lines = []
    for name in sorted(set(expected) | set(measured)):
        e, m = expected.get(name), measured.get(name)
        if section == "instructions":
            state = "FAIL" if (name, "instructions per update") in bad else "ok"
            moved = f"{m / e - 1:+.2%}" if e and m else "-"
            lines.append(f"  {state:4} {name}: {_fmt(m) if m is not None else '-'} (expected "
                         f"{_fmt(e) if e is not None else '-'}, {moved})")
        else:
            state = "FAIL" if any(s == name for s, _ in bad) else "ok"
            shown = ", ".join(f"{k} {v}" for k, v in sorted((m or {}).items())) if section == "counts" else ""
            lines.append(f"  {state:4} {name}" + (f": {shown}" if shown else ""))
    return "\n".join(lines)


def cmd_check(args) -> int:
    t0 = time.perf_counter()
    exp = load_expectations()
    tol = exp.get("tolerance", {})
    itol, factor = tol.get("instructions", INSTR_TOLERANCE), tol.get("ratio_factor", RATIO_FACTOR)
    sections = args.only
    notes: list = []
    results: list = []

    def ratios():
        found, fails = ratio_gate(exp.get("ratios", {}), measure_ratio, factor, rerun=not args.no_rerun,
                                  names=list(RATIOS))
        results.extend(found)
        ratio_failures.extend(fails)
        return {r.scenario: {"ratio": round(r.ratio, 4), "rerun": None if r.rerun is None else round(r.rerun, 4),
                             **r.times} for r in found}

    ratio_failures: list = []
    try:
        figures, seconds = measure(sections, notes, ratios)
    except ToolMissing as err:
        print(f"gates: {err}", file=sys.stderr)
        return 2
    failures: list = []
    if "instructions" in figures:
        failures += compare_instructions(exp.get("instructions", {}), figures["instructions"], itol)
    for section in ("counts", "sass"):
        if section in figures:
            failures += compare_exact(section, exp.get(section, {}), figures[section])
    failures += ratio_failures
    for section in SECTIONS:
        if section not in figures:
            continue
        print(f"== {section} ({seconds.get(section, '-')} s)")
        if section == "ratios":
            for r in results:
                v = figures["ratios"][r.scenario]
                print(f"  {'FAIL' if r.failed else 'ok':4} {r.scenario}: {v['ratio']:.3g} (committed "
                      f"{_fmt(r.expected) if r.expected else '-'}; CPU ms fastema {v['fastema_ms']}, baseline "
                      f"{v['baseline_ms']}; wall-time ratio {v['wall_ratio']:.3g}) {r.note(factor)}")
        else:
            print(_table(section, exp.get(section, {}), figures[section], failures))
    for n in notes:
        print(f"note: {n}")
    wall = time.perf_counter() - t0
    rec = record(figures, failures, notes, wall, "check " + ",".join(sections))
    rec["seconds"] = seconds
    path = write_record(rec)
    print(f"figures written: {path.relative_to(ROOT)}; the check took {wall:.0f} s")
    if failures:
        print()
        for f in failures:
            print(f.message())
        return 1
    print("gates: all passed")
    return 0


def cmd_update(args) -> int:
    t0 = time.perf_counter()
    exp = load_expectations()
    notes: list = []
    committed: dict = {}

    def ratios():                                     # the median of 3 measurements: a typical run's ratio
        raw = {}
        for name in RATIOS:
            runs = sorted(measure_ratio(name) for _ in range(3))
            committed[name] = round(runs[1][0], 4)
            raw[name] = {"ratio": committed[name], **runs[1][1]}
            print(f"ratios: {name}: {committed[name]:.3g} (3 runs: {', '.join(f'{r:.3g}' for r, _ in runs)})")
        return raw

    try:
        figures, seconds = measure(args.only, notes, ratios)
    except ToolMissing as err:
        print(f"gates: {err}", file=sys.stderr)
        return 2
    if committed:
        exp["ratios"] = committed
    for section in DETERMINISTIC:
        if section in figures:
            exp[section] = figures[section]
    exp["tolerance"] = exp.get("tolerance", {"instructions": INSTR_TOLERANCE, "ratio_factor": RATIO_FACTOR})
    exp["about"] = ("fastema's performance gates (bench/gates.py, issue 53): expected figures per scenario. Rewrite "
                    "with `python -m bench.gates update [--only SECTION]` and commit with the change that moved them.")
    exp.setdefault("measured_on", {})
    stamp = {"commit": _git("rev-parse", "--short", "HEAD"), "date": datetime.date.today().isoformat(),
             "machine": machine()["cpu"], "cores": os.cpu_count()}
    for section in args.only:
        exp["measured_on"][section] = stamp
    EXPECT.write_text(json.dumps(exp, indent=1, sort_keys=True) + "\n")
    rec = record(figures, [], notes, time.perf_counter() - t0, "update " + ",".join(args.only))
    rec["seconds"] = seconds
    path = write_record(rec)
    print(f"written: {EXPECT.relative_to(ROOT)} ({', '.join(args.only)}); figures: {path.relative_to(ROOT)}")
    for n in notes:
        print(f"note: {n}")
    return 0


# ---------------------------------------------------------------- history


def history_line(rec: dict) -> dict:
    """The compact form of a run kept in the history (every figure but the per-kernel SASS table, which the
    expectations file holds: a digest of it shows when it changed)."""
    figs = dict(rec.get("figures", {}))
    sass = figs.pop("sass", None)
    if sass is not None:
        figs["sass_digest"] = hashlib.sha256(json.dumps(sass, sort_keys=True).encode()).hexdigest()[:12]
        figs["sass_registers"] = {k: v.get("registers") for k, v in sass.items()}
    keep = ("schema", "run", "command", "commit", "dirty", "subject", "date", "machine", "device", "versions",
            "passed", "wall_s")
    return {**{k: rec.get(k) for k in keep}, "figures": figs}


def append_history(files: list, history: Path = HISTORY) -> list:
    """Append each run of ``files`` not yet in ``history`` (by its ``run`` id); returns the runs added."""
    seen = set()
    if history.exists():
        for line in history.read_text().splitlines():
            if line.strip():
                seen.add(json.loads(line)["run"])
    added = []
    recs = []
    for f in files:
        rec = json.loads(Path(f).read_text())
        if rec.get("schema") != SCHEMA or "run" not in rec or rec["run"] in seen:
            continue
        seen.add(rec["run"])
        recs.append(rec)
    recs.sort(key=lambda r: r.get("date", ""))
    with history.open("a") as out:
        for rec in recs:
            out.write(json.dumps(history_line(rec), sort_keys=True) + "\n")
            added.append(rec["run"])
    return added


def read_history(history: Path = HISTORY) -> list:
    if not history.exists():
        return []
    return [json.loads(line) for line in history.read_text().splitlines() if line.strip()]


HEADLINE_INSTRUCTIONS = ("fake-gpu EMA.update, 6 tensors", "fake-gpu EMA.update, 148 tensors",
                         "fake-gpu EMA.update, 3000 tensors", "cpu EMA.update, 6 tensors",
                         "cpu EMA.update, 148 tensors", "cpu EMA.update, 3000 tensors",
                         "cpu TargetNetwork.update, 6 tensors", "cpu FlatShadow.update, 148 tensors")


def plot_history(runs: list, path: Path = PLOT) -> Path:
    """Each headline figure over the commits of ``runs`` (x: the commits in history order; one series per
    device): host instructions per update (thousands, log) and the same-run ratios (fastema / baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commits: list = []
    for r in runs:
        label = (r.get("commit") or "?")[:7] + ("+" if r.get("dirty") else "")
        if label not in commits:
            commits.append(label)
    x_of = {c: i for i, c in enumerate(commits)}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 8.5), sharex=True)
    markers = "osD^v<>phX*"
    for i, name in enumerate(HEADLINE_INSTRUCTIONS):
        for dev in sorted({r.get("device", "cpu") for r in runs}):
            pts = [(x_of[(r.get("commit") or "?")[:7] + ("+" if r.get("dirty") else "")],
                    r["figures"]["instructions"][name] / 1e3) for r in runs if r.get("device", "cpu") == dev
                   and name in r.get("figures", {}).get("instructions", {})]
            if pts:
                ax1.plot(*zip(*pts), marker=markers[i % len(markers)],
                         label=name + ("" if dev == "cpu" else f" [{dev}]"))
    ax1.set_yscale("log")
    ax1.set_ylabel("host instructions per update (thousands)")
    ax1.set_title("fastema's gates over commits (bench/history.jsonl)")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax1.grid(alpha=0.3)
    for i, name in enumerate(RATIOS):
        for dev in sorted({r.get("device", "cpu") for r in runs}):
            pts = [(x_of[(r.get("commit") or "?")[:7] + ("+" if r.get("dirty") else "")],
                    r["figures"]["ratios"][name]["ratio"]) for r in runs if r.get("device", "cpu") == dev
                   and name in r.get("figures", {}).get("ratios", {})]
            if pts:
                ax2.plot(*zip(*pts), marker=markers[i % len(markers)], linestyle=":",
                         label=name.split(":")[0] + ("" if dev == "cpu" else f" [{dev}]"))
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    ax2.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    ax2.yaxis.set_major_locator(FixedLocator([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20]))
    ax2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.set_ylabel("fastema / baseline, CPU time\n(same run, 1 thread; < 1: fastema faster)")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.grid(alpha=0.3)
    ax2.set_xticks(range(len(commits)))
    ax2.set_xticklabels(commits, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def cmd_history(args) -> int:
    files = args.files or sorted(str(p) for p in OUT.glob("gates-*.json"))
    added = append_history(files)
    print(f"history: {len(added)} run(s) added to {HISTORY.relative_to(ROOT)}" + (f": {', '.join(added)}" if added
                                                                                    else ""))
    if not args.no_plot:
        runs = read_history()
        if runs:
            print(f"plot: {plot_history(runs).relative_to(ROOT)} ({len(runs)} runs)")
    return 0


def _sections(text: str) -> list:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"no section {bad}; the sections are {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_instructions-child"]:
        return _instructions_child(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench.gates", description=" ".join(__doc__.split("\n\n")[0].split()),
                                 epilog="See bench/README.md, 'Gates'.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("check", "update"):
        p = sub.add_parser(name)
        p.add_argument("--only", type=_sections, default=list(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
        if name == "check":
            p.add_argument("--no-rerun", action="store_true", help="a ratio past the factor fails without a rerun")
    h = sub.add_parser("history")
    h.add_argument("files", nargs="*", help="gates JSON files (default: bench/out/gates-*.json)")
    h.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.command in ("check", "update"):
        os.environ.setdefault("FASTEMA_NUM_THREADS", "1")      # before fastema is imported: the ratios' one thread
        use_tree()
    return {"check": cmd_check, "update": cmd_update, "history": cmd_history}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
