"""``ema.attach(optimizer)`` for the two other faces: a ``WindowAverage`` (a ring of snapshots
and running sums) and a ``PostHocEMA`` (profiles and the snapshots they write on disk), saved
through ``optimizer.state_dict()`` (read with ``weights_only=True``) in the middle of a window and
of the snapshot cadence, and resumed into new objects bit for bit against an uninterrupted run of
a bfloat16 model: the averages, the counters, and the snapshots written after the resume. Neither
face keeps its average in host memory: ``offload=`` is refused by name."""

import pytest
import torch
from safetensors.torch import load_file
from support.attach import batches, net, save_load

from fastema.torch import ATTACH_KEY, PostHocEMA, WindowAverage

STEPS, SAVED = 7, 4           # saved in the middle of a window of 3 and between snapshots every 3

FACES = {
    "window": lambda m, path: WindowAverage(m, 3),
    "window bf16 ring": lambda m, path: WindowAverage(m, 3, ring_dtype="bfloat16"),
    "cumulative": lambda m, path: WindowAverage(m, None, every=2),
    "posthoc": lambda m, path: PostHocEMA(m, (0.05, 0.1), snapshot_every=3, path=path),
}
def run(make, path, steps, state=None):
    """AdamW on a bfloat16 model with the face attached; ``state``: (model, optimizer) state dicts
    to resume from, into new objects made from other weights."""
    model = net(torch.bfloat16, 0 if state is None else 5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    avg = make(model, path).attach(opt)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    for x in steps:
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, avg


def same(a, b):
    x, y = a.state_dict(), b.state_dict()
    tensors = ("averaged", "copied", "int_buffers", "ring")
    rest = [{k: v for k, v in s.items() if k not in tensors + ("run_id",)} for s in (x, y)]
    assert rest[0] == rest[1]
    tensors = [(k, n) for k in ("averaged", "ring") for n in x.get(k) or {}]
    return all(torch.equal(x[k][n], y[k][n]) for k, n in tensors) and x.keys() == y.keys()


@pytest.mark.parametrize("face", list(FACES))
def test_saved_and_resumed_through_the_optimizer_bit_for_bit(face, tmp_path):
    make, xs = FACES[face], batches(STEPS, torch.bfloat16)
    _, _, full = run(make, tmp_path / "full", xs)
    model1, opt1, first = run(make, tmp_path / "cut", xs[:SAVED])
    saved = save_load((model1.state_dict(), opt1.state_dict()))
    entry = saved[1][ATTACH_KEY]
    assert all(t.dtype == torch.float32 for t in entry["averaged"].values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in entry["averaged"].values())
    _, _, resumed = run(make, tmp_path / "cut", xs[SAVED:], saved)
    assert resumed.state_dict()["calls"] == full.state_dict()["calls"] == STEPS
    assert same(resumed, full)
    if face == "posthoc":                          # the snapshot after the resume, as never cut
        assert resumed.run_id == first.run_id != full.run_id
        names = sorted(p.name for p in (tmp_path / "full").glob("*.safetensors"))
        assert names == sorted(p.name for p in (tmp_path / "cut").glob("*.safetensors"))
        assert len(names) == STEPS // 3
        for name in names:
            a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("make, refused", [
    (lambda m, p: WindowAverage(m, 3, offload="cpu"), "unexpected keyword argument 'offload'"),  # type: ignore[call-arg]
    (lambda m, p: WindowAverage(m, None, offload="cpu"), "unexpected keyword argument 'offload'"),  # type: ignore[call-arg]
    (lambda m, p: PostHocEMA(m, snapshot_every=None, path=p, offload="cpu"),
     r"PostHocEMA takes no offload=.*on the weights' device.*EMA\(model, decay, offload='cpu'\)"),
], ids=["window", "cumulative", "posthoc"])
def test_offload_is_refused_by_name(make, refused, tmp_path):
    with pytest.raises(TypeError, match=refused):
        make(net(torch.bfloat16, 0), tmp_path)
