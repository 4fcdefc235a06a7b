"""EMA(model, offload="cpu"): the shadow in host memory, fed through a ring of two staging chunks and
folded on a worker thread while training goes on. On the CPU the chunks are what the worker folds, and
all windows but the last two are folded from the weights in place while update() waits; the tests also
run the CPU ring with every window through the chunks, and a GPU ring's pipeline on the CPU (the chunks
copied into two host slots in turn, as the device-to-host copies land in pinned slots). Every pipeline
and every chunk size must equal the synchronous EMA bit for bit."""
import threading
import time

import pytest
import torch
from models import mlp
from support import faults
from torch import nn

from fastema.schedules import BEMA, NumUpdates, PowerFunction, PowerWarmup
from fastema.torch import EMA, Offload
from fastema.torch._placement import folds as _folds
from fastema.torch._placement import offload_ring as _offload_ring

#: a ring's pipeline, by the tests' name for it: (its chunks copied into two host slots first, as a GPU's
#: are; the CPU ring's windows but its last two folded in place)
PIPELINES = {"in place": (False, True), "chunks": (False, False), "host slots": (True, True)}


def use(request, name: str) -> None:
    """The offloaded EMAs made in the rest of the test use the pipeline ``name`` for their CPU ring."""
    two_slots, in_place = PIPELINES[name]
    faults.held(request, _offload_ring.pipeline(host_slots=two_slots, in_place=in_place))


@pytest.fixture(params=list(PIPELINES))
def pipeline(request):
    """The offloaded EMAs made in the test use this pipeline for their CPU ring."""
    use(request, request.param)
    return request.param


def _model(dtype=torch.float32, seed=0):
    return mlp(8, 16, 4, norm=nn.BatchNorm1d, dtype=dtype, seed=seed)


def _step(model, opt, i, dtype):
    g = torch.Generator().manual_seed(i)
    model(torch.randn(6, 8, generator=g).to(dtype)).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


def _equal(a: EMA, b: EMA) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k][n], sb[k][n]) for k in ("averaged", "copied", "int_buffers") for n in sa[k]) \
        and (sa["calls"], sa["updates"]) == (sb["calls"], sb["updates"])


def _bump(model, i):
    """Very different weights at every step: a chunk or slot read after it was overwritten shows."""
    with torch.no_grad():
        for j, p in enumerate(model.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * i + j)).to(p.dtype)
                    * 10 ** (i % 3))


@pytest.fixture
def slow_worker():
    """Every window's fold first sleeps: the training thread runs ahead as far as the chunks allow."""
    threads = set()

    def slow(stage, run, *args):
        if stage == "fold window":
            threads.add(threading.current_thread().name)
            time.sleep(0.002)
        return run(*args)

    with _folds.watched(slow):
        yield threads


#: chunk sizes: smaller than most tensors (16 and 100 bytes), a few tensors a chunk, larger than the model
CHUNKS = [16, 100, 512, 1 << 20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_offloaded_equals_synchronous_bit_for_bit(dtype, every, chunk, pipeline, slow_worker):
    model = _model(dtype, seed=every)
    kw = dict(update_every=every, compensate=True, buffers="average")
    decays = [PowerWarmup(0.9), PowerWarmup(0.5)]
    sync, off = EMA(model, decays, **kw), EMA(model, decays, offload=Offload(chunk=chunk), **kw)
    shadow = off._avg
    assert [r.through_host for r in shadow._ring_of.values()] == [pipeline == "host slots"]
    assert (len(shadow.src.windows) > 4) == (chunk <= 100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(7):
        _step(model, opt, 10 * every + i, dtype)
        sync.update()
        off.update()
    assert slow_worker == {"fastema-offload_0"}         # the folds ran on the worker thread
    assert _equal(sync, off)                            # state_dict() waited for the pending folds
    for row in (0, 1):
        a, b = sync.averaged_state_dict(row), off.averaged_state_dict(row)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shadow_dtype, rounding", [("float32", "nearest"), ("bfloat16", "stochastic"),
                                                    ("same", "nearest")])
def test_bfloat16_weights_into_every_shadow_dtype_and_stochastic_rounding(shadow_dtype, rounding, pipeline):
    # two (device, dtype) groups (float32 and bfloat16) share the ring; stochastic rounding draws each
    # element's noise by its place in the whole group, as the synchronous shadow does
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 40), "b": nn.Linear(40, 24).bfloat16(), "c": nn.Linear(24, 3)})
    kw = dict(shadow_dtype=shadow_dtype, rounding=rounding, seed=7)
    sync, off = EMA(model, [0.99, 0.7], **kw), EMA(model, [0.99, 0.7], offload=Offload(chunk=96), **kw)
    assert len(off._avg.src.layout.groups) == 2 and len(off._avg.src.windows) > 10
    for i in range(6):
        _bump(model, i)
        sync.update()
        off.update()
    assert _equal(sync, off)


