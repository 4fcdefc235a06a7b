"""The device code fastema ships (``kernels/device``, ``fastema._launch.cuda.device_code``; issues 54 and 60).

- The shipped sets are complete and current: built from these kernel sources for exactly the variants
  the launchers ask for (``fastema._launch.shipped.variants``), every image of each set, each entry with the
  launch bounds ``kernels/_bounds.py`` gives it; the failure names the build (CONTRIBUTING.md).
- A fresh process's first update on the fake GPU makes no NVVM call and no numba front-end compile,
  under a CUDA 12.0 and a CUDA 13.0 driver, on sm_75 and sm_90: every variant it binds is the shipped
  code of the set and image the driver and device take (counted at numba-cuda's compile entry points).
- What compiles instead, with one warning that says why: an edited kernel source (stale sets), a
  damaged file, code the driver refuses (only the driver's "cannot run here" results: anything else it
  raises propagates, a TypeError above all), a variant not shipped. The driver is the tests' fake
  (``testkit``), the run-time compiler a stand-in given to ``fastema._launch.cuda.compiler.using``.
- What is compiled at run time is compiled once per node: N processes on one empty cache compile a
  variant once, the others wait and read it; a damaged entry is compiled again; a cache folder others can
  write is not used.
"""
import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the simulator runs no device code", allow_module_level=True)
pytest.importorskip("numba.cuda")
pytest.importorskip("cuda.core")

