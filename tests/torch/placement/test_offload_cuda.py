"""``EMA(model, offload="cpu")`` on a GPU (issue 44): what needs a real device, run in the GPU plan's
``tests`` stage (``pytest tests -m cuda``; skipped in the simulator, which has no torch CUDA). The ring's
streams, pinned slots and events: bit for bit the synchronous EMA with many windows and late optimizer
writes, device memory of two chunks, and no host wait for a model of one or two windows. The windowing and
the CUDA pack tables themselves are checked in the simulator too (tests/array/test_chunks.py)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="hardware: streams, pinned slots, events")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).cuda().bfloat16()


def _step(model, opt, i):
    g = torch.Generator(device="cuda").manual_seed(i)
    torch.cuda._sleep(int(1e7))                               # the optimizer's writes land late
    model(torch.randn(32, 64, device="cuda", generator=g).bfloat16()).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("chunk", [256, 4096, 1 << 20])
def test_many_windows_through_pinned_slots_equal_the_synchronous_ema(chunk):
    from fastema.torch import EMA, Offload

    model = _model()
    sync = EMA(model, [0.99, 0.9], device_step=False)
    off = EMA(model, [0.99, 0.9], offload=Offload(chunk=chunk))
    ring = off._avg._ring_of["cuda:0"]
    assert all(s.is_pinned() for s in ring.slots) and ring.stream is not None
    parts = off.memory(parts=True)
    assert parts["cuda:0"]["staging chunks"] == 2 * ring.chunks[0].numel() <= 2 * chunk
    assert "shadow" not in parts["cuda:0"] and parts["cpu"]["shadow"] == sync.memory(parts=True)["cuda:0"]["shadow"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(6):
        _step(model, opt, i)
        sync.update()
        off.update()
    a, b = sync.state_dict()["averaged"], off.state_dict()["averaged"]
    assert all(torch.equal(a[k].cpu(), b[k]) for k in a)
    x = torch.randn(4, 64, device="cuda").bfloat16()
    with sync.average_parameters():
        want = model(x)
    with off.average_parameters():
        got = model(x)
    assert torch.equal(got, want)


def test_an_update_of_one_or_two_windows_waits_for_nothing_on_the_host():
    from fastema.torch import EMA, Offload

    model = _model()
    off = EMA(model, 0.9, offload=Offload(chunk=1 << 20))      # the whole model in one window
    assert len(off._avg.src.windows) == 1
    torch.cuda._sleep(int(3e8))
    off.update()
    busy = not torch.cuda.current_stream().query()             # returned while the GPU still slept
    off.join()
    assert busy
