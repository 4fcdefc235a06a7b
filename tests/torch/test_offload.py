"""EMA(model, offload="cpu"): the shadow in host memory, folded on a worker thread while training
goes on. On the CPU a group's staging is its host slot; the tests also run the GPU groups'
pipeline on the CPU (a staging of its own, two host slots copied into in turn, the next update
going on while the worker folds), and a mix of both. Every pipeline must equal the synchronous
EMA bit for bit."""
import threading
import time

import pytest
import torch
from models import mlp
from torch import nn

from fastema.torch import EMA, _offload
from fastema.torch._offload import OffloadedShadow

#: which (device, dtype) groups get two host slots (the GPU's pipeline), by the test's name for it
PIPELINES = {"one slot": lambda g: False,                          # what a CPU group gets
             "two slots": lambda g: True,                          # what a GPU group gets
             "mixed": lambda g: g.buffer.dtype == torch.bfloat16}  # a model with groups of both


@pytest.fixture(params=["one slot", "two slots"])
def pipeline(request, monkeypatch):
    """The offloaded EMAs made in the test use this pipeline for their CPU groups."""
    monkeypatch.setattr(_offload, "_two_slots", PIPELINES[request.param])
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


@pytest.fixture
def slow_worker(monkeypatch):
    """Every fold first sleeps: the training thread runs ahead as far as the double buffer allows."""
    fold = OffloadedShadow._fold
    threads = set()

    def slow(self, *args):
        threads.add(threading.current_thread().name)
        time.sleep(0.02)
        return fold(self, *args)

    monkeypatch.setattr(OffloadedShadow, "_fold", slow)
    return threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("name, seed", [("one slot", 0), ("one slot", 1), ("two slots", 2)])
def test_offloaded_equals_synchronous_bit_for_bit(dtype, every, name, seed, monkeypatch, slow_worker):
    monkeypatch.setattr(_offload, "_two_slots", PIPELINES[name])
    model = _model(dtype, seed)
    kw = dict(update_every=every, compensate=True, warmup="power", buffers="average")
    sync, off = EMA(model, [0.9, 0.5], **kw), EMA(model, [0.9, 0.5], offload="cpu", **kw)
    assert off._avg._double == [name == "two slots"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(7):
        _step(model, opt, 10 * seed + i, dtype)
        sync.update()
        off.update()
    assert slow_worker == {"fastema-offload_0"}         # the folds ran on the worker thread
    assert _equal(sync, off)                            # state_dict() waited for the pending folds
    for row in (0, 1):
        a, b = sync.averaged_state_dict(row), off.averaged_state_dict(row)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _two_dtypes(seed=0):
    """Two (device, dtype) groups on the CPU: float32 and bfloat16."""
    torch.manual_seed(seed)
    return nn.ModuleDict({"a": nn.Linear(8, 16), "b": nn.Linear(16, 4).bfloat16()})


@pytest.mark.parametrize("name", PIPELINES)
def test_each_slot_and_each_staging_is_kept_until_its_fold_has_read_it(name, monkeypatch, slow_worker):
    # A slot or a staging rewritten while the fold of an earlier update still reads it gave other
    # bits (measured on the prototype); with very different weights at every step, any such
    # overlap shows. Two slots: an update waits for the fold two updates back; one slot: for the
    # fold before it; mixed: each group as its pipeline says.
    monkeypatch.setattr(_offload, "_two_slots", PIPELINES[name])
    model = _two_dtypes()
    sync, off = EMA(model, [0.5, 0.9]), EMA(model, [0.5, 0.9], offload="cpu")
    assert off._avg._double == {"one slot": [False, False], "two slots": [True, True], "mixed": [False, True]}[name]
    for i in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(10 ** (i % 3)))
        sync.update()
        off.update()
    assert _equal(sync, off)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with off.average_parameters(1):                     # the backup: slot 1, or a buffer of its own
        want = sync.averaged_state_dict(1)
        assert all(torch.equal(p, want[k]) for k, p in model.named_parameters())
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert _equal(sync, off)


class Trace(list):
    """What the pipeline did, in order: ("pack", group) on the training thread, ("read", slot,
    group) on the worker once a group's fold is done. The folds of the groups in ``hold`` wait
    for ``gate`` first (60 s at most: only a regression waits that long)."""

    def __init__(self):
        super().__init__()
        self.gate, self.hold = threading.Event(), set()

    def packs(self, group: int) -> list:
        return [i for i, e in enumerate(self) if e == ("pack", group)]


@pytest.fixture
def trace(monkeypatch):
    log, pack, fold_group = Trace(), OffloadedShadow._pack, OffloadedShadow._fold_group

    def packed(self, gi):
        pack(self, gi)
        log.append(("pack", gi))

    def folded(self, gi, slot, *args):
        if gi in log.hold:
            log.gate.wait(60)
        fold_group(self, gi, slot, *args)
        log.append(("read", slot, gi))

    monkeypatch.setattr(OffloadedShadow, "_pack", packed)
    monkeypatch.setattr(OffloadedShadow, "_fold_group", folded)
    yield log
    log.gate.set()                                      # a failed test leaves no fold held


