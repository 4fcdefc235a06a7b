"""The GPU plan (``bench/gpu.sh`` and its Python stages) runs end to end without a GPU (issue 37 item 2).

GPU time is rare (a 30-minute lease, each command at most 10 minutes, at most 8 files back): a plan
that breaks on the day wastes it. So CI runs every stage in the Numba CUDA simulator at tiny sizes
(``--simulate``; each in a subprocess, the simulator being switched on before numba is imported) and
checks that each writes its files, that the summary line parses, that each stage's timeouts fit in
a 9-minute command, that the numpy shim lets numba-cuda compile where numpy lacks ``row_stack``, that
the probe's GPU-mode array adapters agree with the CPU kernels (on CPU tensors), and that the timing
flags a host-bound run. Not cuda-marked: the simulator runs inside the subprocesses.
"""
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
STAGES = {"env": {"env.txt", "smoke.json", "smoke.log", "setup.log"},
          "tests": {"cuda-tests.log", "setup.log"},
          "probe": {"probe.json", "probe.md", "probe.log", "setup.log"},
          "bench": {"bench.json", "bench.md", "bench.log", "setup.log"}}
MAX_FILES, STAGE_LIMIT_S = 8, 540

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the GPU plan is bash on Linux")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPU_SIMULATE", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Every stage run once in the simulator: {stage: (exit status, output, its folder)}."""
    base = tmp_path_factory.mktemp("gpu-plan")
    runs = {}
    for stage in STAGES:
        folder = base / stage
        p = subprocess.run(["bash", str(BENCH / "gpu.sh"), stage, str(folder), "--simulate"], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
        runs[stage] = (p.returncode, p.stdout + p.stderr, folder)
    return runs


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_runs_in_the_simulator_and_writes_its_files(stages, stage):
    rc, output, folder = stages[stage]
    assert rc == 0, output[-4000:]
    files = {p.name for p in folder.iterdir()}
    assert STAGES[stage] <= files, (files, output[-2000:])
    assert len(files) <= MAX_FILES and all((folder / f).is_file() for f in files)   # the device returns 8, flat
    assert "gpu_env: numpy:" in output and "gpu_env: fastema:" in output
    if stage == "env":
        env = dict(ln.split("=", 1) for ln in (folder / "env.txt").read_text().splitlines())
        for key in ("driver", "python", "torch", "numba", "numba-cuda", "cuda-core", "cuda-bindings", "llvmlite",
                    "numpy", "nvidia-nvjitlink", "cuda-toolkit", "nvvm", "pytest-xdist", "cached_launch",
                    "numpy_row_stack", "numpy_fix", "fastema_install"):
            assert key in env, key
        assert env["simulator"] == "True" and env["cached_launch"] == "False"
        smoke = json.loads((folder / "smoke.json").read_text())
        checks = smoke["checks"]
        assert [k[0] for k in checks] == ["1", "3", "4", "5", "6"]
        assert checks["1 compile and launch"]["ok"] is True
        assert checks["3 FlatShadow.update of 3 odd-sized float32 tensors == CPU kernel"]["ok"] is True
        assert all(v["ok"] is None and "simulator" in v["skipped"] for k, v in checks.items() if k[0] in "456")
        assert smoke["host"]["2 cached_launch_available"] is False
        assert set(smoke["host"]["7 launch host us"]) >= {"cached_launch", "the group's bound lerp launch alone us",
                                                          "numba kernel[grid, block](...) of the same kernel us"}
    elif stage == "tests":
        log = (folder / "cuda-tests.log").read_text()
        assert log.startswith("pytest tests/kernels/test_cuda.py -m cuda")
        assert "--durations=20 -rfE -v --tb=line -p no:cacheprovider" in log.splitlines()[0]
        assert re.search(r"\b2 passed\b.* in [\d.]+s", log)
    elif stage == "probe":
        probe = json.loads((folder / "probe.json").read_text())
        failed = {k: v for k, v in probe["checks"].items() if v.get("ok") is False}
        assert not failed, failed
        passed = [k for k, v in probe["checks"].items() if v.get("ok") is True]
        assert len(passed) >= 9 and any(k.startswith("lerp bfloat16->float32") for k in passed)
        assert probe["checks"]["CUDA graph capture of FlatShadow.update(weight=tensor)"]["ok"] is None
        row = probe["timings"]["host-cost rl6 float32"]["fastema EMA.update"]
        for key in ("host_us", "host_us_min", "host_us_max", "device_us", "pipelined_us", "e2e_us", "host_bound",
                    "host_bound_batches", "calls", "batches", "bytes_per_element", "device_GBps"):
            assert key in row, key
        assert row["bytes_per_element"] == 12
        assert probe["timings"]["host-cost rl6 bf16"]["torch._foreach_mul_+_foreach_add_"]["bytes_per_element"] == 18
        assert {"fastema EMA.update", "fastema FlatShadow.update", "fastema.ema_update_", "torch.lerp_"} <= \
            set(probe["timings"]["flat float32 2^10"])
        assert (folder / "probe.md").read_text().startswith("gpu-summary: device=simulator ")
    else:
        bench = json.loads((folder / "bench.json").read_text())
        assert len(bench["benchmarks"]) == 4 and "| fastema |" in (folder / "bench.md").read_text()


FIELDS = ["device", "host_us_6", "host_us_148", "host_us_3000", "foreach_host_us_6", "foreach_host_us_148",
          "foreach_host_us_3000", "e2e_rl6_vs_foreach", "e2e_gpt2_fp32_vs_foreach", "e2e_gpt2_bf16_vs_foreach",
          "flat28_device_vs_lerp", "cuda_tests_failed", "probe_failed", "numba_cuda", "cuda_core", "driver",
          "cached_launch", "flat28_ema_device_vs_lerp"]


def test_summary_line_of_the_stage_folders_parses(stages):
    folders = [str(stages[s][2]) for s in STAGES]
    p = subprocess.run([sys.executable, str(BENCH / "gpu_summary.py"), *folders], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip()
    assert line.startswith("gpu-summary: ") and "\n" not in line
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    assert list(fields) == FIELDS
    for key, value in fields.items():
        if key in ("device", "numba_cuda", "cuda_core", "driver", "cached_launch"):
            assert re.fullmatch(r"\S+", value)
        elif key in ("cuda_tests_failed", "probe_failed"):
            assert int(value) >= -1
        else:
            number = float(value.removesuffix("x"))
            assert math.isnan(number) or number > 0, (key, value)
    assert fields["device"] == "simulator" and fields["cuda_tests_failed"] == "0" and fields["probe_failed"] == "0"
    assert fields["cached_launch"] == "False" and fields["numba_cuda"] != "unknown"
    assert not math.isnan(float(fields["host_us_6"]))                        # the host-cost rows ran


def _stage_branches(text: str) -> dict:
    body = text[text.index('case "$stage" in'):]
    return dict(re.findall(r"^  (\w+)\)\n(.*?)^    ;;", body, re.S | re.M))


def _seconds(text: str) -> int:
    """What the ``timeout`` calls in ``text`` may take at most: each limit plus its kill-after (not
    pytest-timeout's per-test ``--timeout``)."""
    return sum(int(k or 0) + int(s) for k, s in re.findall(r"(?<![-\w])timeout(?:\s+-k\s+(\d+))?\s+(\d+)\b", text))


def test_each_stage_fits_in_one_device_command():
    """Every stage's timeouts, the set-up's (bench/gpu_env.sh, sourced by every stage) included, add
    up to less than 9 minutes; output is teed, never piped through tail; the probe stops starting
    timings well before its timeout."""
    script, setup = (BENCH / "gpu.sh").read_text(), (BENCH / "gpu_env.sh").read_text()
    branches = _stage_branches(script)
    assert set(branches) == set(STAGES)
    assert _seconds(setup) > 0
    for stage, body in branches.items():
        total = _seconds(setup) + _seconds(body)
        assert 0 < _seconds(body) and total < STAGE_LIMIT_S, (stage, total)
    for text in (script, setup):
        assert not re.search(r"\|\s*tail\b", text)
    assert "set -uo pipefail" in script and script.count("PIPESTATUS[0]") == len(STAGES)
    budget = int(re.search(r"--budget (\d+)", branches["probe"]).group(1))
    assert budget + 60 < _seconds(branches["probe"])
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_env.sh")]).returncode == 0


def test_numpy_shim_lets_numba_cuda_compile_where_numpy_lacks_row_stack(tmp_path):
    """numpy 2.5 removed ``row_stack``, which numba-cuda 0.30 registers at its first compile: the
    compile fails (the first case, which this test would catch); the sitecustomize shim that
    bench/gpu_env.sh writes where no numpy wheel was carried makes it work."""
    pytest.importorskip("numba.cuda")
    shim = tmp_path / "shim"
    p = subprocess.run(["bash", "-c", f'source bench/gpu_env.sh >/dev/null && gpu_write_numpy_shim "{shim}"'],
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
sys.path.insert(0, "bench")
import torch
import gpu_common as G
G.to_device = lambda h: G._torch_of(h).clone()
G.sync = lambda: None
G.torch_device = lambda: torch.device("cpu")
import gpu_checks as C
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


def test_measure_flags_a_host_bound_run_and_fewer_calls_where_the_queue_fills(monkeypatch):
    """Device time is flagged host-bound when the event at the end of the GPU sleep has completed
    before the host finished queueing; host batches in which the GPU caught up are retried with a
    quarter of the calls. Fakes stand in for the GPU (no device)."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    import gpu_common as G
    import gpu_measure as M

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
    assert (m["calls"], m["batches"], m["host_bound"], m["host_bound_batches"], m["host_gpu_caught_up"]) == \
           (200, 5, False, 0, 0)
    assert m["device_us"] == pytest.approx(1e3 / 200)
    state["idle"] = True                                # the GPU ran dry before the host had queued
    m = M.measure(lambda: None)
    assert m["host_bound"] and m["host_bound_batches"] == 5 and m["calls"] == 10 and m["calls_asked"] == 200
    m = M.with_bandwidth(dict(m, device_us=2.0, e2e_us=4.0), 1000, "mul+add bf16->f32")
    assert m["bytes"] == 18_000 and m["device_GBps"] == pytest.approx(9.0)


def test_probe_out_of_budget_still_writes_its_report(tmp_path):
    """Past --budget no timing starts (recorded 'skipped: out of time'), and probe.md is written."""
    p = subprocess.run([sys.executable, str(BENCH / "gpu_probe.py"), str(tmp_path), "--simulate", "--quick",
                        "--budget", "0"], cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    rows = [m for impls in probe["timings"].values() for m in impls.values()]
    assert rows and all("out of time" in m.get("skipped", "") for m in rows)
    assert (tmp_path / "probe.md").read_text().startswith("gpu-summary: device=simulator host_us_6=nan ")
