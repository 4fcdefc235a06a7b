"""Faults on the offload pipeline (``EMA(model, offload="cpu")``): a fold that fails on the worker
thread, and the worker's kernels running beside the training thread's. Whatever fails, the user
keeps what they had: the model's weights, and an average and counters equal to those of an EMA
that never saw the lost updates."""
import os
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import torch
from models import mlp
from support import faults
from torch import nn

from fastema.schedules import PowerWarmup
from fastema.torch import EMA, Offload
from fastema.torch._placement import folds as _folds
from fastema.torch._placement import offload_ring as _offload_ring


def _model():
    return mlp(8, 16, 4, norm=nn.BatchNorm1d, dtype=torch.float32, seed=0)


def _step(model, opt, i):
    g = torch.Generator().manual_seed(i)
    model(torch.randn(6, 8, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _same(a: EMA, b: EMA, parts=("averaged", "copied", "int_buffers")) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k][n], sb[k][n]) for k in parts for n in sa[k]) \
        and (sa["calls"], sa["updates"], sa["norms"], sa["last_time"]) == \
        (sb["calls"], sb["updates"], sb["norms"], sb["last_time"])


# Right after a lost fold, the averages and the counters are those of the last fold that finished;
# the buffers copied from the model (BatchNorm's count here) keep the lost call's values, the
# model's latest, until the next update copies them again.
AVERAGES = ("averaged",)


@pytest.fixture(params=["chunks", "host slots"])
def pipeline(request):
    """The CPU ring's pipeline: its chunks are what the worker folds (what the CPU gets), or they are
    copied into two host slots in turn first (what a GPU's ring does, run on the CPU)."""
    with _offload_ring.pipeline(host_slots=request.param == "host slots"):
        yield request.param


@pytest.fixture
def fail_fold():
    """``fail_fold(n)``: the fold of the update with schedule step ``n`` raises MemoryError on the
    worker thread, once (standing in for an allocation or CUDA error there), as soon as
    ``fail_fold.release`` is set (60 s at most): the test says when the error may be seen."""
    targets = set()

    def maybe_fail(stage, run, *args):
        step = args[-1]
        if stage == "fold" and step in targets:
            targets.discard(step)
            fail.release.wait(60)
            raise MemoryError(f"injected: the host fold of update {step} ran out of memory")
        return run(*args)

    def fail(step: int) -> None:
        targets.add(step)

    fail.release = threading.Event()    # type: ignore[attr-defined]
    with _folds.watched(maybe_fail):
        yield fail
        fail.release.set()              # a failed test leaves no fold held


# The pipeline, update_every, the update whose fold fails, where its error surfaces (a read after
# that call, or an update() call), and the calls the offloaded EMA loses (the failed one and every
# one until the error surfaced, skipped calls included): the reference EMA never makes them. The
# failing fold ends when the call where it surfaces begins. This model is one window: update k packs
# into chunk k % 2, so the next update packs into the other chunk and goes on; the one after reuses
# the failed fold's chunk, so it waits for that fold and raises (both pipelines alike).
CASES = [(name, *case) for name in ("chunks", "host slots") for case in (
    (1, 4, ("join", 4), {4}),
    (1, 4, ("update", 6), {4, 5, 6}),
    (2, 3, ("join", 5), {5}),
    (2, 3, ("update", 9), {5, 6, 7, 8, 9}),
)]


@pytest.mark.parametrize("name, every, failing, surfaces, lost", CASES)
def test_a_fold_lost_on_the_worker_is_not_counted_and_the_ema_goes_on_as_one_that_skipped_it(
        name, every, failing, surfaces, lost, fail_fold, request):
    faults.held(request, _offload_ring.pipeline(host_slots=name == "host slots"))
    model = _model()
    decays = [PowerWarmup(0.9), PowerWarmup(0.5)]
    kw = dict(update_every=every, buffers="average", debias=False)
    off, ref = EMA(model, decays, offload="cpu", **kw), EMA(model, decays, **kw)
    assert [r.through_host for r in off._avg._ring_of.values()] == [name == "host slots"]
    assert len(off._avg.src.windows) == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fail_fold(failing)
    for call in range(1, 12):
        if call == surfaces[1]:
            fail_fold.release.set()
        _step(model, opt, call)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        if surfaces == ("update", call):
            with pytest.raises(MemoryError, match=f"injected: the host fold of update {failing}"):
                off.update()
            assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
            assert _same(off, ref, AVERAGES)                # as the EMA that never made the lost calls
        else:
            off.update()
        if call not in lost:
            ref.update()
        if surfaces == ("join", call):
            with pytest.raises(MemoryError, match=f"injected: the host fold of update {failing}"):
                off.join()
            off.join()                                      # raised once
            assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
            assert (off.calls, off.updates) == (ref.calls, ref.updates)
            assert _same(off, ref, AVERAGES)
    assert _same(off, ref)                                  # bit for bit, the warm-up weights included
    for row in (0, 1):
        a, b = off.averaged_state_dict(row), ref.averaged_state_dict(row)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lost_fold_while_swapped_evaluation_and_the_swap_back_restore_the_raw_weights(fail_fold, pipeline):
    model = _model()
    off, ref = EMA(model, 0.9, offload="cpu"), EMA(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in range(1, 4):
        _step(model, opt, call)
        off.update()
        ref.update()
    fail_fold(4)
    fail_fold.release.set()
    _step(model, opt, 4)
    off.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryError, match="injected"):
        with off.average_parameters():                     # the swap reads the shadow: raises first
            pass
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert not off.swapped and _same(off, ref, AVERAGES)
    with off.average_parameters():
        want = ref.averaged_state_dict()
        assert all(torch.equal(p, want[k]) for k, p in model.named_parameters())
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


