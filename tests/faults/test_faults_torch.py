"""Faults around the torch face's evaluation swaps and checkpoints: an exception or a KeyboardInterrupt
inside ``average_parameters()``, a Ctrl-C arriving while a swap moves the tensors, a swap that fails
halfway (after one group is exchanged), and a truncated DCP shard. Each leaves the model's weights
and buffers, the shadow and the counters exactly as they were (bit for bit), or, for a Ctrl-C that
lands inside a swap, the swap done whole and the interrupt raised after it.

Reliability round 3 (issue 25): the torch part of the fault-injection suite, and M1."""
import os
import signal
from collections.abc import Iterator

import pytest
import torch
from models import mlp
from support.calls import watching
from torch import nn

from fastema._launch import Launches
from fastema.torch import EMA, WindowAverage


class Mixed(nn.Module):
    """float32 and bfloat16 weights (two shadow groups), BatchNorm buffers (copied) and its counter."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(8, 3).to(dtype)

    def forward(self, x):
        return self.b(self.bn(self.a(x)).to(self.b.weight.dtype))


MODELS = {
    "float32": lambda: mlp(6, 8, 3, norm=nn.BatchNorm1d),
    "two_groups": Mixed,                                  # exact swaps, group by group
    "float16": lambda: Mixed(torch.float16),              # a lossy swap: the raw weights are backed up
}


def _trained(kind, average=EMA):
    model = MODELS[kind]()
    ema = average(model, 0.5) if average is EMA else average(model, 3)
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25 * (i + 1))
            for b in model.buffers():
                if b.is_floating_point():
                    b.add_(1.0)
        ema.update()
    with torch.no_grad():
        for p in model.parameters():                    # the raw weights differ from every average
            p.add_(1.0)
    return model, ema


def _everything(model, ema) -> dict:
    """The model's tensors, every tensor and counter of the average's checkpoint, and its swap state."""
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in ema.state_dict().items():
        for kk, vv in (v.items() if isinstance(v, dict) else [("", v)]):
            out[f"ema/{k}/{kk}"] = vv.clone() if isinstance(vv, torch.Tensor) else vv
    out["swapped"] = ema.swapped
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------------ an error inside the evaluation block


@pytest.mark.parametrize("average", [EMA, WindowAverage])
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_or_ctrl_c_in_the_evaluation_block_puts_everything_back(error, kind, average):
    model, ema = _trained(kind, average)
    before = _everything(model, ema)
    x = torch.randn(4, 6)
    with pytest.raises(error):
        with ema.average_parameters():
            model.eval()
            model(x)
            with ema.average_parameters():              # re-entrant: the outer block swaps back
                raise error("evaluation failed")
    model.train()
    _same(before, _everything(model, ema))
    with ema.average_parameters():                      # and the next evaluation works as before
        pass
    _same(before, _everything(model, ema))


def test_swapping_back_inside_the_block_is_not_undone_on_exit():
    model, ema = _trained("float32")
    before = _everything(model, ema)
    with ema.average_parameters():
        ema.swap()                                      # back already: the block's exit leaves it so
    _same(before, _everything(model, ema))


# ------------------------------------------------------------------ Ctrl-C while a swap moves the tensors


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a framework imported earlier in
    the session may have installed another (Lightning ignores SIGINT after its own Ctrl-C)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture
def ctrl_c_at_the_next_swap() -> Iterator[dict]:
    """While ``armed["now"]``, send SIGINT to this process right after the first group of the next swap
    hands out its swap launch: the default handler raises KeyboardInterrupt right there, inside the
    swap, unless the swap holds it. Disarms itself."""
    armed = {"now": True}

    def ctrl_c_after(arguments, _):
        if arguments["op"] == "swap" and armed["now"]:
            armed["now"] = False
            signal.raise_signal(signal.SIGINT)

    with watching(Launches.launch, on_return=ctrl_c_after):             # each group's kept launch
        yield armed


@pytest.mark.usefixtures("default_sigint")
def test_ctrl_c_during_a_swap_is_held_until_the_swap_is_done(request):
    model, ema = _trained("two_groups")
    before = _everything(model, ema)
    want_in = ema.averaged_state_dict()
    assert len(ema._avg.groups) == 2
    request.getfixturevalue("ctrl_c_at_the_next_swap")
    with pytest.raises(KeyboardInterrupt):
        ema.swap()
    assert ema.swapped                                  # the whole swap happened, then the interrupt
    for k, v in model.named_parameters():               # both groups hold the averages
        assert torch.equal(v, want_in[k]), k
    ema.swap()
    _same(before, _everything(model, ema))


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("when", ["in", "back"])
def test_ctrl_c_during_the_swaps_of_an_evaluation_block_puts_everything_back(when, request):
    model, ema = _trained("two_groups")
    before = _everything(model, ema)
    armed = request.getfixturevalue("ctrl_c_at_the_next_swap")
    armed["now"] = when == "in"
    body = []
    with pytest.raises(KeyboardInterrupt):
        with ema.average_parameters():
            body.append(True)
            armed["now"] = True                         # "back": during the swap back
    assert body == ([] if when == "in" else [True])    # a Ctrl-C during the swap in stops before the body
    _same(before, _everything(model, ema))


# ------------------------------------------------------------------ a swap that fails halfway


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_swap_failing_after_the_averaged_group_changes_nothing(kind, error):
    model, ema = _trained(kind)
    before = _everything(model, ema)
    assert ema._copy is not None                        # BatchNorm statistics: swapped after the averages

    def fail(*a, **k):
        raise error("the copied buffers' swap failed")

    ema._copy.swap = fail
    with pytest.raises(error):
        ema.swap()
    _same(before, _everything(model, ema))
    with pytest.raises(error):
        with ema.average_parameters():
            pytest.fail("the block ran with a failed swap")
    _same(before, _everything(model, ema))
    del ema._copy.swap
    with ema.average_parameters():
        pass
    _same(before, _everything(model, ema))


def test_a_refused_swap_changes_nothing():
    model, ema = _trained("float32")
    before = _everything(model, ema)
    model[0].register_parameter("scale", nn.Parameter(torch.ones(3)))    # added after EMA(model): refused
    with pytest.raises(ValueError, match="added after EMA"):
        with ema.average_parameters():
            pytest.fail("the block ran with a refused swap")
    del model[0].scale
    _same(before, _everything(model, ema))


# ------------------------------------------------------------------ a truncated DCP shard (M1)


@pytest.mark.parametrize("average", [EMA, WindowAverage])
def test_a_truncated_dcp_shard_loads_nothing(tmp_path, average):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    saved_model, saved = _trained("float32", average)
    dcp.save({"ema": saved}, storage_writer=dcp.FileSystemWriter(tmp_path / "ck", single_file_per_rank=False),
             no_dist=True)                                # a file per tensor: some read whole, then one fails
    where = dcp.FileSystemReader(tmp_path / "ck").read_metadata().storage_data     # our own file, just written
    last = [v.relative_path for k, v in where.items() if k.fqn == "ema.int_buffers.1.num_batches_tracked"]
    assert len(last) == 1 and len({v.relative_path for v in where.values()}) > 4
    path = tmp_path / "ck" / last[0]                      # the tensor read last: every other one is read whole
    os.truncate(path, os.path.getsize(path) // 2)
    model, ema = _trained("float32", average)
    with torch.no_grad():
        for p in model.parameters():                    # another average than the saved one
            p.mul_(-1)
    ema.update()
    before = _everything(model, ema)
    with pytest.raises(CheckpointException):
        dcp.load({"ema": ema}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    _same(before, _everything(model, ema))


# ------------------------------------------------------------------ Ctrl-C while a load writes (M1)


def _parts(everything: dict) -> tuple[dict, dict]:
    """:func:`_everything` split into the model's part and the average's."""
    model = {k: v for k, v in everything.items() if k.startswith("model/")}
    return model, {k: v for k, v in everything.items() if not k.startswith("model/")}


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("average", [EMA, WindowAverage])
def test_ctrl_c_during_a_load_is_held_until_everything_is_loaded(average, monkeypatch):
    """A Ctrl-C that lands after the first tensor a load writes (on a GPU the writes are a host-to-device
    copy of the whole shadow) is raised once every tensor, the counters and the subclass's state (the
    window's ring) are in: never some tensors loaded and others not, with the old counters."""
    saved_model, saved = _trained("two_groups", average)
    checkpoint = saved.state_dict()
    _, want = _parts(_everything(saved_model, saved))
    model, ema = _trained("two_groups", average)
    with torch.no_grad():
        for p in model.parameters():                    # another average than the saved one
            p.mul_(-1)
    ema.update()
    model_before, _ = _parts(_everything(model, ema))
    copy_ = torch.Tensor.copy_
    writes = []

    def copy_then_ctrl_c(self, *args, **kwargs):
        out = copy_(self, *args, **kwargs)
        writes.append(self)
        if len(writes) == 1:
            signal.raise_signal(signal.SIGINT)          # the default handler raises right here, unless held
        return out

    monkeypatch.setattr(torch.Tensor, "copy_", copy_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        ema.load_state_dict(checkpoint)
    monkeypatch.undo()
    assert len(writes) > 2                              # the load went on after the Ctrl-C
    model_after, got = _parts(_everything(model, ema))
    _same(want, got)                                    # every tensor and counter of the checkpoint
    _same(model_before, model_after)


@pytest.mark.usefixtures("default_sigint")
def test_a_held_ctrl_c_goes_to_the_handler_that_was_installed():
    from fastema._interrupts import ctrl_c_held

    seen = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    with ctrl_c_held():
        with ctrl_c_held():                             # nested: the outer one holds
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert seen == []
    assert seen == [signal.SIGINT]                      # once, after the block, and the handler is back
    signal.raise_signal(signal.SIGINT)
    assert seen == [signal.SIGINT, signal.SIGINT]
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # nothing to hold: the block changes no handler
    with ctrl_c_held():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)


@pytest.mark.usefixtures("default_sigint")
def test_ctrl_c_during_copy_to_another_model_is_held_until_every_tensor_is_in():
    """``copy_to(other)`` loads the average module by module (torch's ``load_state_dict``): a Ctrl-C after
    the first module's load left the others with their old weights. Held until all of it is in."""
    model, ema = _trained("two_groups")
    want = ema.averaged_state_dict()
    other = Mixed()
    other.load_state_dict({k: torch.zeros_like(v) for k, v in other.state_dict().items()})
    first = other.a

    def ctrl_c(module, state, prefix, *args):
        signal.raise_signal(signal.SIGINT)              # the default handler raises right here, unless held

    handle = first._register_load_state_dict_pre_hook(ctrl_c, with_module=True)
    with pytest.raises(KeyboardInterrupt):
        ema.copy_to(other)
    handle.remove()
    for k, v in other.state_dict().items():
        assert torch.equal(v, want[k]), k
