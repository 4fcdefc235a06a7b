"""What an offloaded EMA adds to a process's memory (issue 44): a 256 MiB float32 model offloaded through
16 MiB chunks adds its shadow, two chunks and little else (the model-sized staging copy and the two
model-sized host slots it had before: 514 MiB added). Measured in a fresh subprocess as anonymous resident
memory (RssAnon) after ``malloc_trim``, the kernels loaded and numba's threads started first."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, gc, json
    import torch
    from fastema.torch import EMA, Offload

    libc = ctypes.CDLL("libc.so.6")

    def rss_anon():
        gc.collect()
        libc.malloc_trim(0)
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    def bump(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)

    warm = torch.nn.Linear(512, 512)              # the same kernels, parallel, and numba's threads started
    ema = EMA(warm, 0.999, offload=Offload(chunk=256 << 10))
    for _ in range(3):
        bump(warm)
        ema.update()
    ema.join()
    del ema, warm
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(16)])   # 256 MiB
    before = rss_anon()
    ema = EMA(model, 0.999, offload=Offload(chunk=16 << 20))
    for _ in range(3):
        bump(model)
        ema.update()
    ema.join()
    added = rss_anon() - before
    print("REPORT " + json.dumps({"added": added, "nbytes": ema.nbytes, "parts": ema.memory(parts=True)}))
""")


@pytest.mark.slow
def test_a_256_mib_model_offloaded_through_16_mib_chunks_adds_its_shadow_two_chunks_and_little_else():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads([s for s in out.stdout.splitlines() if s.startswith("REPORT ")][-1][7:])
    mib = 1 << 20
    parts = report["parts"]["cpu"]
    assert parts["shadow"] == 256 * mib and parts["staging chunks"] == 2 * 16 * mib
    assert report["nbytes"] == sum(parts.values()) < 256 * mib + 32 * mib + mib          # + the tables
    assert report["added"] <= 256 * mib + 2 * 16 * mib + 40 * mib, report["added"] / mib