# numba's workqueue threading layer kills the process when two threads launch parallel kernels at
# once: the offload worker's fold beside the training thread's launches (here another EMA's update).
WORKQUEUE = textwrap.dedent("""
    import numba, torch
    from torch import nn
    from fastema._launch import config
    from fastema.torch import EMA

    parallel = config.tuned(CPU_SERIAL_BELOW=0, CPU_CHUNK=4096)   # parallel kernels for this small
    parallel.__enter__()                  # model, for the whole process (held: never closed)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 384))
    off, ref = EMA(m, 0.9, offload="cpu"), EMA(m, 0.9)
    for i in range(150):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)
        off.update()
        ref.update()
    a, b = off.averaged_state_dict(), ref.averaged_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    print("layer", numba.threading_layer())
""")


def test_offload_beside_other_parallel_launches_survives_the_workqueue_layer():
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    out = subprocess.run([sys.executable, "-c", WORKQUEUE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert "layer workqueue" in out.stdout


@pytest.fixture
def default_sigint():
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("where", ["training thread, packing", "worker, folding, update() waiting",
                                   "worker, folding, join() waiting"])
@pytest.mark.parametrize("in_place", [True, False])
def test_a_ctrl_c_during_an_update_lets_the_whole_update_land_never_half_of_it(where, in_place, request):
    # A Ctrl-C (SIGINT: Python raises it in the main thread) at any point of an offloaded update: while
    # the training thread stages the windows it is held until every window is staged and the update
    # counted, then raised; the worker's folds are never interrupted. Either way the average ends as
    # the synchronous EMA's that made the update, never with some windows folded and others not.
    import signal

    faults.held(request, _offload_ring.pipeline(in_place=in_place))
    model = _model()
    off, ref = EMA(model, [0.9, 0.5], offload=Offload(chunk=64)), EMA(model, [0.9, 0.5])
    assert len(off._avg.src.windows) >= 6
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in range(1, 3):
        _step(model, opt, call)
        off.update()
        ref.update()
    sent = threading.Event()

    def ctrl_c_once():
        if not sent.is_set():
            sent.set()
            signal.raise_signal(signal.SIGINT)

    last = len(off._avg.src.windows) - 1
    if where.startswith("training"):
        def packing(stage, run, *args):
            if stage == "pack" and args[0] == last - 1:
                ctrl_c_once()
            return run(*args)

        faults.held(request, _folds.watched(packing))
    else:
        def folding(stage, run, *args):
            if stage == "fold window" and args[0] == (last if "join" in where else 2):   # the last window is
                if "join" in where:                     # folded after update() returns
                    time.sleep(0.2)                     # and join() waits
                ctrl_c_once()
            return run(*args)

        faults.held(request, _folds.watched(folding))
    _step(model, opt, 3)
    ref.update()
    with pytest.raises(KeyboardInterrupt):
        off.update()
        off.join()
        time.sleep(1)                                   # (a regression that delivers it late raises here)
    assert sent.is_set()
    off.join()                                          # the folds went on: the whole update landed
    assert (off.calls, off.updates) == (ref.calls, ref.updates) == (3, 3)
    assert _same(off, ref)
    _step(model, opt, 4)
    off.update()
    ref.update()
    assert _same(off, ref)


@pytest.mark.usefixtures("default_sigint")
def test_a_ctrl_c_held_through_an_offloaded_update_still_records_deepspeeds_step_as_folded(request):
    # With a DeepSpeed engine an update folds once per optimizer step (fastema.torch._sharding.masters.Steps).
    # A Ctrl-C held through the offloaded update is raised when the hold ends: the step must be
    # recorded as folded by then, or an update() called again before the next optimizer step (a
    # notebook, a trainer that saves on Ctrl-C) folds the same weights a second time.
    import signal

    from fastema.torch._sharding.masters import Steps

    model = _model()
    off = EMA(model, 0.9, offload=Offload(chunk=64))
    engine = types.SimpleNamespace(global_steps=0)
    off._steps = Steps(engine)                         # the engine's step counter, as EMA(engine) keeps it
    sent = threading.Event()

    def packing(stage, run, *args):
        if stage == "pack" and not sent.is_set():
            sent.set()
            signal.raise_signal(signal.SIGINT)
        return run(*args)

    faults.held(request, _folds.watched(packing))
    engine.global_steps = 1
    with pytest.raises(KeyboardInterrupt):
        off.update()
    off.join()
    assert off.updates == 1
    off.update()                                       # no optimizer step since: nothing to fold
    off.join()
    assert off.updates == 1
