"""Host instructions per update, counted by valgrind (callgrind): :class:`Instructions` starts the valgrind
process, which runs ``python -m bench.gates.instructions [NAMES]`` from the tree's root (this module's
``__main__``: :func:`_instructions_child`)."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, ToolMissing, use_tree
from .record import cpu_flags
from .scenarios import (
    ARRAYS,
    COMPILED,
    INSTRUCTIONS,
    STUB,
    STUB_WHERE,
    WHERE,
    build,
    instruction_names,
    region_updates,
    warm_updates,
)

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
# Every address at or above 2^30 (issue 77, M9): CPython stores an int in 30-bit digits, and hashing or
# comparing one of two digits costs more than one of one. Valgrind loads the interpreter at 0x108000 and
# maps from low addresses up, so whether a tensor's data_ptr (a key of ema_update_many_'s cache, hashed
# 296 times a call at 148 tensors) sat below 2^30 depended on how much the process had mapped before:
# another venv's imports, the scenarios built first. fake-gpu ema_update_many_ (148) read 592k or 621k
# (4.9 %) by that alone. Above 2^30 every address is two digits, whatever was mapped before.
MIN_ADDRESS = 1 << 30


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


X86_64_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe",   # v3
                       "xsave", "cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3",
                       "pni"})                                                           # v2
"""/proc/cpuinfo's names of what ``-march=x86-64-v3`` builds for (gcc's levels v2 and v3)."""


def compiler_env(folder: str, flags: set | None = None, compiler_takes=None) -> dict:
    """Inductor's environment inside the valgrind process (its compiled steps): a cache of its
    own in ``folder``, and, on x86-64, C++ built for ``x86-64-v3`` (where the CPU has all of it
    and the compiler knows it: gcc 11, clang 12), else for ``x86-64`` (Inductor adds its AVX2
    flags where it writes AVX2 loops), never ``-march=native``.

    Under valgrind Inductor reads the CPU through valgrind's CPUID, which hides AVX-512, so it
    writes 8-wide AVX2 loops; gcc, run outside valgrind, reads the real CPU. On an AVX-512 CPU
    (a Zen 5 EPYC, 2026-11-28) that gave (1) a kernel valgrind 3.19 cannot decode (EVEX-encoded
    instructions: ``Unrecognised instruction``, SIGILL), and (2) through torch's shared FX graph
    cache, whose key does not hold the vector ISA, those AVX2-width loops handed to the next
    ordinary process, which built them with AVX-512 flags: each 8-element step stored 16
    floats, past the end of every tensor (the ratio gate's compiled step wrote wrong averages,
    then crashed). ``flags``: /proc/cpuinfo's (read here when None); ``compiler_takes(march)``:
    whether Inductor's C++ compiler takes ``-march=`` that (default :func:`march_taken`)."""
    env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(folder, "inductor")}
    if platform.machine() not in ("x86_64", "AMD64"):
        return env
    flags = cpu_flags() if flags is None else flags
    takes = compiler_takes or march_taken
    v3 = X86_64_V3 <= flags and takes("x86-64-v3")
    env["TORCHINDUCTOR_CPP_MARCH"] = "x86-64-v3" if v3 else "x86-64"
    return env


