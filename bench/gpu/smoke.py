#!/usr/bin/env python3
"""Preflight of a GPU session, about a minute (part 1 of ``bash bench/gpu.sh all``): the five
biggest unknowns before the tests and the probe spend their minutes. One line each, and OUTDIR/smoke.json
rewritten after each:

1. a kernel compiles and launches (a plain numba kernel, then fastema's ``ema_update_``);
2. ``fastema._launch.cuda.launch.cached_launch_available()`` (False: every launch goes through numba's
   dispatcher, and every host time of the probe is the dispatcher's);
3. ``FlatShadow.update`` of 3 odd-sized tensors on the GPU equals the CPU kernel bit for bit;
4. an update under a side stream is ordered after that stream's writes;
5. ``FlatShadow.update(weight=tensor)`` captured in a CUDA graph and replayed twice;
6. the host returned from an update while the GPU was still busy (no hidden sync);
7. host us of a bound launch against numba's ``kernel[grid, block](...)`` and of the whole update;
   and (``2b``) which device code those launches loaded: the shipped cubin's architecture, "ptx" or
   "compiled", and how many variants were compiled at run time (0 expected: issue 54); (``2c``) every
   shipped variant loaded on the GPU, counted by what loaded (all "sm_90" expected on an H100).

    python3 -m bench.gpu.smoke OUTDIR [--simulate]

``--simulate`` (or ``NUMBA_ENABLE_CUDASIM=1``): the Numba CUDA simulator at tiny sizes; 4-6 are
recorded as skipped there (see ``bench/gpu_common.py``). Exit status 1 when a check failed.
"""
import os
import sys

if "--simulate" in sys.argv:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
from bench.gpu import checks as C  # noqa: E402
from bench.gpu import common as G  # noqa: E402


def main(argv) -> int:
    args = [a for a in argv if not a.startswith("--")]
    out = args[0] if args else os.environ.get("OUT", "smoke-out")
    os.makedirs(out, exist_ok=True)
    rec = G.Record(os.path.join(out, "smoke.json"), ["checks", "host"])
    rec.note("host", "mode", "simulator (tiny sizes)" if G.SIM else "gpu")
    C.small_launches_in_the_simulator()
    rec.check("1 compile and launch", C.compile_and_launch)

    def cached():
        from fastema._launch.cuda.launch import cached_launch_available
        rec.note("host", "2 cached_launch_available", cached_launch_available())

    rec.guarded("host", "2 cached_launch_available", cached)
    sizes = [7, 33, 65] if G.SIM else [7, 4097, 65541]
    rec.check("3 FlatShadow.update of 3 odd-sized float32 tensors == CPU kernel",
              C.lerp_case("float32", "float32", 1, "nearest", sizes=sizes))
    rec.check("4 stream order: update on a side stream after its writes", C.stream_case(False, n=1 << 16))
    rec.check("5 CUDA graph: FlatShadow.update(weight=tensor) captured, replayed twice",
              lambda: C.graph_case(sizes=(4097, 7, 1000), replays=(0.5, 0.25)))

    def busy():
        G.need_torch_cuda("a busy GPU")
        import torch

        from fastema.flat import FlatShadow
        flat = FlatShadow([torch.randn(4096, device="cuda") for _ in range(3)])
        return C.no_sync(lambda: flat.update(0.99))()

    rec.check("6 host returned while the GPU was busy (FlatShadow.update)", busy)

    def shipped():                                        # issue 54: what the launches above loaded
        from fastema._launch.cuda import device_code, drivers
        driver = drivers.current()
        sources = sorted({str(getattr(v, "source", None)) for v in driver.images.values()})
        shipped_for = "simulator" if G.SIM else device_code.choose(driver.version(), driver.compute_capability(0))
        rec.note("host", "2b device code loaded", {"sources": sources, "run-time compiles": len(device_code.COMPILES),
                                                   "shipped for": shipped_for,
                                                   "driver": driver.name,
                                                   "driver version": driver.version()})

    rec.guarded("host", "2b device code loaded", shipped)

    def every_variant():                                  # issue 54 item 7: every shipped variant loads here
        if G.SIM:
            return rec.note("host", "2c every variant loads", "simulator")
        import time

        from fastema._launch.cuda import device_code, drivers
        from fastema._launch.cuda.driver import Refused
        from fastema._launch.shipped.variants import every_variant as variants
        driver = drivers.current()
        t, cc, counts, refused = time.perf_counter(), driver.compute_capability(0), {}, []
        chosen = device_code.choose(driver.version(), cc)
        with driver.activate(0):                          # loaded, never compiled: no NVVM here
            for key, (dispatcher, _) in variants().items():
                found = device_code.entry(chosen[0][0], key, chosen[0][1], dispatcher) if chosen else None
                if found is None:
                    counts["not shipped"] = counts.get("not shipped", 0) + 1
                    continue
                arch = "/".join(chosen[0])
                try:
                    driver.load(found.kind, found.code, found.name)
                    counts[arch] = counts.get(arch, 0) + 1
                except Refused as err:                    # say which (anything else raises)
                    refused.append(f"{key[:60]}: {err}"[:200])
        rec.note("host", "2c every variant loads", {"loaded by architecture": counts, "refused": len(refused),
                                                    "first refused": refused[:3],
                                                    "seconds": round(time.perf_counter() - t, 2)})

    rec.guarded("host", "2c every variant loads", every_variant)
    rec.guarded("host", "7 launch host us", lambda: rec.note("host", "7 launch host us",
                                                             C.launch_costs(n=3 if G.SIM else 500)))
    checks = rec.data["checks"]
    skipped = sum(1 for v in checks.values() if v.get("ok") is None)
    nfailed = G.failed(checks)
    print(f"smoke: {len(checks) - nfailed - skipped} ok, {nfailed} failed, {skipped} skipped "
          f"({rec.elapsed():.1f} s); {os.path.join(out, 'smoke.json')}", flush=True)
    return 1 if nfailed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
