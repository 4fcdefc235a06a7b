"""The host scenarios (``instructions`` and ``counts`` measure the same ones): which update, at how many
tensors, on the CPU kernels or under the fake GPU. fastema is imported when one is built: call
:func:`~bench.gates.common.use_tree` first."""
from __future__ import annotations

import contextlib

from .common import DECAY

HOST = (("EMA.update", 6), ("EMA.update", 148), ("EMA.update", 3000), ("TargetNetwork.update", 6),
        ("FlatShadow.update", 148), ("ema_update_many_", 148))
# instructions only: ema.attach(optimizer)'s update in a step post-hook against update() by
# hand, each after a no-op optimizer step (torch's step wrapper; its heap count moves 0-1
# between runs: no count gates)
ATTACHED = (("no-op step + EMA.update", 148), ("no-op step, EMA attached", 148))
INSTRUCTIONS = HOST + ATTACHED
WHERE = ("cpu", "fake-gpu")
# instructions only, on the stub driver (fastema's real CudaCoreDriver into a libcuda.so.1 that returns at once:
# tests/support/fake_gpu.py): an array function's launch against a bound one (issue 70)
STUB = (("ema_update_", 1), ("FlatShadow.update", 1))
STUB_WHERE = "stub-gpu"
BOUNDS = (("stub-gpu ema_update_, 1 tensors", "stub-gpu FlatShadow.update, 1 tensors", 1.5),)
"""``(scenario, reference, factor)``: the scenario's instructions at most ``factor`` times the reference's."""


def host_names(scenarios: tuple = HOST) -> list[str]:
    return [f"{where} {what}, {n} tensors" for where in WHERE for what, n in scenarios]


def stub_names() -> list[str]:
    return [f"{STUB_WHERE} {what}, {n} tensors" for what, n in STUB]


def _net(n: int):
    """``n`` tensors of 4x4 ``Linear`` layers: the host path, not bandwidth (as bench/gpu/host_cost.py)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(max(1, n // 2))])


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _cuda_factories_on_cpu():
    """Tensors asked for on ``cuda`` made on the CPU (the fake GPU's stand-ins), for a constructor that
    makes its own (``TargetNetwork``'s flags); used around construction only."""
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs = dict(kwargs, device="cpu")
            return func(*args, **kwargs)

    with Mode():
        yield


def build(what: str, n: int, fake: bool):
    """``(update, bytes the update's kernels move)`` for one host scenario (public names only)."""
    import copy

    import fastema
    from fastema.torch import EMA, TargetNetwork

    net = _net(n)
    params = [p.detach() for p in net.parameters()]
    if what == "EMA.update":
        ema = EMA(net, DECAY)
        shadow = sum(parts.get("shadow", 0) for parts in ema.memory(parts=True).values())
        return ema.update, 2 * shadow + _bytes(params)
    if what == "TargetNetwork.update":
        target = copy.deepcopy(net).requires_grad_(False)
        with _cuda_factories_on_cpu() if fake else contextlib.nullcontext():
            tn = TargetNetwork(net, target, tau=0.005)
        return tn.update, 2 * _bytes(target.parameters()) + _bytes(params)
    if what == "FlatShadow.update":
        flat = fastema.FlatShadow(params[:n])
        return (lambda: flat.update(DECAY)), 2 * flat.nbytes + _bytes(params)
    if what == "ema_update_":
        shadow, src = params[0].clone(), params[0]
        return (lambda: fastema.ema_update_(shadow, src, DECAY)), 3 * _bytes([src])
    if what == "ema_update_many_":
        shadows = [p.clone() for p in params]
        return (lambda: fastema.ema_update_many_(shadows, params, DECAY)), 3 * _bytes(params)
    if what in ("no-op step + EMA.update", "no-op step, EMA attached"):
        opt = _no_op_optimizer(net)
        ema = EMA(net, DECAY)
        shadow = sum(parts.get("shadow", 0) for parts in ema.memory(parts=True).values())
        if what == "no-op step, EMA attached":
            return ema.attach(opt).attached.step, 2 * shadow + _bytes(params)

        def by_hand():
            opt.step()
            ema.update()
        return by_hand, 2 * shadow + _bytes(params)
    raise ValueError(what)


def _no_op_optimizer(net):
    """An optimizer whose ``step()`` does nothing but what torch wraps every step with (its
    profiling and hooks)."""
    import torch

    class NoOp(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            return None

    return NoOp(net.parameters())


def region_updates(n_tensors: int) -> int:
    """N of the instruction regions (N and 2N updates): short regions, valgrind is ~50x slow."""
    return 20 if n_tensors <= 6 else 8 if n_tensors <= 200 else 3
