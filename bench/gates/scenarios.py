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
# instructions only, on the CPU: an array function's call on a 16-element tensor and NumPy array against
# torch.lerp_'s on a tensor (issue 70: at most 3x torch.lerp_'s host time; the ratio gate
# "16 elements, ..." times the same calls)
ARRAYS = (("ema_update_", 1), ("ema_update_ NumPy", 1), ("torch.lerp_", 1))
# instructions only, on the CPU: the ratio gate's compiled step (issue 86 items 2 and 5: fastema's plain
# update written in Inductor's graph against torch._foreach_lerp_ in it), each call of the compiled
# function counted, its compilation done before the counting starts (outside the instrumentation)
COMPILED = (("compiled step", 30), ("compiled foreach step", 30))
# instructions only, on the stub driver (fastema's real CudaCoreDriver into a libcuda.so.1 that returns at once:
# testkit/fake_gpu.py): each GPU entry point's launches against a bound one (issue 70). The smoother's
# value tensors: one stream and 10^5 (its instructions do not grow with the streams; 10^6 would hold
# ~1 GiB of stand-in state in the valgrind process); the swap at 148 tensors against EMA.update at 148:
# its round trip (average_parameters) and one swap() call, in or back in turn (issue 78 item 7); the
# target network against EMA.update at 6 tensors. Every EMA.update here takes the plan a GPU takes
# (device_step=True, a GPU's default: the stub's CPU stand-ins would pick the host plan's, issue 78 item 6).
STUB = (("kept launch", 1), ("ema_update_", 1), ("FlatShadow.update", 1), ("Smoother.update K=1", 1),
        ("Smoother.update K=10^5", 1), ("TargetNetwork.update", 6), ("EMA.update", 6), ("EMA.update", 148),
        ("average_parameters in+out", 148), ("swap()", 148))
STUB_WHERE = "stub-gpu"
_FLAT1 = "stub-gpu FlatShadow.update, 1 tensors"
_LERP = "cpu torch.lerp_, 1 tensors"
BOUNDS = (("stub-gpu ema_update_, 1 tensors", _FLAT1, 1.5),
          ("cpu ema_update_, 1 tensors", _LERP, 3.0),
          ("cpu ema_update_ NumPy, 1 tensors", _LERP, 3.0),
          ("stub-gpu Smoother.update K=1, 1 tensors", _FLAT1, 2.6),
          ("stub-gpu Smoother.update K=10^5, 1 tensors", _FLAT1, 2.6),
          ("stub-gpu swap(), 148 tensors", "stub-gpu EMA.update, 148 tensors", 1.5),
          ("stub-gpu TargetNetwork.update, 6 tensors", "stub-gpu EMA.update, 6 tensors", 1.65),
          ("cpu compiled step, 30 tensors", "cpu compiled foreach step, 30 tensors", 1.0))