from fastema._launch.cuda import compiler  # noqa: E402
from fastema._launch.cuda import device_code as D  # noqa: E402
from fastema._launch.cuda.driver import Refused  # noqa: E402
from fastema._launch.cuda.drivers import using  # noqa: E402
from fastema._launch.shipped.variants import every_variant  # noqa: E402
from testkit.fake_driver import FakeDriver  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """device_code's per-process state reset around a test (its warnings given once, the sets
    read once), and a cache of run-time compiles of the test's own."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    with D.afresh():
        yield D


class Compiles:
    """A run-time compiler (``fastema._launch.cuda.compiler.Compiler``) that compiles nothing: each call
    is recorded and gives ``("cubin", b"new", "entry", {})`` for each image."""

    name = "stand-in"
    set = "cu13"

    def __init__(self):
        self.keys: list = []

    def identity(self) -> str:
        return f"stand-in {id(self)}"

    def compile(self, dispatcher, types, images):
        from fastema.kernels._store.identity import VARIANTS

        self.keys.append(D.variant_key(VARIANTS[dispatcher], types))
        return {image: ("cubin", b"new", "entry", {}) for image in images}


class Refusing(FakeDriver):
    """A fake sm_90 GPU under a CUDA 12.4 driver whose load of any code but what was compiled here
    raises ``error``."""

    def __init__(self, error: Exception, refuse_compiled: bool = False):
        super().__init__(version=12040)
        self.error, self.refuse_compiled = error, refuse_compiled

    def load(self, kind, code, entry):
        if code != b"new" or self.refuse_compiled:
            self.launches.append(("refused", kind, entry))
            raise self.error
        return super().load(kind, code, entry)


def test_the_shipped_device_code_is_complete_and_current():
    """Every variant of ``every_variant()`` has every image of its set, built from these sources, each
    entry with the launch bounds the table gives its set, image and kernel (read from the indexes)."""
    from fastema.kernels import _bounds
    from fastema.kernels._store.identity import VARIANTS

    variants = every_variant()
    problem = D.incomplete(list(variants))
    assert problem is None, f"{problem} (then commit kernels/device/)"
    stale = []
    for name, shipped in D.sets().items():
        for key, images in shipped.index["variants"].items():
            dispatcher = variants[key][0]
            own = dispatcher.targetoptions.get("launch_bounds")
            for image, (_, _, bounds) in images.items():
                want = _bounds.launch_bounds(name, image, VARIANTS[dispatcher], own)
                if (None if want is None else list(want)) != bounds:
                    stale.append((name, image, key))
    assert not stale, f"{len(stale)} entries built with other launch bounds, first {stale[0]}: rebuild them"


def test_the_sets_are_the_ones_docs_install_names():
    from fastema._launch.shipped.store import SETS

    for name, shipped in D.sets().items():
        index = shipped.index
        assert set(index["images"]) == set(SETS[name]["images"]) and index["driver"] == SETS[name]["driver"]
        assert {i: v["driver"] for i, v in index["images"].items()} == SETS[name]["images"]
    assert set(D.sets()) == {"cu12", "cu13"}


def test_a_damaged_pack_fails_its_checksum(fresh, monkeypatch):
    shipped = D.sets()["cu13"]
    key = next(iter(shipped.index["variants"]))
    at, size, _ = shipped.index["variants"][key]["sm_90"]
    blob = bytearray(shipped._blob("sm_90"))
    blob[at + size - 7] ^= 0xFF
    monkeypatch.setattr(type(shipped), "_blob", lambda self, image: bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        shipped.get(key, "sm_90")
    with pytest.warns(RuntimeWarning, match="cannot be read .*checksum.*compiled instead"):
        assert D.entry("cu13", key, "sm_90") is None


@pytest.mark.parametrize("version,cc,chosen", [
    (13000, (8, 6), "cu13/sm_80"), (13000, (7, 5), "cu12/sm_75"), (12000, (9, 0), "cu12/sm_90"),
    (12040, (12, 0), "cu12/compute_70"), (12080, (12, 0), "cu12/sm_120"), (13000, (11, 0), "cu13/compute_80")])
def test_the_shipped_sets_serve_the_choice(version, cc, chosen):
    """The table of ``tests/kernels/test_store.py``, on the shipped indexes."""
    assert ["/".join(c) for c in D.choose(version, cc)] == [chosen]


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numba.cuda.compiler as compiler
import numba.cuda.cudadrv.nvvm as nvvm
calls = {"nvvm": 0, "front_end": 0}
real_ir, real_cuda = nvvm.compile_ir, compiler.compile_cuda
def ir(*a, **k):
    calls["nvvm"] += 1
    return real_ir(*a, **k)
def front(*a, **k):
    calls["front_end"] += 1
    return real_cuda(*a, **k)
nvvm.compile_ir, compiler.compile_cuda = ir, front
import torch
from testkit.fake_gpu import fake_gpu, rl_mlp
from fastema.torch import EMA
version, cc = int(sys.argv[2]), tuple(map(int, sys.argv[3].split(".")))
kw = {"fp32": {}, "bf16": {}, "bf16_sr": {"shadow_dtype": "bfloat16", "rounding": "stochastic"},
      "two_decays": {}, "skip_nonfinite": {"skip_nonfinite": True}, "device_plan": {"device_step": True},
      "window": {}}
out = {"calls": calls, "loads": [], "dispatched_variants": 0, "dispatcher": 0, "launches": {}}
for scenario in sys.argv[4].split(","):
    with fake_gpu(version=version, cc=cc) as fake:
        model = rl_mlp()
        if scenario in ("bf16", "bf16_sr"):
            model = model.to(torch.bfloat16)
        if scenario == "window":
            from fastema.torch import WindowAverage
            ema = WindowAverage(model, 3)
        else:
            ema = EMA(model, (0.99, 0.999) if scenario == "two_decays" else 0.99, **kw[scenario])
        with torch.no_grad():
            ema.update()
            ema.update()
    images = list(fake.images.values())
    out["loads"] += [v.source for v in images if v is not None]
    out["dispatched_variants"] += sum(v is None for v in images)
    out["dispatcher"] += sum(e[0] == "dispatcher" for e in fake.launches)
    out["launches"][scenario] = sum(e[0] == "launch" for e in fake.launches)
print(json.dumps(out))
"""


SCENARIOS = ("fp32", "bf16", "bf16_sr", "two_decays", "skip_nonfinite", "device_plan", "window")