def march_taken(march: str) -> bool:
    """Whether Inductor's C++ compiler (``$CXX``, else g++) builds an empty file with ``-march=``
    ``march``."""
    cxx = os.environ.get("CXX") or "g++"
    try:
        done = subprocess.run([cxx, f"-march={march}", "-x", "c++", "-c", os.devnull,
                               "-o", os.devnull], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def valgrind_env(lib: str, folder: str) -> dict:
    """The valgrind process's environment: :func:`child_env`, the client requests' library
    ``lib``, and :func:`compiler_env` in ``folder`` (the run's own)."""
    return child_env(GATES_CLIENT=lib, PYTHONDONTWRITEBYTECODE="1", **compiler_env(folder))


DRIVER = "libcuda.so.1"
"""The CUDA driver's library, which the stub scenarios load (testkit's driver emulator): its own instructions
are the driver's work, not fastema's host work, and are not counted (what the emulator checks at a launch, a
parameter bank gathered and compared with the kernel's layout, about 800 instructions, says nothing about
fastema; a real driver's own cost is another thing again). What it calls (libc) is counted."""


def parse_callgrind(text: str, leave_out: str = DRIVER) -> dict:
    """``{dump name: instructions}`` of a callgrind file with one dump per client request: the dump's total
    less the instructions of the object whose file name ends with ``leave_out`` (its functions' own
    instructions, not those of what they call)."""
    out, name, left = {}, None, 0
    objects: dict = {}                 # callgrind's compressed names: "(id)" -> file name
    inside = skip = False
    for line in text.splitlines():
        head = line[:1]
        if head.isdigit() or head in "+-*":
            if skip:                   # a call's inclusive cost, not the caller's own
                skip = False
            elif inside:
                fields = line.split()
                left += int(fields[1]) if len(fields) > 1 else 0
        elif line.startswith("calls="):
            skip = True
        elif line.startswith(("ob=", "cob=")):        # a name is given where it first appears, either
            ident, _, file = line.partition("=")[2].partition(" ")
            if file:
                objects[ident] = file
            if line[0] == "o":
                inside = objects.get(ident, "").endswith(leave_out)
        elif line.startswith("desc: Trigger: Client Request: "):
            name, left, inside = line[len("desc: Trigger: Client Request: "):].strip(), 0, False
        elif line.startswith("part:"):
            left, inside = 0, False
        elif name is not None and line.startswith("totals:"):
            out[name] = int(line.split()[1]) - left
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

    for folder in ("fastema", "kernels", "bench", "testkit"):
        compileall.compile_dir(str(ROOT / folder), quiet=2, workers=1)


class Instructions:
    """The valgrind process (started at once, so that other sections run beside it); :meth:`result`."""

    def __init__(self, names: list | None = None):
        lib = client_library()
        precompile()
        self.tmp = tempfile.mkdtemp(prefix="fastema-gates-")
        self.out = Path(self.tmp) / "callgrind.out"
        # the child is this module's __main__, run from ROOT (the cwd below): this tree's bench.gates
        cmd = [shutil.which("valgrind"), f"--aspace-minaddr={MIN_ADDRESS:#x}", "--tool=callgrind",
               "--instr-atstart=no", "--collect-atstart=no",
               "--combine-dumps=yes", f"--callgrind-out-file={self.out}", sys.executable, "-m",
               "bench.gates.instructions"] + list(names or [])
        setarch = shutil.which("setarch")
        if setarch and subprocess.run([setarch, platform.machine(), "-R", "true"], capture_output=True).returncode == 0:
            cmd = [setarch, platform.machine(), "-R"] + cmd      # no address randomisation: same layout each run
        self.cmd = cmd
        self.started = time.perf_counter()
        self.log = Path(self.tmp) / "valgrind.log"     # a file, not a pipe: nothing waits on this process
        env = valgrind_env(lib, self.tmp)
        stub = _stub_dir()
        if stub is not None:                           # the stub driver's scenarios: on the library path at start
            env.update(LD_LIBRARY_PATH=os.pathsep.join(filter(None, [stub, os.environ.get("LD_LIBRARY_PATH")])),
                       GATES_STUB="1")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

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


def _stub_dir() -> str | None:
    """The stub ``libcuda.so.1``'s folder (``testkit/fake_gpu.py``), or None where no C compiler is."""
    use_tree()
    from testkit.fake_gpu import stub_driver_dir

    return stub_driver_dir()


def count(name: str, update, tensors: int, lib) -> None:
    """One scenario's regions (``tensors``: its size): :func:`~bench.gates.scenarios.warm_updates`
    updates (instrumented, not counted: the code it shares with the scenarios counted before it is
    specialised for its types again), then a region of N updates and one of 2N
    (:func:`~bench.gates.scenarios.region_updates`), each dumped as ``NAME@K`` (``lib``: the client
    requests)."""
    for _ in range(warm_updates(tensors)):
        update()
    dump_regions(name, update, region_updates(tensors), lib)


def dump_regions(name: str, update, n: int, lib) -> None:
    """A region of ``n`` calls of ``update`` and one of ``2n``, each counted alone and dumped as
    ``NAME@K`` (``lib``: the client requests; :func:`per_update` takes the difference)."""
    for k in (n, 2 * n):
        lib.gates_zero()
        lib.gates_toggle()
        for _ in range(k):
            update()
        lib.gates_toggle()
        lib.gates_dump(f"{name}@{k}".encode())


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
    import fastema
    from testkit import fake_gpu as G

    assert Path(fastema.__file__).resolve().is_relative_to(ROOT), fastema.__file__
    stub = bool(os.environ.get("GATES_STUB"))
    wanted = set(names or instruction_names(stub))
    built: dict = {w: [] for w in (*WHERE, STUB_WHERE)}

    def make(where):
        for what, n in (STUB if where == STUB_WHERE else INSTRUCTIONS + (ARRAYS + COMPILED if where == "cpu" else ())):
            name = f"{where} {what}, {n} tensors"
            if name in wanted:
                update, _ = build(what, n, where != "cpu", stub=where == STUB_WHERE)
                for _ in range(64):                      # past CPython's specialisation warm-up
                    update()
                built[where].append((name, update, n))

    def measure(where):
        for name, update, n in built[where]:
            count(name, update, n, lib)

    make("cpu")
    with G.fake_gpu(record=False):
        make("fake-gpu")
        gc.collect()
        gc.disable()
        lib.gates_instrument()
        measure("fake-gpu")
    if stub and any(n.startswith(STUB_WHERE) for n in wanted):
        with G.fake_gpu(record=False, stub_driver=True):
            make(STUB_WHERE)
            gc.collect()
            measure(STUB_WHERE)
    measure("cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(_instructions_child(sys.argv[1:]))