"""``(scenario, reference, factor)``: the scenario's instructions at most ``factor`` times the reference's,
in the same run (issue 70's targets: ``ema_update_`` 1.5x a bound ``FlatShadow.update`` of one tensor, a
smoother's update 2x; on the CPU, ``ema_update_`` of 16 elements 3x ``torch.lerp_``; issue 78 item 7's:
a ``swap()`` call at 148 tensors 1.5x ``EMA.update()``, 0.96x measured; ``TargetNetwork.update()`` at 6
tensors 1.45x ``EMA.update()`` (1.55x until the steady state held it still), 1.36x measured at the
steady state (:func:`warm_updates`; 1.27-1.48x before, with the scenario counted before it), where the
target was 1.2x: its per-step check reads twice the tensors, with their layouts, and the layout check
alone is 14.5k of the 24.0k above ``EMA.update()``; see bench/results/LOG.md, "The target network's
host cost"). The swap's round trip has no bound of its own: its first target, 2x one ``EMA.update()``, was
set at 3000 tensors (1.66x there, ``bench/results/cpu-2026-11-27-entry-points.md``); one call of it is
bounded above. Issue 86 item 3's kept launch took ~13k off every one-launch update with
arguments it keeps (``FlatShadow.update`` 42.7k -> 29.4k, ``EMA.update()`` at 6 tensors 65.8k -> 48.4k,
``TargetNetwork.update()`` 89.4k -> 72.4k) but less off the smoother's (80.6k -> 74.8k: its two launches
patch moving arguments), so the same absolute costs read as larger factors: the smoother's bound 2.0x ->
2.6x (2.54x measured), the target network's 1.45x -> 1.55x (1.49x): bounds of the same run, to be
read again when the smoother's launches keep theirs. The device plan's kept launches (issue 86 item 3's
steady step: each group's launch kept with the plan, no per-call spec, flag or carrier lookup) took the
same ~7.6k off both (``EMA.update()`` at 6 tensors 48.6k -> 40.9k, ``TargetNetwork.update()`` 72.4k ->
64.8k): the target network's 23.9k above it unchanged, its bound 1.55x -> 1.65x (1.58x). The compiled
step (issue 86 item 2's target: at least 1.0x the same step with ``torch._foreach_lerp_`` in the graph,
timed by the ratio gate) counted 1.05x its instructions, then 1.005x with the average's tensors
constants of the graph guarded by identity (as torch's compiled optimizers hold their state: -36k):
what is left is the guards of the EMA's Python state and of each parameter reached by two paths
(bench/results/LOG.md); bound 1.08x -> 1.02x (1.005-1.007x measured). Then the schedule read as one tuple
of numbers made at each load (``DevicePlan.recipe``: 24 guard lines -> 9), no builtin, module attribute or
second function read in the traced update: 0.996-0.998x, the bound 1.0x, issue 86's target."""
CAPS = (("stub-gpu kept launch, 1 tensors", 20_000),)
"""``(scenario, most)``: the scenario's instructions per call at most ``most`` in every run (issue 86 item 3:
a kept CUDA launch below 20k instructions on the stub driver)."""


def host_names(scenarios: tuple = HOST) -> list[str]:
    return [f"{where} {what}, {n} tensors" for where in WHERE for what, n in scenarios]


def stub_names() -> list[str]:
    return [f"{STUB_WHERE} {what}, {n} tensors" for what, n in STUB]


def instruction_names(stub: bool = True) -> list[str]:
    """Every scenario the instructions section measures (the stub driver's where it is built)."""
    return (host_names(INSTRUCTIONS) + [f"cpu {what}, {n} tensors" for what, n in ARRAYS + COMPILED]
            + (stub_names() if stub else []))


