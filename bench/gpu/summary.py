"""The one-line summary of a GPU run (issue #23, item 5; issues #37, #63), which the maintainers'
checks read:

    gpu-summary: device=<name> host_us_6=<x> host_us_148=<x> host_us_3000=<x> foreach_host_us_6=<x>
    foreach_host_us_148=<x> foreach_host_us_3000=<x> e2e_rl6_vs_foreach=<r>x e2e_gpt2_fp32_vs_foreach=<r>x
    e2e_gpt2_bf16_vs_foreach=<r>x flat28_device_vs_lerp=<r>x cuda_tests_failed=<n> probe_failed=<n>
    numba_cuda=<version> cuda_core=<version> driver=<version> cached_launch=<True|False|unknown>
    flat28_ema_device_vs_lerp=<r>x device_us_6=<x> device_us_148=<x> device_us_3000=<x>
    foreach_device_us_6=<x> foreach_device_us_148=<x> foreach_device_us_3000=<x>
    flat28_pct_of_copy=<p> flat28_ema_pct_of_copy=<p> step_gpt2_fp32_vs_foreach=<r>x
    step_gpt2_bf16_vs_foreach=<r>x first_update_s=<s> first_update_nvvm=<n> cuda_tests_passed=<n>
    headline_failed=<n>

(one line). Host times are ``EMA.update()``'s and ``torch._foreach_lerp_``'s host submit time per
call in the host-cost scenarios (6 tensors: the RL MLP; 148: GPT-2 small; 3000: 3000 x 4096;
float32), device times their device time per call (CUDA events); ``e2e_*`` ratios are the
baseline's time over fastema's (> 1: fastema faster) for one call and a sync, against
``_foreach_lerp_`` (float32) and ``_foreach_mul_`` + ``_foreach_add_`` (bfloat16 parameters into a
float32 shadow); ``flat28_device_vs_lerp`` is the device time of a flat 2^28 float32
``ema_update_`` against ``torch.lerp_`` (the plain lerp kernel), ``flat28_ema_device_vs_lerp`` the
same for ``EMA.update`` of a model holding that one tensor (the kernels an EMA runs), and
``flat28_*pct_of_copy`` their GB/s as a percentage of a device copy's in the same run.
``step_gpt2_*_vs_foreach``: one training step of a GPT-2-size model (float32 or bfloat16 weights)
with the baseline's update less the step alone, over the same with fastema's (what the update adds
to a step; ``bench/gpu/steps.py``). ``first_update_s`` / ``first_update_nvvm``: the first
``EMA.update()`` of a fresh process with the shipped device code, and NVVM's calls in that process
(0: nothing compiled). ``cuda_tests_failed`` / ``cuda_tests_passed``: the CUDA tests' count (the
``[test]`` lines of ``bench/gpu/testlog.py`` where present, which a cut run keeps, else pytest's
last summary line); ``probe_failed`` / ``headline_failed``: the failed checks of ``probe.json`` and
``headline.json``. ``numba_cuda``, ``cuda_core`` and ``driver`` are the versions the run used, and
``cached_launch`` whether fastema's cached CUDA launch was in use (False: every host time is
numba's dispatcher's). A figure that was not measured is ``nan``; a count that is not known is
``-1``; a version or flag that is not known is ``unknown``. Plain Python: the CPU tests check the
format.

Rebuilt from the files of the GPU commands (``bench/gpu/run.sh``) once fetched::

    python -m bench.gpu.summary DIR [DIR...]

reads ``headline.json`` and ``cuda-tests.log`` (``all``), ``probe.json`` (``rest``, or the old
``probe`` stage) and ``env.txt`` (``smoke.json`` for ``cached_launch`` where ``env.txt`` lacks it),
each from whichever folder holds it (the last named, where several do); a figure in both
``headline.json`` and ``probe.json`` is the headline's. Prints the line. Exit status 1 when none of
the folders holds any of them.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

HOST_COST = {6: "host-cost rl6", 148: "host-cost gpt2", 3000: "host-cost 3000x4096"}
EMA, FOREACH, MIXED = "fastema EMA.update", "torch._foreach_lerp_", "torch._foreach_mul_+_foreach_add_"
FILES = ("probe.json", "headline.json", "cuda-tests.log", "env.txt", "smoke.json")


def _get(timings: dict, scenario: str, impl: str, key: str) -> float:
    value = timings.get(scenario, {}).get(impl, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _ratio(baseline: float, ours: float) -> float:
    return baseline / ours if ours > 0 else math.nan


def _word(value) -> str:
    text = re.sub(r"\s+", "_", str(value).strip()) if value is not None else ""
    return text if text and not text.startswith(("unavailable", "not_installed", "none")) else "unknown"


def _count(log: str | None, words: tuple) -> int:
    """How many tests of the ``[test]`` lines (``bench/gpu/testlog.py``) say one of ``words``; else
    the numbers of ``words`` in pytest's last summary line; -1 without either."""
    if not log:
        return -1
    tests = re.findall(r"^\[test\] (\w+) ", log, re.M)
    if tests:
        return sum(1 for w in tests if w.lower() in words)
    lines = [ln for ln in log.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped|deselected)\b", ln)
             and re.search(r"\bin [\d.]+s\b", ln)]
    if not lines:
        return -1
    return sum(int(n) for n, w in re.findall(r"(\d+) (\w+)\b", lines[-1]) if w in words)


