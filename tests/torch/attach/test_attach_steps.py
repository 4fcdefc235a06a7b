"""Stepping from one rule (issue 77 H3, L3 and item 3): DCP's lr-0 dummy step (its
``_init_optim_state``, run by ``get_state_dict`` on an optimizer with no state) is no update,
whatever form ``optimizer.step`` takes: plain, wrapped by decorators (11 and more frames between
DCP and the hook: the base looked 14 frames up only), wrapped by an LR scheduler, compiled
(``torch.compile(opt.step)``: the base decided inside the trace and counted it), compiled under
wrappers, or reached through a forwarding optimizer (accelerate's ``AcceleratedOptimizer``) with
other step hooks around. Each form's run with a ``get_state_dict`` before the first step ends bit
for bit as its run without one (``update_every=2``: a counted dummy step shifts the phase). The
rule is ``_face.attach.dummy_step``: every lr 0 and DCP's ``_init_optim_state`` on the stack
(``_state/dcp_calls.context``, one walk to the stack's end), decided when the step runs."""
import functools
import sys

import pytest
import torch
from support.attach import averaged, same
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fastema.torch import EMA
from fastema.torch._state import dcp_calls

sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def _wrapped(step, frames):
    """``step`` under ``frames`` decorator frames (a user's decorators, a profiler's)."""
    for _ in range(frames):
        step = functools.wraps(step)(lambda *a, _s=step, **k: _s(*a, **k))
    return step


class Forwarding(torch.optim.Optimizer):
    """What accelerate's ``AcceleratedOptimizer`` is to ``attach()`` and DCP: a
    ``torch.optim.Optimizer`` whose ``__init__`` does not run the base's (no hooks of its own),
    forwarding ``state``, ``param_groups``, ``step``, ``zero_grad`` and the state dicts to the
    optimizer it holds as ``.optimizer`` (accelerate/optimizer.py)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)
    param_groups = property(lambda self: self.optimizer.param_groups)

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)


def _run(form, get, frames=0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stepped = opt
    ema = EMA(model, 0.5, update_every=2).attach(Forwarding(opt) if form == "hooked" else opt)
    if form == "scheduler":                           # LRScheduler wraps opt.step itself
        torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    elif form == "compiled":
        opt.step = torch.compile(opt.step, backend="aot_eager")
    elif form == "hooked":                            # a forwarding wrapper, other hooks around
        calls = []
        opt.register_step_post_hook(lambda o, a, k: calls.append(1))
        handle = register_optimizer_step_pre_hook(
            lambda o, a, k: calls.append(0))
        stepped = Forwarding(opt)
    if frames:
        opt.step = _wrapped(opt.step, frames)
    if get:                                           # a step-0 checkpoint: DCP's dummy step
        sd.get_state_dict(model, stepped)
        assert ema.updates == 0 and len(opt.state) > 0
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(torch.randn(3, 4, generator=g)).square().mean().backward()
        stepped.step()
        stepped.zero_grad()
    if form == "hooked":
        handle.remove()
        assert calls.count(1) == 4 + get              # the user's hooks saw the dummy step too
    return ema, [p.detach().clone() for p in model.parameters()]


FORMS = [("plain", 0), ("wrapped", 12), ("wrapped", 40), ("scheduler", 0), ("scheduler", 11),
         ("hooked", 0), ("compiled", 0), ("compiled", 12)]


@functools.cache
def _uninterrupted(compiled: bool):
    """The run without DCP's get that every form's run with the get must end as: the plain eager
    one, and for a compiled step the compiled one (aot_eager's SGD step gives the eager step's bits
    from torch 2.12 on; before, Dynamo's foreach decompositions round otherwise)."""
    ema, weights = _run("compiled" if compiled else "plain", get=False)
    return averaged(ema), weights


@pytest.mark.parametrize("form,frames", FORMS, ids=[f"{f}-{n}" for f, n in FORMS])
def test_dcps_dummy_step_is_no_update_in_every_form_of_step(form, frames):
    ema, weights = _run(form, get=True, frames=frames)
    average0, weights0 = _uninterrupted(form == "compiled")
    assert ema.updates == 2                         # 3 where the dummy step counted
    assert same(averaged(ema), average0)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights0))


def test_a_real_first_step_at_lr_0_updates_in_every_form():
    """The dummy step is DCP's: a warm-up from lr 0 outside DCP is a step (compiled too)."""
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        ema = EMA(model, 0.5).attach(opt)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        model(torch.ones(2, 4)).sum().backward()
        step()
        assert ema.updates == 1, compiled


def _walks(fn) -> int:
    """How many times ``fn()`` walks the stack (calls ``dcp_calls.context``), seen by a profile
    function (nothing of fastema replaced)."""
    code, walks = dcp_calls.context.__code__, []
    sys.setprofile(lambda frame, event, arg: walks.append(1) if (
        event == "call" and frame.f_code is code) else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return len(walks)


def test_the_stack_is_walked_once_per_hook_call():
    """``optimizer.state_dict()`` inside DCP's getter walks the stack once per hook (the base: 3
    walks of 14 frames), and a step outside DCP at a non-zero lr never walks it."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    EMA(model, 0.5).attach(opt)

    def step():
        model(torch.ones(2, 4)).sum().backward()
        opt.step()

    assert _walks(step) == 0                          # lr 0.1: no walk at all
    assert _walks(lambda: sd.get_optimizer_state_dict(model, opt)) == 2   # pre- and post-hook