def _net(n: int):
    """``n`` tensors of 4x4 ``Linear`` layers: the host path, not bandwidth (as bench/gpu/host_cost.py)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(max(1, n // 2))])


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(what: str, n: int, fake: bool, stub: bool = False):
    """``(update, bytes the update's kernels move)`` for one host scenario (public names only; the bytes
    None for the stub driver's scenarios beyond :data:`HOST`, which only instructions measure). ``stub``:
    the stub driver's (an ``EMA`` there takes the plan a GPU takes, see :data:`STUB`)."""
    import copy

    import torch

    import fastema
    from fastema.torch import EMA, TargetNetwork
    from testkit.fake_gpu import cuda_factories_on_cpu

    net = _net(n)
    params = [p.detach() for p in net.parameters()]
    if what == "EMA.update":
        with cuda_factories_on_cpu() if stub else contextlib.nullcontext():
            ema = EMA(net, DECAY, device_step=True) if stub else EMA(net, DECAY)
        shadow = sum(parts.get("shadow", 0) for parts in ema.memory(parts=True).values())
        return ema.update, 2 * shadow + _bytes(params)
    if what == "TargetNetwork.update":
        target = copy.deepcopy(net).requires_grad_(False)
        with cuda_factories_on_cpu() if fake else contextlib.nullcontext():
            tn = TargetNetwork(net, target, tau=0.005)
        return tn.update, 2 * _bytes(target.parameters()) + _bytes(params)
    if what == "FlatShadow.update":
        flat = fastema.FlatShadow(params[:n])
        return (lambda: flat.update(DECAY)), 2 * flat.nbytes + _bytes(params)
    if what == "kept launch":                                   # the launch alone (see STUB)
        from fastema._steps import LERP

        flat = fastema.FlatShadow(params[:1])
        run, w = flat.layout.groups[0].launch_of(LERP[False]), (1 - DECAY,)
        return (lambda: run(w)), None
    if what in ("ema_update_", "ema_update_ NumPy"):               # params[0]: 4x4, 16 elements
        shadow, src = params[0].clone(), params[0]
        if what.endswith("NumPy"):
            shadow, src = shadow.numpy(), src.numpy()
        return (lambda: fastema.ema_update_(shadow, src, DECAY)), 3 * src.nbytes
    if what == "torch.lerp_":
        shadow, src = params[0].clone(), params[0]
        return (lambda: shadow.lerp_(src, 1 - DECAY)), 3 * _bytes([src])
    if what.startswith("Smoother.update K="):
        k = 10 ** int(what.rpartition("^")[2]) if "^" in what else 1
        s = fastema.Smoother(decay=0.9, window=50)
        values = [torch.ones(k), torch.full((k,), 2.0)]       # alternating, as a loop's losses
        turn = [0]

        def smoother():
            turn[0] ^= 1
            s.update(values[turn[0]])
        return smoother, None                                  # instructions only: no bytes counted
    if what == "swap()":                                        # in, then back, call by call
        return EMA(net, DECAY).swap, None
    if what == "average_parameters in+out":
        ema = EMA(net, DECAY)

        def round_trip():
            with ema.average_parameters():
                pass
        return round_trip, None
    if what in ("compiled step", "compiled foreach step"):
        import torch

        steps = compiled_steps(torch.Generator().manual_seed(0), n)
        return (steps.with_ema if what == "compiled step" else steps.with_foreach), None
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


def compiled_steps(g, n: int = 30):
    """The compiled step of issue 86 item 2 (the ratio gate's "compiled step", :data:`COMPILED`):
    ``torch.compile(fullgraph=True)`` of a parameter update (``_foreach_add_``) then the EMA's, ``n`` x
    4096 float32 (``bench/suite/test_bench_compile.py``'s quick scenario), each side its own parameters
    from the same start (``g``: their generator): ``with_ema`` calls ``ema.update()`` with the plan on the
    device (its plain case is written in the graph), ``with_foreach`` ``torch._foreach_lerp_`` over
    shadows of its own. Compiled at their first call (Inductor's C++: tens of seconds on 2 cores)."""
    import types

    import torch

    from fastema.torch import EMA

    ps = [torch.randn((4096,), generator=g) for _ in range(n)]
    model = torch.nn.Module()
    model.ps = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in ps])
    ours = list(model.parameters())
    theirs = [p.clone() for p in ps]
    shadows = [p.clone() for p in ps]
    direction = [torch.full_like(p, 1e-6) for p in ps]
    ema = EMA(model, DECAY, device_step=True)

    @torch.compile(fullgraph=True)
    def with_ema():
        with torch.no_grad():
            torch._foreach_add_(ours, direction)
            ema.update()

    @torch.compile(fullgraph=True)
    def with_foreach():
        with torch.no_grad():
            torch._foreach_add_(theirs, direction)
            torch._foreach_lerp_(shadows, theirs, 1 - DECAY)
    return types.SimpleNamespace(with_ema=with_ema, with_foreach=with_foreach, ema=ema, ours=ours,
                                 theirs=theirs, shadows=shadows)


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


def warm_updates(n_tensors: int) -> int:
    """Updates run right before a scenario's regions, instrumented and not counted. Code the scenarios
    share (the engine's driver, the launches) is specialised by CPython for the types of the scenario that
    ran it last, and CPython 3.11 specialises such a site again only after 53 misses and 16 more runs:
    after 3 calls, a scenario's regions ran those sites missing, and its count followed the scenario
    counted before it (stub-gpu TargetNetwork.update, 6 tensors: 87.3k alone with EMA.update, 91.8k
    among every scenario; EMA.update: 68.5k and 62.5k). 100 calls settle them: its steady state, what
    a training loop's update costs. At 3000 tensors a miss is under 0.1% of an update: 3."""
    return 100 if n_tensors <= 200 else 3
