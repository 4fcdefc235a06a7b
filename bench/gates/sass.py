"""The sm_90 machine code of every per-step CUDA kernel as shipped, read by ``bench/gpu/sass/``: the
CUDA 13 set's (named as the variant) and the CUDA 12 set's (``cu12 <variant>``)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .common import ToolMissing, use_tree


def measure_sass() -> dict:
    use_tree()
    from bench.gpu import sass as S

    problem = S.toolchain_problem("cu13") or S.toolchain_problem("cu12")
    if problem:
        raise ToolMissing(f"sass: {problem}")
    folder = Path(tempfile.mkdtemp(prefix="fastema-gates-sass-"))
    try:
        reports = [("", S.analyse(b)) for b in S.build_all(S.variants(), folder, 2, "cu13")]
        reports += [("cu12 ", S.analyse(b)) for b in S.build_all(S.variants(), folder, 2, "cu12")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {}
    for prefix, r in reports:
        out[prefix + r.variant.name] = {
            "registers": r.registers, "spill_bytes": r.spill_stores + r.spill_loads, "stack_frame": r.frame,
            "blocks_per_sm": r.blocks_per_sm, "streaming_loop": "; ".join(lp.widths() for lp in r.streaming) or "-",
            "scalar_fallback_loops": sum(1 for lp in r.loops if lp.fallback),
            "in_flight_B_per_thread": round(r.in_flight_thread, 1),
            "in_flight_KiB_per_SM": round(r.in_flight_sm_kib, 1)}
    return out