@pytest.mark.parametrize("version,cc,image", [(12000, "7.5", "cu12/sm_75"), (12000, "9.0", "cu12/sm_90"),
                                              (13000, "7.5", "cu12/sm_75"), (13000, "9.0", "cu13/sm_90")],
                         ids=["cuda12.0-sm75", "cuda12.0-sm90", "cuda13.0-sm75", "cuda13.0-sm90"])
def test_a_fresh_processs_first_update_makes_no_nvvm_call(version, cc, image, tmp_path):
    """Issue 54 item 5, issue 60: on the fake GPU (sm_75 and sm_90, under a CUDA 12.0 and a CUDA 13.0
    driver), with fastema's real kernel factories, a fresh process's first two ``EMA.update()`` calls
    of each scenario (a float32 and a bfloat16 model, bfloat16 SR averages, two decays,
    ``skip_nonfinite``, the device plan; ``WindowAverage``'s for "window") bind every kernel they
    launch to the shipped code of the set and image the driver and device take: numba-cuda's NVVM
    entry (``nvvm.compile_ir``) and front end (``compiler.compile_cuda``) are never called, and
    numba's dispatcher never launches."""
    pytest.importorskip("torch")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(version), cc, ",".join(SCENARIOS)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["calls"] == {"nvvm": 0, "front_end": 0}, out
    assert out["loads"] and set(out["loads"]) == {image}, out
    assert out["dispatcher"] == 0 and out["dispatched_variants"] == 0, out
    assert all(n >= 2 for n in out["launches"].values()) and set(out["launches"]) == set(SCENARIOS), out


def _one_variant():
    for key, (dispatcher, types) in every_variant().items():
        if key.startswith("nonfinite_kernel(3)"):
            return key, dispatcher, types
    raise AssertionError("no float64 scan variant")


def test_an_edited_kernel_source_never_loads_the_shipped_code(fresh, tmp_path):
    """Each set's index holds the digest of the kernel sources: another digest (an edited checkout)
    makes every variant compile (one warning per set naming the rebuild), never load the shipped
    code. The shipped indexes copied, each with another digest (the store read from the copy)."""
    key, dispatcher, types = _one_variant()
    shipped = (n for n in os.listdir(D.device_dir()) if not n.startswith("."))  # not .cu13-entries
    for name in sorted(shipped):
        index = json.loads(open(os.path.join(D.device_dir(), name, "index.json")).read())
        (tmp_path / "device" / name).mkdir(parents=True)
        (tmp_path / "device" / name / "index.json").write_text(json.dumps({**index, "sources": "0" * 64}))
    fake = FakeDriver()
    with D.afresh(str(tmp_path / "device")), using(fake), compiler.using(Compiles()) as compiles:
        with pytest.warns(RuntimeWarning, match="from other kernel sources.*rebuild it"):
            assert D.kernel(dispatcher, types, 0).source == "compiled"
        assert compiles.keys == [key] and fake.launches == [("load", "cubin", "entry")]
        with warnings.catch_warnings():
            warnings.simplefilter("error")                # one warning a process
            assert D.kernel(dispatcher, types, 0).source == "compiled"