@pytest.mark.parametrize("name", ["two slots", "mixed"])
def test_with_two_slots_an_update_returns_while_the_fold_before_it_runs(name, monkeypatch, trace):
    # The GPU groups' double buffering: the next update copies into the other slot while the
    # worker folds; it waits only for the fold two updates back (the last reader of its slot).
    # In a model with CPU groups too, the fold reads them first and lets the next update go on.
    monkeypatch.setattr(_offload, "_two_slots", PIPELINES[name])
    model = _two_dtypes()
    sync, off = EMA(model, 0.5), EMA(model, 0.5, offload="cpu")
    shadow = off._avg
    trace.hold.add(1)                                   # the bfloat16 group, two slots in both pipelines
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(i + 1))
        sync.update()
        off.update()
    # the fold of update 1 is held (before its bfloat16 group), yet update 2 has staged and queued
    assert not shadow._jobs[0].done() and not shadow._jobs[1].done()
    assert len(trace.packs(1)) == 2 and ("read", 0, 1) not in trace
    timer = threading.Timer(0.2, trace.gate.set)        # update 3 reuses slot 0: it waits for that fold
    timer.start()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)
    sync.update()
    off.update()
    timer.join()
    assert trace.index(("read", 0, 1)) < trace.packs(1)[2]
    assert _equal(sync, off)


def test_with_one_slot_an_update_waits_until_the_fold_before_it_has_read_the_staging(monkeypatch, trace):
    model = _two_dtypes()
    sync, off = EMA(model, 0.5), EMA(model, 0.5, offload="cpu")
    assert off._avg._double == [False, False]           # on the CPU: the staging is the slot
    trace.hold.add(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    sync.update()
    off.update()
    assert ("read", 0, 0) not in trace                  # held
    timer = threading.Timer(0.2, trace.gate.set)
    timer.start()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    sync.update()
    off.update()                                        # packs only once the fold of update 1 has read it
    timer.join()
    assert trace.index(("read", 0, 0)) < trace.packs(0)[1]
    assert _equal(sync, off)


def test_swap_copy_to_and_export_wait_and_match_the_synchronous_ema(tmp_path, pipeline):
    model = _model(torch.bfloat16)
    sync, off = EMA(model, 0.9), EMA(model, 0.9, offload="cpu")
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
    assert type(off._backup).__name__ == "_HostBackup"  # the raw weights waited in host memory
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


def test_a_fold_error_is_raised_by_the_next_update_or_read_and_the_average_stays_valid(monkeypatch, pipeline):
    model = _model()
    off = EMA(model, 0.9, offload="cpu")
    ref = EMA(model, 0.9)
    off.update()
    ref.update()
    off.join()
    fold = OffloadedShadow._fold

    def broken(self, *args):
        raise RuntimeError("host kernel failed")

    monkeypatch.setattr(OffloadedShadow, "_fold", broken)
    off.update()
    with pytest.raises(RuntimeError, match="host kernel failed"):
        off.join()
    off.join()                                          # raised once; the average is the last good one
    monkeypatch.setattr(OffloadedShadow, "_fold", fold)
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict()["averaged"].values(),
                                                 ref.state_dict()["averaged"].values()))
    monkeypatch.setattr(OffloadedShadow, "_fold", broken)
    off.update()
    while not off._avg._pending.done():
        time.sleep(0.001)
    with pytest.raises(RuntimeError, match="host kernel failed"):
        off.update()                                    # the next update raises it, before staging anything


def test_offload_arguments_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        EMA(model, 0.9, offload="gpu")
    with pytest.raises(ValueError, match="device_step=True or skip_nonfinite=True"):
        EMA(model, 0.9, offload="cpu", skip_nonfinite=True)
    assert not EMA(model, 0.9, offload="cpu").device_step


def test_offloaded_ema_in_a_training_loop_with_a_real_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    model = model.to(memory_format=torch.channels_last)
    sync = EMA(model, 0.99, warmup="num_updates")
    off = EMA(model, 0.99, warmup="num_updates", offload="cpu")
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


def test_an_offloaded_update_refuses_graph_capture_before_counting(monkeypatch):
    model = _model()
    off = EMA(model, 0.9, offload="cpu")
    off._on_gpu = True                                    # as for a model on a GPU
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="offloaded.*host thread"):
        off.update()
    assert off.calls == 0 and off.updates == 0


def test_on_the_cpu_the_staging_is_the_host_slot_and_a_swap_backup_lives_until_the_next_update():
    # L4: offload on a CPU-only machine held 4 model-sized buffers (staging, two slots, the shadow);
    # the pack now writes straight into the one host slot, and a swap's backup is released after it.
    model = _model()
    off, sync = EMA(model, [0.9, 0.5], offload="cpu"), EMA(model, [0.9, 0.5])
    shadow = off._avg
    staging = [g.buffer for g in shadow.pack.layout.groups]
    assert all(s.data_ptr() == b.data_ptr() for slot in shadow._slots for s, b in zip(slot, staging))
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in staging + [h.layout.groups[0].buffer for h in shadow._hosts]}
    params = sum(p.numel() * p.element_size() for p in model.parameters())    # the averaged tensors
    assert sum(held.values()) == shadow.pack.nbytes + shadow.nbytes          # one staging + the shadow
    assert shadow.nbytes == sync._avg.nbytes and params <= shadow.pack.nbytes < params + 4096
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
