"""The host's counters after CUDA graph replays of a captured ``update()`` with the plan on the device: a
replay runs the update's launches and no Python, so the device plan advances and the host's does not
(``ema.updates`` and ``ema.calls`` count eager calls, as documented). The reads that must see every update
read the device's counters (``Average.plan_now(replayed=True)``: one sync on a GPU, off the per-step path):
a stream of the average reads them at its start and after its last tensor, so a replay while it streamed is
refused there, and a PostHocEMA snapshot taken between replays is stamped with the device's time.

The CPU cannot capture: a replay is emulated by running exactly the launches a capture records,
``Average.fold_on_device(None, device_plan)`` (the plan kernel, the lerps, the copies), on a CPU average
with ``device_step=True``."""
import copy
import os

import pytest
import torch
from models import mlp
from torch import nn

from fastema.torch import EMA, PostHocEMA, TargetNetwork

pytestmark = pytest.mark.filterwarnings("ignore")


def _replay(face, n, params):
    """``n`` emulated replays of a captured ``face.update()``, each after moving ``params`` by 1: the
    captured launches, no host Python."""
    core = face._core
    for _ in range(n):
        with torch.no_grad():
            torch._foreach_add_(params, 1.0)
        core.fold_on_device(None, core.device_plan)


def test_an_ema_stream_refuses_an_update_replayed_while_it_is_read():
    """A replay between two tensors of ``iter_weights()`` changes the average under the stream: refused
    ('changed while it was streamed') after the last tensor, where the stream reads the device's count again
    (it compared the host's, which a replay does not advance: the earlier state's first tensor and the later
    state's others, no error); the error says the tensors yielded may mix the two states (it
    said they were of the earlier state)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = EMA(model, 0.5, device_step=True)
    ema.update()                                       # the warm-up (or the capture's own call)
    stream = ema.iter_weights(bucket_bytes=16)
    next(stream)
    _replay(ema, 1, list(model.parameters()))
    with pytest.raises(RuntimeError, match="streamed.*may mix the earlier and the later"):
        list(stream)


def test_a_target_stream_refuses_an_update_replayed_while_it_is_read():
    """The same for a TargetNetwork's ``iter_weights()``."""
    online = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.5, device_step=True)
    tn.update()
    stream = tn.iter_weights()
    next(stream)
    _replay(tn, 1, list(online.parameters()))
    with pytest.raises(RuntimeError, match="streamed.*may mix the earlier and the later"):
        list(stream)


def test_posthoc_snapshots_between_replays_carry_the_device_time(tmp_path):
    """PostHocEMA's documented use with CUDA graphs: ``snapshot()`` between replays. Each snapshot is named and
    stamped with the device's time (6, then 11), not the host's (1, the capture's call: the second file was
    written over the first, and synthesis would have weighted both at time 1)."""
    model = mlp(8, 16, 4, seed=0)
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=None, path=tmp_path, device_step=True)
    params = list(model.parameters())
    ema.update()
    _replay(ema, 5, params)
    first = ema.snapshot()
    _replay(ema, 5, params)
    second = ema.snapshot()
    assert [os.path.basename(p) for p in (first, second)] == [
        "snapshot-000000000006.safetensors", "snapshot-000000000011.safetensors"]
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) == 2