def failed_tests(log: str | None) -> int:
    """The failures (and errors) of a CUDA tests log (see :func:`_count`), or -1."""
    return _count(log, ("failed", "error", "errors"))


def passed_tests(log: str | None) -> int:
    """The tests of a CUDA tests log that passed (see :func:`_count`), or -1."""
    return _count(log, ("passed",))


def _number(value) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number else math.nan


def _ratio_of(row: dict, base: str, key: str) -> float:
    """``row[base][key] / row[EMA][key]`` (nan where either is missing)."""
    return _ratio(_number(row.get(base, {}).get(key)), _number(row.get(EMA, {}).get(key)))


def _failed(checks: dict) -> int:
    return sum(1 for v in checks.values() if isinstance(v, dict) and v.get("ok") is False)


def summary_line(timings: dict, checks: dict, device: str, cuda_log: str | None,
                 env: dict | None = None, headline: dict | None = None) -> str:
    """The ``gpu-summary:`` line of a GPU run (``timings``/``checks``: the probe's or the headline's
    sections; ``env``: the versions, ``env.txt``'s keys: ``numba-cuda``, ``cuda-core``, ``driver``,
    ``cached_launch``; ``headline``: ``headline.json``'s data, for its steps, first update and
    checks)."""
    env, headline = env or {}, headline or {}
    f32 = {k: f"{v} float32" for k, v in HOST_COST.items()}
    fields = [("device", re.sub(r"\s+", "_", device.strip()) or "unknown")]
    for k in (6, 148, 3000):
        fields.append((f"host_us_{k}", f"{_get(timings, f32[k], EMA, 'host_us'):.1f}"))
    for k in (6, 148, 3000):
        fields.append((f"foreach_host_us_{k}", f"{_get(timings, f32[k], FOREACH, 'host_us'):.1f}"))
    e2e = lambda sc, base: _ratio(_get(timings, sc, base, "e2e_us"), _get(timings, sc, EMA, "e2e_us"))  # noqa: E731
    fields.append(("e2e_rl6_vs_foreach", f"{e2e(f32[6], FOREACH):.2f}x"))
    fields.append(("e2e_gpt2_fp32_vs_foreach", f"{e2e(f32[148], FOREACH):.2f}x"))
    fields.append(("e2e_gpt2_bf16_vs_foreach", f"{e2e(HOST_COST[148] + ' bf16', MIXED):.2f}x"))
    flat = "flat float32 2^28"
    lerp = _get(timings, flat, "torch.lerp_", "device_us")
    ours = _get(timings, flat, "fastema.ema_update_", "device_us")
    fields.append(("flat28_device_vs_lerp", f"{_ratio(lerp, ours):.2f}x"))
    fields.append(("cuda_tests_failed", str(failed_tests(cuda_log))))
    fields.append(("probe_failed", str(_failed(checks))))
    for name, key in (("numba_cuda", "numba-cuda"), ("cuda_core", "cuda-core"), ("driver", "driver"),
                      ("cached_launch", "cached_launch")):
        fields.append((name, _word(env.get(key))))
    fields.append(("flat28_ema_device_vs_lerp", f"{_ratio(lerp, _get(timings, flat, EMA, 'device_us')):.2f}x"))
    for prefix, impl in (("", EMA), ("foreach_", FOREACH)):
        for k in (6, 148, 3000):
            us = _get(timings, f32[k], impl, "device_us")
            fields.append((f"{prefix}device_us_{k}", f"{us:.1f}"))
    copy = _get(timings, flat, "copy (ceiling)", "device_GBps")
    for name, impl in (("flat28_pct_of_copy", "fastema.ema_update_"),
                       ("flat28_ema_pct_of_copy", EMA)):
        fields.append((name, f"{100 * _ratio(_get(timings, flat, impl, 'device_GBps'), copy):.1f}"))
    steps = headline.get("steps", {})
    for name, row, base in (("step_gpt2_fp32_vs_foreach", "gpt2 float32", FOREACH),
                            ("step_gpt2_bf16_vs_foreach", "gpt2 bf16", MIXED)):
        fields.append((name, f"{_ratio_of(steps.get(row, {}), base, 'update_in_step_us'):.2f}x"))
    first = headline.get("first_update", {}).get("fresh process", {})
    nvvm = first.get("nvvm_calls")
    fields.append(("first_update_s", f"{_number(first.get('first_update_s')):.3f}"))
    fields.append(("first_update_nvvm", str(nvvm) if isinstance(nvvm, int) else "-1"))
    fields.append(("cuda_tests_passed", str(passed_tests(cuda_log))))
    bad = _failed(headline.get("checks", {})) if headline else -1
    fields.append(("headline_failed", str(bad)))
    return "gpu-summary: " + " ".join(f"{k}={v}" for k, v in fields)


