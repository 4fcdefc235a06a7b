"""The plain update written in a compiled graph (``fastema.torch._face.lowered``) hands Dynamo the
average's own tensors (its shadow views, the copied buffers' destinations, the plan's counters) as
torch's compiled optimizers hand their state: guarded by identity and held by the graph as its
constants, not tensor inputs with a metadata guard each. Held here: they are the graph's constants;
a followed model whose shadow kept its memory compiles nothing again; a compiled step that outlives
its average keeps none of the average's memory alive; and the update still equals the eager one."""
import contextlib
import gc

import pytest
import torch
import torch._dynamo as dynamo
from models import mlp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastema.torch import EMA

pytestmark = pytest.mark.filterwarnings("ignore")


def _graphs():
    """A Dynamo backend that keeps each graph it is handed and runs it as it is."""
    kept = []

    def backend(gm, example_inputs):
        kept.append(gm)
        return gm.forward
    return kept, backend


def _step(held: dict):
    """A step that moves every parameter then updates the average, both read from ``held`` (the
    average is dropped from it in the last test)."""
    with torch.no_grad():
        torch._foreach_add_(list(held["model"].parameters()), 1e-3)
        held["ema"].update()


def test_the_averages_own_tensors_are_constants_of_the_graph_not_its_inputs():
    """The graph's inputs are the user's tensors alone; the average's views and counters are its
    constants, each the very tensor the average writes (before: one input each, 12 of the 18)."""
    model = mlp(8, 16, 4).append(nn.BatchNorm1d(4))
    held = {"model": model, "ema": EMA(model, 0.9, device_step=True)}
    kept, backend = _graphs()
    dynamo.reset()
    torch.compile(_step, backend=backend, fullgraph=True)(held)
    (gm,) = kept
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants = {id(getattr(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    tensors = list(model.parameters()) + list(model.buffers())
    assert len(inputs) == len(tensors), [n.name for n in inputs]
    lowered = held["ema"].compiled.lowered
    written = lowered.views + lowered.copies + lowered.plans["cpu"][:2]   # no debias: norms unread
    assert len(written) == 6 + 3 + 2                    # copies: 2 BatchNorm buffers and 1 int
    assert constants == {id(t) for t in written}


def test_a_followed_model_whose_shadow_kept_its_memory_compiles_nothing_again():
    """A parameter registered again (the same tensor) marks the model changed: the next compiled
    call runs the operator (one more graph), whose eager update follows the model and makes the
    lists again; the views found at the same memory are the same objects, so the first graph's
    guards hold again and nothing more compiles (new view objects failed their identity guard: a
    third graph)."""
    model = mlp(8, 16, 4).append(nn.BatchNorm1d(4))
    held = {"model": model, "ema": EMA(model, 0.9, device_step=True)}
    twin = EMA(model, 0.9, device_step=True)
    kept, backend = _graphs()
    dynamo.reset()
    step = torch.compile(_step, backend=backend, fullgraph=True)
    lowered = held["ema"].compiled.lowered
    views, copies = list(lowered.views), list(lowered.copies)
    assert len(copies) == 3                             # BatchNorm's two buffers and its int
    for i in range(6):
        if i == 2:
            model[0].weight = model[0].weight                  # registered again: followed
        step(held)
        twin.update()
    assert len(kept) == 2                               # the plain graph, then the operator's
    assert all(a is b for a, b in zip(lowered.views + lowered.copies, views + copies))
    ours, theirs = held["ema"].state_dict(), twin.state_dict()
    for part in ("averaged", "copied", "int_buffers"):
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in theirs[part]), part
    assert held["ema"].updates == twin.updates == 6


def _live_tensors_on(storage_at: int) -> list:
    """Every live plain tensor with memory at the address ``storage_at``."""
    return [o for o in gc.get_objects()
            if type(o) in (torch.Tensor, nn.Parameter) and o.layout == torch.strided
            and not o.is_meta and o.untyped_storage().nbytes()
            and o.untyped_storage().data_ptr() == storage_at]


def test_a_compiled_step_that_outlives_its_average_holds_none_of_its_memory():
    """The graph holds the average's views as constants; once the average is gone they are empty, so
    its shadow's memory goes with it (the step and its graph live on)."""
    model = mlp(8, 16, 4)
    held = {"model": model, "ema": EMA(model, 0.9, device_step=True)}
    kept, backend = _graphs()
    dynamo.reset()
    step = torch.compile(_step, backend=backend, fullgraph=True)
    step(held)
    lowered = held["ema"].compiled.lowered
    at = [lowered.views[0].untyped_storage().data_ptr(),           # the shadow's buffer
          lowered.plans["cpu"][0].untyped_storage().data_ptr()]    # the plan's counters
    del lowered
    assert all(_live_tensors_on(a) for a in at)         # the average's, while it lives
    del held["ema"]
    gc.collect()
    assert len(kept) == 1 and not any(_live_tensors_on(a) for a in at)
    held["ema"] = EMA(model, 0.9, device_step=True)     # a new average: the step compiles again
    step(held)                                          # (its guards held the old one's tensors)
    assert len(kept) == 2 and held["ema"].updates == 1


class _SeesEveryOp(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _meta_flag():
    """The flag fake tensors' dispatch sets while it runs (a real tensor's op goes to its meta
    kernel)."""
    torch._C._set_meta_in_tls_dispatch_include(True)
    try:
        yield
    finally:
        torch._C._set_meta_in_tls_dispatch_include(False)


@pytest.mark.parametrize("inside", ["a fake-tensor mode", "its meta flag", "a dispatch mode",
                                    "a functional mode", "a torch function mode"])
def test_an_average_collected_inside_a_compile_still_lets_its_memory_go(inside):
    """The garbage collector empties a dead average's tensors wherever a collection lands: inside a
    compile, under fake tensors' dispatch (where ``set_()`` of a real tensor raised and nothing was
    emptied), a functionalization or a user's mode, whose ``__torch_dispatch__`` sees none of it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    model = mlp(8, 16, 4)
    held = {"model": model, "ema": EMA(model, 0.9, device_step=True)}
    kept, backend = _graphs()
    dynamo.reset()
    torch.compile(_step, backend=backend, fullgraph=True)(held)
    at = held["ema"].compiled.lowered.views[0].untyped_storage().data_ptr()
    del held["ema"]
    mode = {"a fake-tensor mode": FakeTensorMode, "its meta flag": _meta_flag,
            "a dispatch mode": _SeesEveryOp, "a functional mode": FunctionalTensorMode,
            "a torch function mode": TorchFunctionMode}[inside]()
    with mode:
        gc.collect()
    assert len(kept) == 1 and not _live_tensors_on(at)
    assert getattr(mode, "ops", []) == []


def test_a_sweep_of_averages_under_one_compiled_function_runs_with_a_reset_between_trials():
    """The guide's advice, checked (not a property of the change: it held before too): each new
    average compiles the function again, as a new compiled optimizer does, and Dynamo's recompile
    limit counts the graphs of averages that are gone (with ``fullgraph=True`` the limit raises);
    ``torch.compiler.reset()`` between trials keeps a sweep past it compiled and right. The limit
    is 2 here (8 by default: the same counting, 4 trials instead of 10)."""
    model = mlp(8, 16, 4)
    held = {"model": model}
    kept, backend = _graphs()
    step = torch.compile(_step, backend=backend, fullgraph=True)
    with dynamo.config.patch(recompile_limit=2):
        torch.compiler.reset()
        for trial in range(3):                          # no reset: the third average is refused
            held["ema"] = EMA(model, 0.9, device_step=True)
            if trial < 2:
                step(held)
            else:
                with pytest.raises(dynamo.exc.FailOnRecompileLimitHit):
                    step(held)
            del held["ema"]
        for trial in range(4):
            torch.compiler.reset()
            held["ema"] = ema = EMA(model, 0.9, device_step=True)
            twin = EMA(model, 0.9, device_step=True)
            for _ in range(2):
                step(held)
                twin.update()
            assert ema.updates == twin.updates == 2
            ours, theirs = ema.state_dict()["averaged"], twin.state_dict()["averaged"]
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
            del held["ema"], ema, twin
    assert len(kept) == 2 + 4