def test_one_tensor_over_many_chunks_and_thousands_of_tiny_tensors_in_one():
    torch.manual_seed(0)
    big = nn.Linear(256, 300)                           # 77100 weights, 1 KiB chunks: 302 windows
    tiny = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(3000)])   # 3000 tensors, one chunk
    for model, chunk, windows in ((big, 1024, 302), (tiny, 64 << 10, 1)):
        sync, off = EMA(model, 0.9), EMA(model, 0.9, offload=Offload(chunk=chunk))
        assert len(off._avg.src.windows) == windows
        for i in range(4):
            _bump(model, i)
            sync.update()
            off.update()
        assert _equal(sync, off)


class Trace(list):
    """What the pipeline did, in order: ("pack", window) on the training thread, ("fold", window) on
    the worker once that window's fold is done. The folds of the windows in ``hold`` wait for
    ``gate`` first (60 s at most: only a regression waits that long)."""

    def __init__(self):
        super().__init__()
        self.gate, self.hold = threading.Event(), set()

    def at(self, what, window, nth=0) -> int:
        return [i for i, e in enumerate(self) if e == (what, window)][nth]


@pytest.fixture
def trace():
    log = Trace()

    def traced(stage, run, *args):
        if stage == "fold window" and args[0] in log.hold:
            log.gate.wait(60)
        got = run(*args)
        if stage in ("pack", "fold window"):
            log.append((stage.split()[0], args[0]))
        return got

    with _folds.watched(traced):
        yield log
        log.gate.set()                                  # a failed test leaves no fold held


@pytest.mark.parametrize("name", ["chunks", "host slots"])
def test_a_chunk_is_packed_again_only_after_the_fold_that_read_it_and_the_next_pack_overlaps(name, request,
                                                                                              trace):
    # Window k goes into chunk k % 2: with the fold of window 0 held, the training thread still packs
    # window 1 (into the other chunk), and packs window 2 only once window 0's fold has read chunk 0.
    use(request, name)
    model = _model()
    sync, off = EMA(model, 0.5), EMA(model, 0.5, offload=Offload(chunk=64))
    windows = len(off._avg.src.windows)
    assert windows >= 6
    trace.clear()
    trace.hold.add(0)
    _bump(model, 1)
    timer = threading.Timer(0.2, trace.gate.set)
    timer.start()
    sync.update()
    off.update()
    timer.join()
    assert trace.at("pack", 1) < trace.at("fold", 0) < trace.at("pack", 2)
    for k in range(2, windows):                        # every pack waits for the fold two windows back
        assert trace.at("fold", k - 2) < trace.at("pack", k)
    assert _equal(sync, off)


def test_in_place_the_windows_but_the_last_two_are_folded_from_the_weights_before_update_returns(trace):
    # On the CPU the weights are host memory: while update() waits, the worker folds them where they are;
    # only the last two windows, folded after it returns, are packed into the chunks
    model = _model()
    sync, off = EMA(model, 0.5), EMA(model, 0.5, offload=Offload(chunk=64))
    last = len(off._avg.src.windows) - 1
    trace.clear()
    trace.hold.update({last - 1, last})
    for i in range(3):
        _bump(model, i)
        sync.update()
        off.update()
        assert [e for e in trace if e[0] == "pack"] == [("pack", last - 1), ("pack", last)] * (i + 1)
        assert all(trace.count(("fold", k)) == i + 1 for k in range(last - 1))   # every window in place: done
        trace.gate.set()
        off.join()
        trace.gate.clear()
    assert _equal(sync, off)


def test_update_returns_before_the_last_two_windows_are_folded(pipeline, trace):
    model = _model()
    sync, off = EMA(model, 0.5), EMA(model, 0.5, offload=Offload(chunk=64))
    last = len(off._avg.src.windows) - 1
    trace.clear()
    trace.hold.update({last - 1, last})
    _bump(model, 1)
    sync.update()
    off.update()                                        # returns: every window staged, two folds held
    assert ("pack", last) in trace and ("fold", last - 1) not in trace and ("fold", last) not in trace
    trace.gate.set()
    assert _equal(sync, off)