def read_env(text: str) -> dict:
    """``env.txt``'s ``key=value`` lines as a dict (the first ``=`` splits)."""
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)


def from_folders(folders) -> tuple[str | None, dict]:
    """The summary line of the command folders ``folders`` (None when they hold none of the files),
    and which file each part came from."""
    found: dict = {}
    for folder in folders:
        for name in FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found[name] = path
    if not found:
        return None, found

    def text(name):
        if name not in found:
            return None
        with open(found[name], errors="replace") as fh:
            return fh.read()

    def load(name):
        try:
            return json.loads(text(name) or "{}")
        except ValueError:                            # a file cut off mid-write: what it says is unknown
            return {}

    probe, smoke, headline = load("probe.json"), load("smoke.json"), load("headline.json")
    env = {k: v for k, v in probe.get("env", {}).items() if v is not None}
    env.update(read_env(text("env.txt") or ""))
    if "cached_launch" not in env:
        cached = smoke.get("host", {}).get("2 cached_launch_available")
        if cached is not None:
            env["cached_launch"] = cached
    timings = {sc: dict(rows) for sc, rows in probe.get("timings", {}).items()}
    for sc, rows in headline.get("timings", {}).items():
        timings.setdefault(sc, {}).update(rows)
    device = str(headline.get("env", {}).get("gpu") or probe.get("env", {}).get("gpu")
                 or env.get("gpu") or "")
    if device.startswith("unavailable"):
        device = ""
    line = summary_line(timings, probe.get("checks", {}), device, text("cuda-tests.log"), env,
                        headline)
    return line, found


def main(argv) -> int:
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python -m bench.gpu.summary DIR [DIR...]  (the fetched command folders)",
              file=sys.stderr)
        return 2
    line, found = from_folders(argv)
    if line is None:
        print(f"gpu_summary: none of {', '.join(FILES)} in {', '.join(argv)}", file=sys.stderr)
        return 1
    for name, path in found.items():
        print(f"# {name}: {path}", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
