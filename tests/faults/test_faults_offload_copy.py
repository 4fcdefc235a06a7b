"""A Ctrl-C during an offloaded ``copy_to()`` (reliability L3): ``EMA(model, offload="cpu")`` writes
the average into the model window by window through its ring's slot 0; a SIGINT that arrives while
the third window is written is held until every window is in, then raised. The model holds the whole
average, bit for bit what a plain (not offloaded) EMA's ``copy_to()`` writes, never the average in
some windows and its own weights in the others.

Each case runs in a fresh Python (the SIGINT is sent to that process with ``os.kill``, as a Ctrl-C
in a terminal is), and reports back as JSON."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

CASE = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from torch import nn
    from fastema.torch import EMA, Offload
    from fastema.torch._placement import folds, offload_ring

    torch.set_num_threads(1)
    pipeline, through = sys.argv[1], sys.argv[2]
    staging = offload_ring.pipeline(host_slots=pipeline == "host slots")   # a GPU ring's pipeline, on the CPU
    staging.__enter__()                                # for every average of this process

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.BatchNorm1d(16))

    plain_model, off_model = model(), model()
    plain = EMA(plain_model, 0.9)
    off = EMA(off_model, 0.9, offload=Offload(chunk=1024))
    for step in range(5):                              # the same weights, the same updates
        for m in (plain_model, off_model):
            g = torch.Generator().manual_seed(step)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
        plain.update()
        off.update()
    raw = {k: v.clone() for k, v in off_model.state_dict().items()}
    plain.copy_to()
    average = {k: v.clone() for k, v in plain_model.state_dict().items()}

    written = [0]

    def writing(stage, run, *args):                    # a Ctrl-C while the third window is written
        if stage == "from slot":
            written[0] += 1
            if written[0] == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return run(*args)

    raised, written_then = None, None
    try:
        with folds.watched(writing):
            off.copy_to() if through == "copy_to" else off.swap()
    except KeyboardInterrupt:
        raised, written_then = "KeyboardInterrupt", written[0]
    now = off_model.state_dict()
    out = dict(raised=raised, written_then=written_then, windows=len(off._avg.src.windows),
               average=[k for k in now if torch.equal(now[k], average[k])],
               raw=[k for k in now if torch.equal(now[k], raw[k])],
               differ=[k for k in now if not torch.equal(average[k], raw[k])],
               names=list(now), swapped=bool(getattr(off, "swapped", False)))
    if through == "swap" and off.swapped:              # the way back is whole too
        off.swap()
        out["back"] = all(torch.equal(off_model.state_dict()[k], raw[k]) for k in raw)
    print("RESULT " + json.dumps(out))
""")


def _run(pipeline: str, through: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CASE, pipeline, through], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("pipeline", ["chunks", "host slots"])
def test_a_ctrl_c_during_an_offloaded_copy_to_is_raised_once_the_whole_average_is_in(pipeline):
    out = _run(pipeline, "copy_to")
    assert out["windows"] >= 5
    weights = [k for k in out["names"] if k.endswith(("weight", "bias"))]
    assert set(weights) <= set(out["differ"])          # a half-written model would show
    assert out["raised"] == "KeyboardInterrupt"        # the Ctrl-C is not lost...
    assert out["written_then"] == out["windows"]       # ...it is raised once every window is written
    assert out["average"] == out["names"]              # the whole model is the plain EMA's copy_to, bit for bit


def test_a_ctrl_c_during_an_offloaded_lossy_swap_in_leaves_the_whole_average_then_the_whole_raw_weights():
    """``swap()`` of an offloaded average writes it through the same copy (held by the swap too)."""
    out = _run("chunks", "swap")
    assert out["raised"] == "KeyboardInterrupt" and out["written_then"] == out["windows"]
    assert out["swapped"] and out["average"] == out["names"] and out["back"]
