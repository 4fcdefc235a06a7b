"""The GPU plan (``bench/gpu/run.sh speed``, ``all``, ``targets`` and ``rest`` and their Python parts) runs end
to end without a GPU (issues 37, 63, 78 and 86).

GPU time is rare (15 minutes of device time a session, the machine's start included; at most 8 files
back from a command; no network there): a plan that breaks on the day wastes it. So CI runs the
commands in the Numba CUDA simulator at tiny sizes (``--simulate``; each in a subprocess, the
simulator being switched on before numba is imported; the GPU contract's scenarios on the driver
emulator) and checks that each writes its files as the device returns them, that the summary line
parses, that each command's timeouts add up to one window's 8 minutes, that a test run stopped at
its budget says so, that the numpy shim lets numba-cuda compile where numpy lacks ``row_stack``,
that the probe's GPU-mode array adapters agree with the CPU kernels (on CPU tensors), and that the
timing flags a host-bound run and takes the implementations' batches in turn.
Not cuda-marked: the simulator runs inside the subprocesses.
"""
import importlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GPU = ROOT / "bench" / "gpu"
FILES = {"all": {"run.log", "env.txt", "contract.json", "smoke.json", "cuda-tests.log", "headline.json",
                 "headline.md", "summary.txt"},
         "speed": {"run.log", "compiled.json", "compiled.md", "compiled-trace.json.gz", "mechanisms.json",
                   "mechanisms.md", "targets.json", "targets.md"},
         "rest": {"run.log", "probe.json", "probe.md", "bench.json", "bench.md"}}
MAX_FILES, WINDOW_S = 8, 480
MIXED = "torch._foreach_mul_+_foreach_add_"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the GPU plan is bash on Linux")


