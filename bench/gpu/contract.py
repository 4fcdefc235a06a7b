#!/usr/bin/env python3
"""The GPU contract, first on a GPU (part 1 of ``bash bench/gpu/run.sh all``, issue 78 item 8): what the
driver emulator holds fastema to in CI (``testkit/gpu_scenarios.py``), on the real driver:

1. ``EMA.update()``, an attached ``opt.step()``, ``TargetNetwork.update()``, ``Smoother.update()`` and the
   swap, each captured by ``torch.cuda.graph`` with a ``gc.collect()`` of another EMA's cycle inside the
   capture: not invalidated, and three replays leave what a twin's three eager calls leave, bit for bit;
2. a DataLoader worker (``fork``) collects the parent's fastema objects: no error;
3. a first swap, ``copy_to()`` and ``scan_nonfinite()`` inside a capture after a warm-up of ``update()``:
   fastema's refusal (naming the kernel and the warm-up), the capture still valid;
4. deferred frees issued while another thread captures, on a stream only it names: that capture valid;
5. the driver's capture rules (``testkit/driver_rules.py``, 504 cases) as the stored table has them (an
   H200's, what the emulator is held to): a driver that answers otherwise needs the emulator changed.

    python3 -m bench.gpu.contract OUTDIR [--simulate]

``OUTDIR/contract.json``: ``{"where": ..., "checks": {name: {"ok": ..., ...}}}``, written at the end (and
once before, saying where it runs). ``--simulate`` (CI: no GPU): the same Python on the driver emulator, in a
child process that loads it as its ``libcuda.so.1`` (``testkit.emulator``; recorded skipped where no C
compiler is). Exit status 1 when a scenario failed.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(out: str, data: dict) -> None:
    with open(os.path.join(out, "contract.json"), "w") as fh:
        json.dump(data, fh, indent=1)


def run_here(where_name: str) -> dict:
    """Every scenario in this process (``"gpu"``: CUDA tensors; ``"emulator"``: on the driver emulator)."""
    from testkit import driver_rules
    from testkit import gpu_scenarios as S

    where = S.OnGpu() if where_name == "gpu" else S.OnEmulator()
    checks = S.everything(where)
    try:
        checks["the driver's capture rules as stored"] = driver_rules.check()
    except Exception as err:                              # the check's outcome, never the run's
        checks["the driver's capture rules as stored"] = {"ok": False, "raised": f"{type(err).__name__}: {err}"}
    return checks


def _emulated(out: str) -> dict:
    """The scenarios in a child on the driver emulator (CI's run, where no GPU is)."""
    from testkit import emulator

    env = emulator.environ()
    if env is None:
        return {"skipped": {"ok": None, "skipped": "no C compiler for the driver emulator"}}
    env.pop("GPU_SIMULATE", None)
    done = subprocess.run([sys.executable, "-m", "bench.gpu.contract", out, "--emulated"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode not in (0, 1):
        return {"emulator": {"ok": False, "raised": done.stderr[-2000:]}}
    with open(os.path.join(out, "contract.json")) as fh:
        return json.load(fh)["checks"]


def main(argv) -> int:
    args = [a for a in argv if not a.startswith("--")]
    out = args[0] if args else os.environ.get("OUT", "contract-out")
    os.makedirs(out, exist_ok=True)
    simulate = "--simulate" in argv or os.environ.get("GPU_SIMULATE") == "1"
    where = "emulator" if ("--emulated" in argv or simulate) else "gpu"
    _write(out, {"where": where, "checks": {}})
    if simulate and "--emulated" not in argv:
        checks = _emulated(out)
    else:
        try:
            checks = run_here(where)
        except Exception as err:                          # the run's own failure, recorded
            checks = {"contract": {"ok": False, "raised": f"{type(err).__name__}: {err}"}}
    _write(out, {"where": where, "checks": checks})
    for name, got in checks.items():
        print(f"[contract] {name}: {'ok' if got.get('ok') else 'skipped' if got.get('ok') is None else 'FAILED'}"
              f"{'' if got.get('ok') else ' ' + json.dumps({k: v for k, v in got.items() if k != 'ok'})[:300]}",
              flush=True)
    return 1 if any(got.get("ok") is False for got in checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