def test_a_deeply_nested_index_is_a_damaged_set_compiled_around_with_one_warning(fresh, tmp_path):
    """A shipped ``index.json`` nested deeper than ``json`` reads (a damaged install) raised RecursionError
    out of every CUDA launch (issue 77, L7); it is a set that cannot be used, like any other damaged index:
    one warning, the variant compiled."""
    key, dispatcher, types = _one_variant()
    for name in sorted(os.listdir(D.device_dir())):
        (tmp_path / "device" / name).mkdir(parents=True)
        (tmp_path / "device" / name / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    fake = FakeDriver()
    with D.afresh(str(tmp_path / "device")), using(fake), compiler.using(Compiles()) as compiles:
        assert "nested too deeply" in D.problem("cu13")
        with pytest.warns(RuntimeWarning, match="cu13 device code cannot be used .*nested too deeply"):
            assert D.kernel(dispatcher, types, 0).source == "compiled"
        assert compiles.keys == [key]


@pytest.mark.parametrize("result", ["CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
                                    "CUDA_ERROR_NO_BINARY_FOR_GPU"])
def test_code_the_driver_refuses_is_compiled_with_one_warning(fresh, result):
    """A refusal of the shipped code (PTX of a newer ISA under a CUDA 12 driver; no image for the
    GPU): one warning naming the code's architecture and what built it, the driver's CUDA version
    and its result, then the variant compiled here and loaded; no further warning for the next
    variant."""
    (_, (dispatcher, types)), (_, (other, other_types)) = list(every_variant().items())[:2]
    fake = Refusing(Refused(result, "the driver's explanation"))
    with using(fake), compiler.using(Compiles()) as compiles:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert D.kernel(dispatcher, types, 0).source == "compiled"
            assert D.kernel(other, other_types, 0).source == "compiled"
    said = [str(w.message) for w in caught]
    assert len(said) == 1, said
    assert "the CUDA 12.4 driver (fake GPU) refused fastema's shipped cu12 sm_90 code" in said[0], said
    assert "built by nvvm 12.0; ptxas 12.0, V12.0.76" in said[0] and result in said[0], said
    assert len(compiles.keys) == 2
    assert [e[0] for e in fake.launches] == ["refused", "load", "refused", "load"]


def test_a_type_error_in_the_drivers_load_is_raised_not_taken_for_a_refusal(fresh):
    """The first H100 run's defect: a TypeError in fastema's own driver call was caught as a
    refusal, and every kernel silently fell back to a compile and then to the dispatcher. Now it
    propagates: no warning, no compile."""
    key, dispatcher, types = _one_variant()
    error = TypeError("cuKernelGetFunction() takes exactly 1 positional argument (2 given)")
    with using(Refusing(error)), compiler.using(Compiles()) as compiles:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TypeError, match="takes exactly 1 positional argument"):
                D.kernel(dispatcher, types, 0)
    assert compiles.keys == []


def test_another_driver_error_is_raised_too(fresh):
    """A driver error that no compile mends (out of memory, no context) propagates as it is."""
    from numba.cuda.cudadrv.driver import CudaAPIError

    key, dispatcher, types = _one_variant()
    with using(Refusing(CudaAPIError(2, "cuKernelGetFunction: CUDA_ERROR_OUT_OF_MEMORY"))), \
            compiler.using(Compiles()) as compiles:
        with pytest.raises(CudaAPIError, match="OUT_OF_MEMORY"):
            D.kernel(dispatcher, types, 0)
    assert compiles.keys == []


def test_code_refused_as_compiled_here_too_goes_to_the_dispatcher(fresh):
    """The shipped code refused, then the code compiled here: None (numba's dispatcher launches the
    variant), with one warning for each, naming the driver."""
    key, dispatcher, types = _one_variant()
    refusing = Refusing(Refused("CUDA_ERROR_INVALID_IMAGE"), refuse_compiled=True)
    with using(refusing), compiler.using(Compiles()):
        with pytest.warns(RuntimeWarning) as caught:
            assert D.kernel(dispatcher, types, 0) is None
    said = " ".join(str(w.message) for w in caught)
    assert "refused fastema's shipped cu12 sm_90 code" in said
    assert "launched through numba's dispatcher" in said
    assert "CUDA 12.4 driver" in said and len(caught) == 2


def test_a_variant_not_shipped_compiles_with_one_warning(fresh):
    from numba.cuda import types as T

    from fastema.kernels import cuda as K
    from fastema.kernels.kinds import F32

    dispatcher = K.lerp_kernel(F32, F32, False)
    A = T.Array(T.int64, 1, "C")
    types = (T.int64, A, A, A, T.Array(T.int32, 1, "C"), A, T.UniTuple(T.float64, 9), T.Array(T.int32, 1, "C"),
             T.uint32)                                    # 9 float64 weights: no launcher passes that
    with using(FakeDriver()), compiler.using(Compiles()) as compiles:
        with pytest.warns(RuntimeWarning, match="is not shipped: compiled at its first use"):
            assert D.kernel(dispatcher, types, 0).source == "compiled"
    assert len(compiles.keys) == 1