def test_swap_copy_to_and_export_wait_and_match_the_synchronous_ema(tmp_path, pipeline):
    model = _model(torch.bfloat16)
    sync, off = EMA(model, 0.9), EMA(model, 0.9, offload=Offload(chunk=128))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 8).bfloat16()
    for rnd in range(3):                                # evaluations between training rounds
        model.train()
        for i in range(3):
            _step(model, opt, 10 * rnd + i, torch.bfloat16)
            sync.update()
            off.update()
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        model.eval()
        with sync.average_parameters():
            want = model(x)
        with off.average_parameters():
            got = model(x)
        assert torch.equal(got, want)
        assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())   # raw weights back, bit for bit
    assert type(off._swapper.backup).__name__ == "HostBackup"  # raw weights waited in host memory
    off.save(tmp_path / "ema.pt")
    saved = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in sync.averaged_state_dict().items())
    other = _model(torch.bfloat16, seed=5)
    off.copy_to(other)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sync.averaged_state_dict().items())
    off.copy_to()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sync.averaged_state_dict().items())
    # a checkpoint of the offloaded EMA resumes a synchronous one, and back
    resumed = EMA(model, 0.9, offload="cpu")
    resumed.load_state_dict(sync.state_dict())
    assert _equal(resumed, sync)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_bema_update_every_and_several_decays_compose_with_offload(chunk, pipeline):
    model = _model()
    for kw in (dict(decay=BEMA()), dict(decay=[0.9, 0.99, 0.5], update_every=2, compensate=True),
               dict(decay=[PowerFunction.of(0.05), PowerFunction.of(0.2)])):
        sync, off = EMA(model, **kw), EMA(model, **kw, offload=Offload(chunk=chunk))
        for i in range(5):
            _bump(model, i)
            sync.update()
            off.update()
        assert _equal(sync, off), kw


def test_a_fold_error_is_raised_by_the_next_update_or_read_and_the_average_stays_valid(pipeline):
    model = _model()
    off = EMA(model, 0.9, offload="cpu")
    ref = EMA(model, 0.9)
    off.update()
    ref.update()
    off.join()

    def broken(stage, run, *args):
        if stage == "fold":
            raise RuntimeError("host kernel failed")
        return run(*args)

    with _folds.watched(broken):
        off.update()
        with pytest.raises(RuntimeError, match="host kernel failed"):
            off.join()
        off.join()                                      # raised once; the average is the last good one
    assert _equal(off, ref)
    with _folds.watched(broken):
        off.update()
        while not off._avg._queue.pending.done():
            time.sleep(0.001)
    with pytest.raises(RuntimeError, match="host kernel failed"):
        off.update()                                    # the next update raises it, before staging anything
    for i in range(3):                                  # and the average goes on from the last good one
        _bump(model, i)
        off.update()
        ref.update()
    assert _equal(off, ref)


def test_a_fold_that_fails_halfway_through_an_update_breaks_the_average_and_says_what_to_do():
    model = _model()
    off = EMA(model, 0.9, offload=Offload(chunk=64))
    off.update()

    def third_fails(stage, run, *args):
        if stage == "fold window" and args[0] == 2:
            raise MemoryError("injected: window 2")
        return run(*args)

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with _folds.watched(third_fails), pytest.raises((MemoryError, RuntimeError)):
        off.update()                                    # the update that waits on the failed window's chunk
        off.join()
    for read in (off.join, off.state_dict, off.update, off.swap):
        with pytest.raises(RuntimeError, match="halfway through an update.*load the last checkpoint"):
            read()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())   # the model untouched


def test_offload_arguments_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="offload must be None, 'cpu' or a fastema.torch.Offload"):
        EMA(model, 0.9, offload="gpu")
    with pytest.raises(ValueError, match="keeps the average in host memory: device='cpu'"):
        EMA(model, 0.9, offload=Offload(device="cuda"))
    with pytest.raises(ValueError, match="device_step=True or skip_nonfinite=True"):
        EMA(model, 0.9, offload="cpu", skip_nonfinite=True)
    for bad in (8, 16.0, True, "64MiB"):
        with pytest.raises(ValueError, match="must be a number of bytes >= 16"):
            EMA(model, 0.9, offload=Offload(chunk=bad))
    assert not EMA(model, 0.9, offload="cpu").device_step