def _env(**extra):
    drop = ("NUMBA_ENABLE_CUDASIM", "GPU_SIMULATE", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both commands run once in the simulator (``rest``'s probe with a budget of 0: its checks
    run, its timings are recorded out of time), and the tests part alone with a budget of 1 s:
    ``{name: (exit status, output, its folder)}``."""
    base = tmp_path_factory.mktemp("gpu-plan")
    done = {}
    for name, command, extra in (
            ("all", ["bash", str(GPU / "run.sh"), "all"], {}),
            ("speed", ["bash", str(GPU / "run.sh"), "speed"], {}),
            ("rest", ["bash", str(GPU / "run.sh"), "rest"], {"GPU_PROBE_BUDGET": "0"}),
            ("cut", [sys.executable, "-m", "bench.gpu.cuda_tests"], {})):
        folder = base / name
        args = [*command, str(folder), "--simulate"] + (["--budget", "1"] if name == "cut" else [])
        p = subprocess.run(args, cwd=ROOT, env=_env(**extra), capture_output=True, text=True,
                           timeout=300)
        done[name] = (p.returncode, p.stdout + p.stderr, folder)
    return done


def _files(folder) -> set:
    names = {p.name for p in folder.iterdir()}
    assert len(names) <= MAX_FILES, names                         # the device returns 8, flat
    assert all((folder / f).is_file() for f in names), names
    return names


def _smoke_and_versions(folder) -> None:
    env = dict(ln.split("=", 1) for ln in (folder / "env.txt").read_text().splitlines())
    for key in ("gpu", "driver", "python", "torch", "numba", "numba-cuda", "cuda-core",
                "cuda-bindings", "llvmlite", "numpy", "nvidia-nvjitlink", "cuda-toolkit", "nvvm",
                "pytest-xdist", "cached_launch", "numpy_row_stack", "numpy_fix", "fastema_install"):
        assert key in env, key
    assert env["simulator"] == "True" and env["cached_launch"] == "False"
    checks = json.loads((folder / "smoke.json").read_text())["checks"]
    assert [k[0] for k in checks] == ["1", "3", "4", "5", "6"]
    assert checks["1 compile and launch"]["ok"] is True
    assert checks["3 FlatShadow.update of 3 odd-sized float32 tensors == CPU kernel"]["ok"] is True
    for k, v in checks.items():
        if k[0] in "456":
            assert v["ok"] is None and "simulator" in v["skipped"], k


def _tests_log(folder) -> None:
    """Each test named with its result, seconds and NVVM calls; the compiles run last; the count."""
    log = (folder / "cuda-tests.log").read_text()
    runs_ = re.findall(r"^pytest (.*)$", log, re.M)
    assert len(runs_) == 2 and "'cuda and not compiles'" in runs_[0]
    assert "'cuda and compiles'" in runs_[1] and "tests/kernels/test_cuda.py" in runs_[0]
    assert "-p bench.gpu.testlog" in runs_[0]
    tests = re.findall(r"^\[test\] (\w+) ([\d.]+)s nvvm=(\S+) (\S+)$", log, re.M)
    assert {(t[0], t[3].split("::")[1]) for t in tests} == {
        ("PASSED", "test_ema_update_on_device_arrays_matches_cpu"),
        ("PASSED", "test_flat_shadow_on_device_arrays")}
    assert log.rstrip().splitlines()[-1].startswith("[tests] 2 passed in ")


def _headline(folder) -> None:
    """The headline figures, each against its baseline in the same run."""
    data = json.loads((folder / "headline.json").read_text())
    assert not [k for k, v in data["checks"].items() if v.get("ok") is False], data["checks"]
    timings = data["timings"]
    for count in ("rl6", "gpt2", "3000x4096"):
        for impl in ("fastema EMA.update", "torch._foreach_lerp_"):
            row = timings[f"host-cost {count} float32"][impl]
            assert row["host_us"] > 0 and row["device_us"] > 0 and row["e2e_us"] > 0
            assert row["batches"] == 2
    assert set(timings["host-cost gpt2 bf16"]) == {"fastema EMA.update", MIXED}
    flat = timings["flat float32 2^10"]
    assert {"copy (ceiling)", "add_ (ceiling)", "torch.lerp_", "torch._foreach_lerp_"} <= set(flat)
    assert all(m["pct_of_copy"] is None for m in flat.values())    # the simulator: no device, no ceiling
    assert data["env"]["ceiling"] is None
    for sc, impls in timings.items():                     # every baseline checked, in fastema's run
        runs_ = {m["run"] for m in impls.values()}
        assert len(runs_) == 1, sc
        assert all(m.get("checked") for k, m in impls.items() if k.startswith("torch")), sc
    first = data["first_update"]["fresh process"]
    assert first["nvvm_calls"] == 0 and first["run_time_compiles"] == 0 and first["tensors"] == 148
    for dt, base in (("float32", "torch._foreach_lerp_"), ("bf16", MIXED)):
        step = data["steps"][f"gpt2 {dt}"]
        assert step["tensors"] == 16 and step["step alone"]["step_ms"] > 0
        assert all("update_in_step_us" in step[way] for way in ("fastema EMA.update", base))


def test_all_runs_in_the_simulator_and_writes_its_files(runs):
    rc, output, folder = runs["all"]
    assert rc == 0, output[-4000:]
    assert FILES["all"] <= _files(folder), output[-2000:]
    assert "gpu_env: numpy:" in output and "gpu_env: fastema:" in output
    _smoke_and_versions(folder)
    _tests_log(folder)
    _headline(folder)
    _contract(folder)
    summary = (folder / "summary.txt").read_text().strip()
    assert summary == (folder / "headline.md").read_text().splitlines()[0]
    fields = _fields(summary)
    assert fields["cuda_tests_failed"] == "0" and fields["cuda_tests_passed"] == "2"
    assert fields["first_update_nvvm"] == "0" and fields["headline_failed"] == "0"


def _contract(folder) -> None:
    """The GPU contract ran first, on the driver emulator in CI: every scenario passed (or the emulator could
    not be built: no C compiler)."""
    data = json.loads((folder / "contract.json").read_text())
    assert data["where"] == "emulator", data
    checks = data["checks"]
    if "skipped" in checks:
        assert checks["skipped"]["ok"] is None and "C compiler" in checks["skipped"]["skipped"]
        return
    assert len(checks) == 11 and all(v["ok"] for v in checks.values()), checks


def test_speed_runs_in_the_simulator_with_every_figure_and_no_verdict(runs):
    """Issue 86's run: the compiled step (checked against eager, timed against the foreach step, profiled),
    the launch mechanisms (on the driver emulator where a C compiler is: raw ``cuLaunchKernel`` and a
    1-node graph's ``cuGraphLaunch`` too) and the targets, each figure with its bound and same-run
    baseline; in the simulator no verdict (None), on a GPU met or missed."""
    rc, output, folder = runs["speed"]
    assert rc == 0, output[-4000:]
    assert FILES["speed"] <= _files(folder), output[-2000:]
    targets = json.loads((folder / "targets.json").read_text())
    checks = targets["checks"]
    figures = {k: v for k, v in checks.items() if not k.startswith("row ")}
    assert len(figures) == 9 and all(v["ok"] is None and v["figure"] in ("host", "device", "e2e")
                                     and v["against"] for v in figures.values()), checks
    assert not [k for k, v in checks.items() if v.get("ok") is False], checks
    assert sum(v["value"] is not None for v in figures.values()) == 5       # the 4 device figures: none here
    md = (folder / "targets.md").read_text()
    assert md.count("simulator: figures are the CPU's") == 9 and "| torch smoother |" in md
    compiled = json.loads((folder / "compiled.json").read_text())
    assert compiled["checks"]["default: fastema's compiled step == its eager twin (1 steps)"]["ok"] is True
    assert compiled["checks"]["part reduce-overhead"]["ok"] is None
    assert set(compiled["targets"]) == {"compiled step (default) with fastema >= 1.0x the foreach step",
                                        "the EMA adds no kernel and no operator call to the compiled step"}
    rows = compiled["timings"]["compiled step, default, 30x16 float32"]
    assert all(m["batches"] == 3 and m["e2e_us_min"] <= m["e2e_us"] <= m["e2e_us_max"] for m in rows.values())
    mech = json.loads((folder / "mechanisms.json").read_text())
    got = mech["timings"]["one lerp launch, 10 tensors of 16"]
    assert {"fastema kept launch", "torch.lerp_ 16"} <= set(got), got
    if "emulator" in mech["env"]["driver"]:
        assert {"cuLaunchKernel through the bindings", "cuGraphLaunch of a 1-node graph"} <= set(got)


def test_rest_runs_in_the_simulator_and_writes_its_files(runs):
    rc, output, folder = runs["rest"]
    assert rc == 0, output[-4000:]
    assert FILES["rest"] <= _files(folder), output[-2000:]
    probe = json.loads((folder / "probe.json").read_text())
    failed = {k: v for k, v in probe["checks"].items() if v.get("ok") is False}
    assert not failed, failed
    passed = [k for k, v in probe["checks"].items() if v.get("ok") is True]
    assert len(passed) >= 9 and any(k.startswith("lerp bfloat16->float32") for k in passed)
    assert probe["checks"]["CUDA graph capture of FlatShadow.update(weight=tensor)"]["ok"] is None
    rows = [m for impls in probe["timings"].values() for m in impls.values()]     # budget 0 s
    assert rows and all("out of time" in m.get("skipped", "") for m in rows)
    probe_md = (folder / "probe.md").read_text()
    assert probe_md.startswith("gpu-summary: device=simulator host_us_6=nan ")
    bench = json.loads((folder / "bench.json").read_text())
    assert len(bench["benchmarks"]) == 5 and "| fastema |" in (folder / "bench.md").read_text()
    assert "offload: needs a GPU" in output


def test_a_test_run_stopped_at_its_budget_says_so(runs):
    rc, output, folder = runs["cut"]
    log = (folder / "cuda-tests.log").read_text()
    assert rc == 124, output[-3000:]
    assert log.startswith("pytest tests/kernels/test_cuda.py -k ")
    assert "[tests] stopped at the budget's end" in log
    assert "the compiles run was not started" in log
    assert log.rstrip().endswith("(stopped at the budget)")


FIELDS = ["device", "host_us_6", "host_us_148", "host_us_3000", "foreach_host_us_6",
          "foreach_host_us_148", "foreach_host_us_3000", "e2e_rl6_vs_foreach",
          "e2e_gpt2_fp32_vs_foreach", "e2e_gpt2_bf16_vs_foreach", "flat28_device_vs_lerp",
          "cuda_tests_failed", "probe_failed", "numba_cuda", "cuda_core", "driver", "cached_launch",
          "flat28_ema_device_vs_lerp", "device_us_6", "device_us_148", "device_us_3000",
          "foreach_device_us_6", "foreach_device_us_148", "foreach_device_us_3000",
          "flat28_pct_of_copy", "flat28_ema_pct_of_copy", "step_gpt2_fp32_vs_foreach",
          "step_gpt2_bf16_vs_foreach", "first_update_s", "first_update_nvvm", "cuda_tests_passed",
          "headline_failed"]
WORDS = ("device", "numba_cuda", "cuda_core", "driver", "cached_launch")
COUNTS = ("cuda_tests_failed", "probe_failed", "cuda_tests_passed", "first_update_nvvm",
          "headline_failed")


def _fields(line: str) -> dict:
    assert line.startswith("gpu-summary: ") and "\n" not in line
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    assert list(fields) == FIELDS
    for key, value in fields.items():
        if key in WORDS:
            assert re.fullmatch(r"\S+", value)
        elif key in COUNTS:
            assert int(value) >= -1
        else:
            number = float(value.removesuffix("x"))
            assert math.isnan(number) or math.isfinite(number), (key, value)
    return fields


def test_summary_line_of_the_commands_folders_parses(runs):
    folders = [str(runs[s][2]) for s in ("all", "rest")]
    p = subprocess.run([sys.executable, "-m", "bench.gpu.summary", *folders], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    fields = _fields(p.stdout.strip())
    assert fields["device"] == "simulator" and fields["cuda_tests_failed"] == "0"
    assert fields["probe_failed"] == "0" and fields["cached_launch"] == "False"
    assert fields["numba_cuda"] != "unknown"
    for key in ("host_us_6", "host_us_3000", "foreach_host_us_3000", "device_us_148",
                "first_update_s"):
        assert float(fields[key]) > 0, key          # the headline's rows, not the probe's skipped


def _branches(text: str) -> dict:
    body = text[text.index('case "$stage" in\n  speed)'):]
    return dict(re.findall(r"^  (\w+)\)\n(.*?)^    ;;", body, re.S | re.M))


def _seconds(text: str) -> int:
    """What the ``timeout`` calls in ``text`` may take at most: each limit plus its kill-after
    (not pytest-timeout's per-test ``--timeout``)."""
    found = re.findall(r"(?<![-\w])timeout(?:\s+-k\s+(\d+))?\s+(\d+)\b", text)
    return sum(int(k or 0) + int(s) for k, s in found)


def _module(name: str):
    return importlib.import_module(f"bench.gpu.{name}")


def test_each_command_fits_one_window():
    """Each command's timeouts, the set-up's (bench/gpu/env.sh, sourced first) and the summary's
    included, add up to at most 8 minutes; the budgets inside stop starting work well before
    their timeouts; output is teed, never piped through tail."""
    script, setup = (GPU / "run.sh").read_text(), (GPU / "env.sh").read_text()
    branches = _branches(script)
    assert set(branches) == {"speed", "all", "targets", "rest"}
    tail = script[script.index("\nesac\n", script.index('case "$stage" in\n  speed)')):]
    assert _seconds(setup) > 0 and _seconds(tail) > 0
    for stage, body in branches.items():
        total = _seconds(setup) + _seconds(body) + _seconds(tail)
        assert 0 < _seconds(body) and total <= WINDOW_S, (stage, total)
    for text in (script, setup):
        assert not re.search(r"\|\s*tail\b", text)
    assert "set -uo pipefail" in script
    budget = r"timeout -k \d+ (\d+) .*--budget \"?(?:\$\{GPU_PROBE_BUDGET:-)?(\d+)"
    found = re.findall(budget, "".join(branches.values()))
    assert len(found) == 6                                    # compiled, targets x2, tests, headline, probe
    for limit, inner in found:
        assert int(inner) + 15 <= int(limit), (limit, inner)  # room to report after the budget
    tests = _module("cuda_tests")
    limit = int(re.search(r"bench.gpu.cuda_tests .*--budget (\d+)", branches["all"]).group(1))
    assert tests.TEST_TIMEOUT < tests.COMPILE_TIMEOUT <= limit and tests.MIN_LAST < limit
    files = tests.cuda_files()
    assert set(tests.PRIORITY) <= set(files) and files[:len(tests.PRIORITY)] == tests.PRIORITY
    assert subprocess.run(["bash", "-n", str(GPU / "run.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(GPU / "env.sh")]).returncode == 0


def test_numpy_shim_lets_numba_cuda_compile_where_numpy_lacks_row_stack(tmp_path):
    """numpy 2.5 removed ``row_stack``, which numba-cuda 0.30 registers at its first compile: the
    compile fails (the first case, which this test would catch); the sitecustomize shim that
    bench/gpu/env.sh writes where no numpy wheel was carried makes it work."""
    pytest.importorskip("numba.cuda")
    shim = tmp_path / "shim"
    p = subprocess.run(["bash", "-c", f'source bench/gpu/env.sh >/dev/null && gpu_write_numpy_shim "{shim}"'],
                       cwd=ROOT, env=_env(GPU_SIMULATE="1"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    code = f"""
import runpy, sys
import numpy
del numpy.row_stack                                    # numpy 2.5
if sys.argv[1] == "shim":
    runpy.run_path({str(shim / "sitecustomize.py")!r})
import numba
from numba import cuda

def k(x):
    i = cuda.grid(1)
    if i < x.size:
        x[i] += 1.0

try:
    cuda.compile_ptx(k, (numba.float32[:],), cc=(9, 0))
except AttributeError as e:
    print("compile failed:", e)
    sys.exit(3)
print("compiled")
"""
    without = subprocess.run([sys.executable, "-c", code, "none"], env=_env(), capture_output=True, text=True,
                             timeout=120)
    if without.returncode not in (0, 3):
        pytest.skip(f"numba-cuda cannot compile PTX here: {without.stderr[-300:]}")
    assert without.returncode == 3 and "row_stack" in without.stdout
    with_shim = subprocess.run([sys.executable, "-c", code, "shim"], env=_env(), capture_output=True, text=True,
                               timeout=120)
    assert with_shim.returncode == 0 and "compiled" in with_shim.stdout, with_shim.stderr[-2000:]


def test_probe_checks_in_gpu_mode_agree_on_cpu_tensors(tmp_path):
    """The GPU mode's conversions (NumPy <-> torch, bfloat16 through int16 views) with torch CPU
    tensors standing in for CUDA ones: every kernel check passes, so on the day a failure is the GPU's."""
    code = """
import sys
import torch
from bench.gpu import common as G
G.to_device = lambda h: G._torch_of(h).clone()
G.sync = lambda: None
G.torch_device = lambda: torch.device("cpu")
from bench.gpu import checks as C
C.SIZES[:] = [1, 7, 231, 4096, 4097]
rec = G.Record(sys.argv[1], ["checks"])
C.kernel_checks(rec)
bad = {k: v for k, v in rec.data["checks"].items() if v.get("ok") is not True}
print(len(rec.data["checks"]), "checks; not ok:", bad)
sys.exit(1 if bad or len(rec.data["checks"]) < 14 else 0)
"""
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "checks.json")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_measure_flags_a_host_bound_run_and_refuses_a_host_figure_that_waited(monkeypatch):
    """Device time is flagged host-bound when the event at the end of the GPU sleep has completed
    before the host finished queueing; host batches in which the GPU caught up are retried with a
    quarter of the calls, and where it still catches up the host figure is invalid (None, never
    printed as host cost: the H200's bfloat16 baseline read "40 ms"); every figure carries its
    spread; ``interleaved`` takes the implementations' batches in turn, one run id. Fakes stand in
    for the GPU (no device)."""
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    from bench.gpu import common as G
    from bench.gpu import measure as M
    from bench.suite.checked import Refused
    from bench.suite.figures import cell, ratio

    state = {"idle": False}

    class Event:
        def record(self, stream=None):
            self.t = 0.0

        def query(self):
            return state["idle"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 1.0                                  # 1 ms a batch

    for name, value in (("sync", lambda: None), ("gpu_busy", lambda ms: None), ("event", Event)):
        monkeypatch.setattr(G, name, value)
    monkeypatch.setattr(M, "CALLS", 200)
    monkeypatch.setattr(M, "BATCHES", 5)
    calls = []
    m = M.measure(lambda: calls.append(1))
    assert (m["calls"], m["batches"], m["host_bound"], m["host_bound_batches"], m["host_waited"]) == \
           (200, 5, False, 0, 0)
    assert m["device_us"] == pytest.approx(1e3 / 200) and m["device_us_min"] == m["device_us_max"]
    assert m["host_us_min"] <= m["host_us"] <= m["host_us_max"] and m["pipelined_us"] > 0
    assert cell(m, "host").startswith(f"{m['host_us']:.1f} (")
    state["idle"] = True                                # the GPU ran dry before the host had queued
    m = M.measure(lambda: None)
    assert m["host_bound"] and m["host_bound_batches"] == 5 and m["calls"] == 10 and m["calls_asked"] == 200
    assert m["host_us"] is None and m["host_waited"] == 5 and "waited for the GPU" in m["host_invalid"]
    assert cell(m, "host") == "invalid: waited for the GPU in 5/5 batches"
    with pytest.raises(Refused, match="taken while the host waited for the GPU"):
        cell(dict(m, host_us=3.0), "host")              # the broken row: a figure that waited, as a number
    m = M.with_bandwidth(dict(m, device_us=2.0, e2e_us=4.0), 1000, "mul+add bf16->f32")
    assert m["bytes"] == 18_000 and m["device_GBps"] == pytest.approx(9.0)
    state["idle"] = False
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    rows = M.interleaved(fns, calls=40, batches=3)
    assert set(rows) == {"a", "b"} and rows["a"]["run"] == rows["b"]["run"]
    assert all(r["calls"] == 40 and r["batches"] == 3 for r in rows.values())
    timed = order[2 * (3 + 20 + 40):]          # after each one's warm-up, estimate and calibration
    runs = [k for i, k in enumerate(timed) if i == 0 or timed[i - 1] != k]
    assert runs[:12] == ["a", "b"] * 6 and rows["a"]["device_us"] == pytest.approx(1e3 / 40)
    rows["b"]["checked"] = True
    assert ratio("s", rows, "a", "b", "device") == pytest.approx(1.0)
    other = M.interleaved({"b": fns["b"]}, calls=40, batches=3)["b"]
    with pytest.raises(Refused, match="timed in another call"):
        ratio("s", {"a": rows["a"], "b": dict(other, checked=True)}, "a", "b", "device")
