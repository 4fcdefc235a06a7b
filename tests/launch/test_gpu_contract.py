"""The CUDA path held to the driver's contract on the driver emulator (issue 78 item 2;
``../shared/design/gpu_contract.md``, findings 1-6): fastema's real ``CudaCoreDriver`` and cuda-bindings' real
calls in a process that loaded ``testkit/emulator.c`` as its driver, which refuses what a driver refuses.

- frees (device memory, pinned blocks, events) run when the collector finds fastema's objects (its shadows are
  reference cycles), which may be inside a user's CUDA-graph capture (torch 2.13's ``torch.cuda.graph`` collects
  nothing first): they are deferred to a safe point, never issued while a stream fastema asks is capturing, and
  a pinned block is freed only after the copy from it has run;
- a forked child (a DataLoader worker) that collects the parent's objects makes no driver call; its launches
  (kept from before the fork too) are fastema's refusal naming ``spawn``, before any driver call; a child of a
  process that had not used CUDA uses it, and frees its own objects;
- a launch whose code is not loaded yet (a first swap, copy or scan), inside a capture, is refused by fastema
  before anything is loaded (fastema loads no code inside a capture);
- no event is queried while the current stream of another framework fastema made tables for captures, and
  no call names a stream destroyed after fastema launched on it (only current streams are asked);
- the legacy stream's capture query is asked in the group's device's context;
- an event is destroyed in its context (a finalizer on a thread with none).

One process runs every scenario (one torch import); each test reads its own scenario's outcome.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("a process on the driver emulator", allow_module_level=True)
pytest.importorskip("cuda.bindings.driver")
pytest.importorskip("cuda.core")
pytest.importorskip("torch")

from testkit import emulator  # noqa: E402

SCENARIOS = r'''
import contextlib, copy, gc, json, os, sys, threading, traceback
import numpy as np
import torch, fastema
from fastema._launch.cuda import drivers, memory  # noqa: F401  (memory: its arrays' finalizers)
from fastema._launch.cuda import tables as launch_tables
from fastema.torch import EMA
from testkit import graphs
from testkit.emulator import Emulator
from testkit.fake_gpu import fake_gpu, rl_mlp

e = Emulator()
torch.set_grad_enabled(False)
unraisable = []
sys.unraisablehook = lambda u: unraisable.append(f"{type(u.exc_value).__name__}: {u.exc_value}")
out = {}


def scenario(fn):
    before, errs = dict(e.counters()), len(unraisable)
    mark = e.refusal_mark()
    try:
        got = fn()
    except Exception as err:                       # the scenario's own outcome, reported, never the process's
        got = {"raised": f"{type(err).__name__}: {err}", "where": traceback.format_exc()[-1500:]}
    after = e.counters()
    got["delta"] = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    got["unraisable"] = unraisable[errs:]
    got["refused"] = e.refusals(mark)
    out[fn.__name__] = got
    gc.collect()
    return fn


def cycle():
    """An EMA left as garbage, a reference cycle the collector has not found yet."""
    model = rl_mlp(hidden=16, seed=1)
    other = EMA(model, 0.99)
    other.update()
    del other, model


def in_child(fn) -> dict:
    """``fn()`` in a forked child: its outcome, or what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            got = fn()
        except BaseException as err:
            got = {"raised": f"{type(err).__name__}: {err}", "where": traceback.format_exc()[-1500:]}
        os.write(w, json.dumps(got).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    return json.loads(os.read(r, 1 << 20).decode())


@scenario
def child_of_a_process_without_cuda_frees_its_own():
    """The first scenario (nothing has used CUDA here): a forked worker uses it, and frees its own objects."""
    def child():
        gc.collect(); gc.disable()
        before = dict(e.counters())
        with fake_gpu(stub_driver=True):
            cycle()
            gc.collect()
            fastema.clear_caches()                     # a safe point
        return {k: e[k] - before[k] for k in ("device_frees", "host_frees", "forked_calls")}
    return in_child(child)


@scenario
def frees_during_a_capture():
    """A collection inside a capture of EMA.update(): nothing freed then, everything at the next safe point."""
    gc.collect(); gc.disable()
    with fake_gpu(stub_driver=True):
        model = rl_mlp(hidden=16)
        ema = EMA(model, 0.99)
        ema.update()
        cycle()
        frees = e.calls("cuMemFree"), e.calls("cuMemFreeHost")
        g = graphs.CUDAGraph()
        with graphs.graph(g):
            ema.update()
            collected = gc.collect()
        in_capture = e.calls("cuMemFree") - frees[0], e.calls("cuMemFreeHost") - frees[1]
        ema.update()                                   # a launch on a stream not capturing: the safe point
        after = e.calls("cuMemFree") - frees[0], e.calls("cuMemFreeHost") - frees[1]
    gc.enable()
    return {"collected": collected > 0, "in_capture": in_capture, "after": after}


@scenario
def pinned_freed_after_its_copy():
    """A staging slot (pinned) freed while the copy from it is still queued: its event waited for first."""
    e.progress = 0                                     # nothing completes unless waited for
    try:
        with fake_gpu(stub_driver=True):
            model = rl_mlp(hidden=16, seed=2)
            ema = EMA(model, 0.99)
            ema.update()
            p = next(model.parameters())
            p.data = p.data.clone()                    # a source moved: its table rewritten from a pinned slot
            ema.update()
            pending = e.pending(77)
            del ema, model, p
            gc.collect()
            keep = EMA(rl_mlp(hidden=16, seed=3), 0.99)  # a safe point (an upload, a launch)
            keep.update()
    finally:
        e.progress = 1
    return {"pending": pending > 0}


@scenario
def forked_child_collects():
    """A forked child (a DataLoader worker) collects the parent's EMA: no driver call, no error."""
    gc.collect(); gc.disable()
    with fake_gpu(stub_driver=True):
        cycle()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            seen = []
            sys.unraisablehook = lambda u: seen.append(repr(u.exc_value))
            before = e["forked_calls"]
            gc.collect()
            os.write(w, json.dumps([e["forked_calls"] - before, seen]).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = json.loads(os.read(r, 100000).decode())
        gc.collect()
    gc.enable()
    return {"child_calls": child[0], "child_errors": child[1][:3]}


@scenario
def forked_child_launches():
    """A child forked after CUDA use: every launch, kept from before the fork too, is fastema's refusal before
    any driver call."""
    gc.collect(); gc.disable()
    with fake_gpu(stub_driver=True):
        model = rl_mlp(hidden=16, seed=5)
        ema = EMA(model, 0.99)
        target = fastema.torch.TargetNetwork(model, copy.deepcopy(model).requires_grad_(False), tau=0.005)
        s, x = torch.zeros(64), torch.ones(64)
        for _ in range(2):
            ema.update(); target.update(); fastema.ema_update_(s, x, 0.5)
        first = next(model.parameters())

        def moved():                                   # a source moved: its table rewritten, then the launch
            first.data = first.data.clone()
            ema.update()
        calls = {"EMA.update": ema.update, "TargetNetwork.update": target.update,
                 "ema_update_": lambda: fastema.ema_update_(s, x, 0.5), "EMA.update, a source moved": moved}

        def child():
            before, said = e["forked_calls"], {}
            for name, call in calls.items():
                try:
                    call()
                    said[name] = None
                except RuntimeError as err:
                    said[name] = str(err)
            return {"said": said, "driver_calls": e["forked_calls"] - before, "updates": ema.updates}
        got = in_child(child)
        del ema, target, model
    gc.enable()
    return got


def first_use(name, warm, call):
    def run():
        with fake_gpu(stub_driver=True):
            model = rl_mlp(hidden=16, seed=4)
            thing = warm(model)
            loads = e.calls("cuLibraryLoadData")
            g = graphs.CUDAGraph()
            said = None
            try:
                with graphs.graph(g):
                    call(thing)
            except Exception as err:
                said = f"{type(err).__name__}: {err}"
            return {"said": said, "loads_in_capture": e.calls("cuLibraryLoadData") - loads}
    run.__name__ = name
    return run


def _ema(model):
    ema = EMA(model, 0.99)
    ema.update()
    return ema


def _flat(model):
    flat = fastema.FlatShadow(list(model.parameters()))
    flat.update(0.9)
    return flat


def _swap(ema):
    with ema.average_parameters():
        pass


scenario(first_use("first_swap_in_a_capture", _ema, _swap))
scenario(first_use("first_copy_to_in_a_capture", _ema, lambda ema: ema.copy_to()))
scenario(first_use("first_scan_in_a_capture", _flat, lambda flat: flat.scan_nonfinite()))


@scenario
def query_while_another_stream_captures():
    """A launch on stream 77 with a retired source waiting for its event, while stream 99 (the current stream of
    another framework fastema made tables for) captures in global mode: the event is not queried, the capture
    stays valid."""
    d = drivers.CudaCoreDriver()
    with drivers.using(d), d.device(0):
        getter = lambda: 99                            # noqa: E731 - a framework's: its current stream is 99
        d.watch("cuda:0", getter)                      # (held weakly: kept alive here, as a shadow's group does)
        held = launch_tables.Retired(at_launches=True)
        held.release(object(), "cuda:0", 77)           # an event recorded on 77, not passed yet
        e.progress = 0
        queries = e.calls("cuEventQuery")
        g = graphs.CUDAGraph()
        with graphs.graph(g, stream=99):
            launch_tables.prune_retired(d, 77)
        e.progress = 1
        got = {"queries": e.calls("cuEventQuery") - queries, "still_held": len(held.pending)}
        del getter
        return got


@scenario
def destroyed_stream_never_asked():
    """fastema launched on a stream (a CuPy stream in a ``with`` block) that is destroyed after the block; then a
    collection and a new shadow (an upload: deferred frees wait until no stream captures): no call names the
    destroyed stream (an H200 crashed in ``cuStreamIsCapturing`` of one CuPy had destroyed)."""
    from fastema import _backends
    gc.collect(); gc.disable()
    current = [77]
    with fake_gpu(stub_driver=True), _backends.streams_from(lambda fw, dev: lambda: current[0]):
        ema = EMA(rl_mlp(hidden=16, seed=6), 0.99)
        drv = launch_tables.current().real                     # the fake GPU's CudaCoreDriver on the emulator
        with drv.device(0):
            s = int(drv.d.cuStreamCreate(1)[1])
        current[0] = s
        ema.update()                                   # a launch on s
        current[0] = 77                                # the block left...
        with drv.device(0):
            drv.d.cuStreamDestroy(drv.d.CUstream(s))   # ...and its stream destroyed
        cycle()
        gc.collect()                                   # frees deferred
        before = e["dead_stream_calls"], e["device_frees"]
        EMA(rl_mlp(hidden=16, seed=7), 0.99).update()  # an upload: the deferred frees issued
        fastema.clear_caches()
        got = {"dead": e["dead_stream_calls"] - before[0], "freed": e["device_frees"] - before[1]}
    gc.enable()
    return got


@scenario
def reader_left_naming_a_destroyed_stream():
    """A test's stream reader left with its stream s current, s destroyed after the block, the shadows made in
    the block collected: the reader is no longer watched, so a later clear_caches() and upload never name s."""
    from fastema import _backends
    gc.collect(); gc.disable()
    with fake_gpu(stub_driver=True):
        drv = launch_tables.current().real
        with drv.device(0):
            s = int(drv.d.cuStreamCreate(1)[1])
        with _backends.streams_from(lambda fw, dev: lambda: s):
            ema = EMA(rl_mlp(hidden=16, seed=8), 0.99)
            ema.update()
        del ema
        gc.collect()                                   # the shadow (a cycle) and its groups gone: frees deferred
        with drv.device(0):
            drv.d.cuStreamDestroy(drv.d.CUstream(s))
        before = e["dead_stream_calls"], e["device_frees"]
        fastema.clear_caches()
        EMA(rl_mlp(hidden=16, seed=9), 0.99).update()
        got = {"dead": e["dead_stream_calls"] - before[0], "freed": e["device_frees"] - before[1]}
    gc.enable()
    return got


@scenario
def legacy_stream_asked_in_the_groups_context():
    """Device 1's context current (torch.cuda.set_device(1)); a blocking stream of device 0 captures: the
    legacy stream of cuda:0 cannot take work, and fastema's query for it says so."""
    d = drivers.CudaCoreDriver()
    with drivers.using(d), d.device(0):
        s = d.d.cuStreamCreate(0)[1]                   # blocking
        g = graphs.CUDAGraph()
        with graphs.graph(g, stream=int(s)), d.device(1):
            return {"cuda:0": launch_tables.capturing("cuda:0", 0), "cuda:1": launch_tables.capturing("cuda:1", 0)}


@scenario
def event_destroyed_on_a_bare_thread():
    """An event made in device 0's context, collected, and its destroy issued, on a thread where no context is
    current (counted here: the calls before it, of earlier scenarios, are not this one's)."""
    d = drivers.CudaCoreDriver()
    with d.device(0):
        holder = [d.event()]
    before = e.calls("cuEventDestroy")
    t = threading.Thread(target=lambda: (holder.clear(), gc.collect(), launch_tables.free_pending()))
    t.start(); t.join()
    return {"destroyed": e.calls("cuEventDestroy") - before}


from testkit import gpu_scenarios                       # issue 78 item 3: what a GPU run checks first
out["gpu_scenarios"] = gpu_scenarios.everything(gpu_scenarios.OnEmulator())
print("RESULTS " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def outcome() -> dict:
    if emulator.library_dir() is None:
        pytest.skip("no C compiler for the driver emulator")
    done = emulator.run(textwrap.dedent(SCENARIOS))
    assert done.returncode == 0, done.stderr[-4000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULTS ")]
    assert line, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(line[0][len("RESULTS "):])


def _clean(got: dict) -> None:
    """No error, no call refused, no error printed by a finalizer."""
    assert "raised" not in got, got.get("where")
    assert not got["unraisable"], got["unraisable"]
    assert not got["refused"], got["refused"]


def test_no_free_is_issued_inside_a_capture_and_every_free_is_issued_after_it(outcome):
    got = outcome["frees_during_a_capture"]
    _clean(got)
    assert got["collected"] and got["in_capture"] == [0, 0], got
    assert got["after"][0] >= 5 and got["after"][1] >= 4, got             # 5 tables, 4 pinned slots
    assert "invalidations" not in got["delta"], got


def test_a_pinned_block_is_freed_after_the_copy_from_it_has_run(outcome):
    got = outcome["pinned_freed_after_its_copy"]
    _clean(got)
    assert got["pending"], got                         # the copy was still queued when the slot went
    assert got["delta"].get("host_frees", 0) >= 4 and "unfinished_frees" not in got["delta"], got


def test_a_forked_child_makes_no_driver_call_when_it_collects(outcome):
    got = outcome["forked_child_collects"]
    _clean(got)
    assert got["child_calls"] == 0 and not got["child_errors"], got


def test_a_child_of_a_process_that_had_not_used_cuda_frees_its_own_objects(outcome):
    got = outcome["child_of_a_process_without_cuda_frees_its_own"]
    _clean(got)
    assert got["device_frees"] >= 5 and got["host_frees"] >= 4 and got["forked_calls"] == 0, got   # as a parent's


def test_every_launch_in_a_child_forked_after_cuda_is_refused_before_any_driver_call(outcome):
    got = outcome["forked_child_launches"]
    _clean(got)
    said = got["said"]
    assert set(said) == {"EMA.update", "TargetNetwork.update", "ema_update_", "EMA.update, a source moved"}, got
    for name, message in said.items():
        assert message and "forked" in message and "'spawn'" in message, (name, message)
    assert got["driver_calls"] == 0 and got["updates"] == 2, got


@pytest.mark.parametrize("name,entry", [("first_swap_in_a_capture", "average_parameters"),
                                        ("first_copy_to_in_a_capture", "copy"),
                                        ("first_scan_in_a_capture", "nonfinite")])
def test_a_first_launch_in_a_capture_is_refused_before_any_load(outcome, name, entry):
    got = outcome[name]
    assert "raised" not in got, got.get("where")
    assert got["loads_in_capture"] == 0 and not got["refused"], got
    said = got["said"] or ""
    assert said.startswith("RuntimeError: fastema:") and "captur" in said and entry in said, said
    assert "warm-up" in said, said
    assert "invalidations" not in got["delta"], got


def test_no_event_is_queried_while_another_frameworks_current_stream_captures(outcome):
    got = outcome["query_while_another_stream_captures"]
    _clean(got)
    assert got["queries"] == 0 and got["still_held"] == 1, got


def test_a_stream_destroyed_after_fastema_launched_on_it_is_never_asked_about(outcome):
    got = outcome["destroyed_stream_never_asked"]
    _clean(got)
    assert got["dead"] == 0 and got["freed"] >= 5, got


def test_a_readers_getter_is_not_asked_once_nothing_uses_it(outcome):
    got = outcome["reader_left_naming_a_destroyed_stream"]
    _clean(got)
    assert got["dead"] == 0 and got["freed"] >= 5, got


def test_the_legacy_streams_capture_is_asked_of_the_groups_device(outcome):
    got = outcome["legacy_stream_asked_in_the_groups_context"]
    _clean(got)
    assert got["cuda:0"] is True and got["cuda:1"] is False, got


def test_an_event_is_destroyed_in_its_context_on_a_thread_with_none(outcome):
    got = outcome["event_destroyed_on_a_bare_thread"]
    _clean(got)
    assert got["destroyed"] >= 1 and "no_context" not in got["delta"], got


# ---------------------------------------------------------------- CUDA graphs on the emulator (issue 78 item 3)

_GPU_SCENARIOS = [f"capture {name} with a collection inside" for name in (
    "EMA.update()", "attached opt.step()", "TargetNetwork.update()", "Smoother.update()",
    "swap (average_parameters in and out)")] + ["forked DataLoader worker collects"] + [
    f"first {name} in a capture after a warm-up" for name in ("swap", "copy_to()", "scan_nonfinite()")] + [
    "deferred frees while another thread captures on a stream only it names"]


@pytest.mark.parametrize("name", _GPU_SCENARIOS)
def test_what_a_gpu_run_checks_first_holds_on_the_emulator(outcome, name):
    """``testkit.gpu_scenarios`` (what a GPU run checks first): each capture is not
    invalidated by a collection inside it and its replay's launches equal the eager call's (kernel, grid,
    block, parameter bytes); a forked worker's collection makes no driver call; a first bind inside a capture
    is fastema's refusal, the capture still valid."""
    got = outcome["gpu_scenarios"]
    assert set(got) == set(_GPU_SCENARIOS), sorted(got)
    assert got[name]["ok"], got[name]
    if name.startswith("capture"):
        assert got[name]["launches"] >= 1, got[name]
