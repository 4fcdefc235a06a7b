"""The one-line summary of a GPU run (issue #23, item 5), which the maintainers' checks read:

    gpu-summary: device=<name> host_us_6=<x> host_us_148=<x> host_us_3000=<x> foreach_host_us_6=<x>
    foreach_host_us_148=<x> foreach_host_us_3000=<x> e2e_rl6_vs_foreach=<r>x e2e_gpt2_fp32_vs_foreach=<r>x
    e2e_gpt2_bf16_vs_foreach=<r>x flat28_device_vs_lerp=<r>x cuda_tests_failed=<n> probe_failed=<n>

(one line). Host times are ``EMA.update()``'s and ``torch._foreach_lerp_``'s host submit time per
call in the probe's host-cost scenarios (6 tensors: the RL MLP; 148: GPT-2 small; 3000: 3000 x
4096; float32); ratios are the baseline's time over fastema's (> 1: fastema faster): end to end
(synchronised per call) against ``_foreach_lerp_`` (float32) and ``_foreach_mul_`` +
``_foreach_add_`` (bfloat16 parameters into a float32 shadow), and device time of a flat 2^28
float32 ``ema_update_`` against ``torch.lerp_``. A figure that was not measured is ``nan``; a
count that is not known is ``-1``. Plain Python: the CPU tests check the format.
"""
from __future__ import annotations

import math
import re

HOST_COST = {6: "host-cost rl6", 148: "host-cost gpt2", 3000: "host-cost 3000x4096"}
EMA, FOREACH, MIXED = "fastema EMA.update", "torch._foreach_lerp_", "torch._foreach_mul_+_foreach_add_"


def _get(timings: dict, scenario: str, impl: str, key: str) -> float:
    value = timings.get(scenario, {}).get(impl, {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _ratio(baseline: float, ours: float) -> float:
    return baseline / ours if ours > 0 else math.nan


def failed_tests(log: str | None) -> int:
    """The failures (and errors) in a pytest log's last summary line, or -1 without one."""
    if not log:
        return -1
    lines = [ln for ln in log.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped|deselected)\b", ln)
             and re.search(r"\bin [\d.]+s\b", ln)]
    if not lines:
        return -1
    last = lines[-1]
    return sum(int(n) for n, _ in re.findall(r"(\d+) (failed|errors?)\b", last))


def summary_line(timings: dict, checks: dict, device: str, cuda_log: str | None) -> str:
    """The ``gpu-summary:`` line of a probe run (``timings``/``checks``: the probe's sections)."""
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
    flat28 = _ratio(_get(timings, flat, "torch.lerp_", "device_us"), _get(timings, flat, "fastema.ema_update_",
                                                                         "device_us"))
    fields.append(("flat28_device_vs_lerp", f"{flat28:.2f}x"))
    fields.append(("cuda_tests_failed", str(failed_tests(cuda_log))))
    failed = sum(1 for v in checks.values() if isinstance(v, dict) and v.get("ok") is False)
    fields.append(("probe_failed", str(failed)))
    return "gpu-summary: " + " ".join(f"{k}={v}" for k, v in fields)