def test_a_kernel_fastema_did_not_make_goes_to_the_dispatcher():
    assert D.kernel(object(), (), 0) is None


COMPILE = r"""
import json, os, sys, time
from fastema._launch.cuda import compiler
from fastema._launch.cuda import device_code as D
from fastema._launch.shipped.variants import every_variant

class Slow:                              # NVVM's seconds, without NVVM: CI compiles no CUDA kernel
    name = "slow"
    def identity(self):
        return "slow"
    set = "cu13"
    def compile(self, dispatcher, types, images):
        time.sleep(1.5)
        return {i: ("cubin", b"\x7fELF" + sys.argv[1].encode() * 50, "entry", {}) for i in images}

compiler.using(Slow()).__enter__()
key = sys.argv[1]
dispatcher, types = every_variant()[key]
with open(sys.argv[2], "a") as f:                       # started: the test releases every process at once
    f.write("x")
while not os.path.exists(sys.argv[2] + ".go"):
    time.sleep(0.01)
got = D.compiled(dispatcher, types, key, (9, 0))
print(json.dumps({"compiles": len(D.COMPILES), "kind": got.kind, "size": len(got.code), "entry": got.name}))
"""


def _compile_in(processes: int, key: str, env: dict, folder) -> list:
    import time

    gate = folder / f"gate{processes}"
    procs = [subprocess.Popen([sys.executable, "-c", COMPILE, key, str(gate)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    deadline = time.monotonic() + 300
    while (not gate.exists() or len(gate.read_text()) < processes) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (folder / f"gate{processes}.go").write_text("")
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_processes_on_one_empty_cache_compile_a_variant_once(tmp_path):
    """Item 3: four processes released at once on an empty cache need the same variant that is not
    shipped: one compiles it (1.5 s here, standing in for NVVM's seconds), the others wait on its lock
    and read it; all get the same code. Then a damaged entry is compiled again."""
    key, _, _ = _one_variant()
    cache = tmp_path / "cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_NUM_THREADS="1")
    outs = _compile_in(4, key, env, tmp_path)
    assert sum(o["compiles"] for o in outs) == 1, outs
    assert len({(o["kind"], o["size"], o["entry"]) for o in outs}) == 1
    (entry,) = (cache / "fastema-device").glob("*.entry")
    entry.write_bytes(entry.read_bytes()[:-100])          # truncated: a crash while another tool wrote it
    (again,) = _compile_in(1, key, env, tmp_path)
    assert again["compiles"] == 1 and again["size"] == outs[0]["size"]


def test_a_cache_folder_others_can_write_is_not_used(fresh, monkeypatch, tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs" / "fastema-device"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(mine))
    assert D.cache_folder() == str(mine / "fastema-device")
    theirs.mkdir(parents=True)
    theirs.chmod(0o777)                                   # the kernel cache's trust rules: others can write it
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(theirs.parent))
    with pytest.warns(RuntimeWarning, match="not cached in .*fastema-device .*writable by everyone"):
        assert D.cache_folder() is None
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(mine))
    with D.config.tuned(CUDA_CACHE=False):
        assert D.cache_folder() is None
    assert D.cache_folder() == str(mine / "fastema-device")


def test_a_damaged_node_store_entry_is_compiled_again_with_one_warning(fresh, tmp_path):
    key, dispatcher, types = _one_variant()
    with compiler.using(Compiles()) as compiles:
        first = D.compiled(dispatcher, types, key, (9, 0))
        assert D.compiled(dispatcher, types, key, (9, 0)) == first and len(compiles.keys) == 1
        (path,) = (tmp_path / "cache" / "fastema-device").glob("*.entry")
        path.write_bytes(path.read_bytes()[:-2] + b"xy")
        with pytest.warns(RuntimeWarning, match="is damaged .*checksum.*compiled again"):
            assert D.compiled(dispatcher, types, key, (9, 0)) == first
        assert len(compiles.keys) == 2