def test_offloaded_ema_in_a_training_loop_with_a_real_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    model = model.to(memory_format=torch.channels_last)
    sync = EMA(model, NumUpdates(0.99))
    off = EMA(model, NumUpdates(0.99), offload=Offload(chunk=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(12):
        x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
        nn.functional.cross_entropy(model(x), torch.randint(0, 3, (4,))).backward()
        opt.step()
        opt.zero_grad()
        sync.update()
        off.update()
    assert _equal(sync, off)
    v = off.averaged_state_dict()["0.weight"]
    assert v.is_contiguous(memory_format=torch.channels_last)


def test_moved_weights_are_followed_through_every_windows_tables():
    model = _model()
    sync, off = EMA(model, 0.9), EMA(model, 0.9, offload=Offload(chunk=64))
    for i in range(4):
        _bump(model, i)
        if i == 2:                                      # new storage under every parameter
            for p in model.parameters():
                p.data = p.data.clone()
        sync.update()
        off.update()
    assert _equal(sync, off)


def test_an_offloaded_update_refuses_graph_capture_before_counting(monkeypatch):
    model = _model()
    off = EMA(model, 0.9, offload="cpu")
    off._gpu = "cuda:0"                  # as for a model on a GPU (the fake GPU runs no offload: torch's streams)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="offloaded.*host thread"):
        off.update()
    assert off.calls == 0 and off.updates == 0


def test_memory_shows_the_host_shadow_the_chunks_and_the_tables_apart(pipeline):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    numel = sum(p.numel() for p in model.parameters())
    off, sync = EMA(model, [0.9, 0.5], offload=Offload(chunk=4096)), EMA(model, [0.9, 0.5])
    off.update()
    off.memory()          # one reading first: in CI's worker, after other files, a second reading once held
    #                       88 bytes more than the first (a table made lazily? noted in round 8, not yet found)
    parts = off.memory(parts=True)
    assert set(parts) == {"cpu"} and sum(parts["cpu"].values()) == off.nbytes == sum(off.memory().values())
    cpu = parts["cpu"]
    assert cpu["shadow"] == numel * 4 * 2 == sync.memory(parts=True)["cpu"]["shadow"]
    assert cpu["staging chunks"] == 2 * 4096
    assert cpu.get("host slots", 0) == (2 * 4096 if pipeline == "host slots" else 0)
    assert set(cpu) <= {"shadow", "staging chunks", "host slots", "tables"}
    with off.average_parameters():                      # the raw weights kept aside in host memory
        assert off.memory(parts=True)["cpu"]["swap backup"] == numel * 4


def test_on_the_cpu_a_swap_backup_lives_until_the_next_update():
    model = _model()
    off, sync = EMA(model, [0.9, 0.5], offload="cpu"), EMA(model, [0.9, 0.5])
    shadow = off._avg
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        _step(model, opt, i, torch.float32)
        off.update()
        sync.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with off.average_parameters(1):
        assert shadow._spare is not None                                       # the raw weights' backup
        want = sync.averaged_state_dict(1)
        assert all(torch.equal(p, want[k]) for k, p in model.named_parameters())
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    _step(model, opt, 3, torch.float32)
    off.update()
    sync.update()
    assert shadow._spare is None                                               # released by the update
    assert _equal(sync, off)


def test_the_default_chunk_is_the_one_measured_nearest_the_copy_floor_and_the_docs_say_so():
    """256 MiB: on the 2026-11-26 H100 a step plus an offloaded update of a 1 GiB model came within
    1.2x of the device-to-host floor with it, 2x with 16 MiB chunks (issue 70 item 8)."""
    from pathlib import Path

    from fastema.torch._placement.pick import PLACEMENT_DOCS

    assert Offload().chunk == 256 << 20
    assert "default\n    256 MiB" in PLACEMENT_DOCS["offload"]
    guide = (Path(__file__).parents[3] / "docs" / "guides" / "large_models.md").read_text()
    assert "`Offload()`, 256 MiB chunks" in guide and "64 MiB chunks)" not in guide


def test_the_pipeline_and_the_watched_stages_are_set_for_a_block_and_put_back():
    """The offload placement's seams (issue 72 item 4): ``pipeline`` for the rings built in its
    block, checked before anything is set; ``watched`` hooks nested, the innermost run first, each
    handing on to the next; both put back however the block ends."""
    model = _model()
    with pytest.raises(TypeError, match="True or False"):
        with _offload_ring.pipeline(host_slots=1):
            pass
    with pytest.raises(ZeroDivisionError), _offload_ring.pipeline(host_slots=True, in_place=False):
        inside = EMA(model, 0.9, offload=Offload(chunk=64))
        1 / 0
    after = EMA(model, 0.9, offload=Offload(chunk=64))
    assert [r.through_host for r in inside._avg._ring_of.values()] == [True] and not any(inside._avg._in_place)
    assert [r.through_host for r in after._avg._ring_of.values()] == [False] and any(after._avg._in_place)
    seen: list = []

    def hook(tag):
        def watch(stage, run, *args):
            seen.append((tag, stage))
            return run(*args)
        return watch

    with _folds.watched(hook("outer")), _folds.watched(hook("inner")):
        after.copy_to()                                 # on this thread alone: window by window
    assert seen == [("inner", "from slot"), ("outer", "from slot")] * len(after._avg.src.windows)
    seen.clear()
    with _folds.watched(hook("one")):
        after.update()
        after.join()
    assert {s for _, s in seen} == {"fold", "fold window", "pack"}
    seen.clear()
    after.update()
    after.join()
    assert seen == []
