"""fastema.torchtitan.EMA reads the model's own tensors (issue 85 H1): ``p.data = ...`` is followed, as
fastema.torch.EMA follows it; a tracked name that holds another object (a new ``nn.Parameter``, a
re-assigned matched buffer), another dtype (``model.to(torch.float64)``) or nothing is refused by name at
the next firing, writing nothing. The invariant by construction (issue 85 item 3): the shadow's sources
are the model's tensors themselves, never an alias the face made (at run time here, and from the AST:
every ``Tracked``'s local tensor). The FSDP2 half (a DTensor's new local tensor followed): test_titan_manager.py.
Imports no torchtitan."""
import ast
import pathlib

import pytest
import torch
from torch import nn

from fastema.torchtitan import EMA

ROOT = pathlib.Path(__file__).parents[2]


def _built(offload=False):
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    m.register_buffer("stat", torch.zeros(4))
    return m, EMA.Config(decays=[0.5], buffer_patterns=["stat$"], offload_to_cpu=offload).build(model_parts=[m])


@pytest.mark.parametrize("offload", [False, True])
def test_a_parameter_whose_data_is_replaced_is_followed(offload):
    """The reliability check's case: ``.data`` replaced, then the new memory trained; the copy moves by half
    the step (decay 0.5), as a float64 lerp of the live weight (a2c5924's moved by 0: it read the old memory)."""
    m, ema = _built(offload)
    start = m.weight.detach().double().clone()
    m.weight.data = m.weight.data.clone()
    with torch.no_grad():
        m.weight.add_(8)
        m.stat.add_(2)
    ema.step(1)
    torch.testing.assert_close(ema.shadow.view("weight", 0).double(), start + 4, rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.shadow.view("stat", 0), torch.ones(4), rtol=0, atol=0)
    sources = list(ema.shadow.sources)
    assert [s is t for s, t in zip(sources, (m.weight, m.bias, m.stat))] == [True] * 3


def _new_parameter(m):
    m.weight = nn.Parameter(m.weight.detach() + 8)


def _new_buffer(m):
    m.stat = torch.full((4,), 2.0)


def _deleted(m):
    del m.bias


@pytest.mark.parametrize("change, match", [
    (_new_parameter, r"'weight' holds another parameter object than the one this EMA was built on \(a new "
                     r"nn.Parameter"),
    (lambda m: m.to(torch.float64), r"'weight' is torch.float64 now, torch.float32 when this EMA was built "
                                    r"\(model.to\(\), a dtype cast\); 'bias' is torch.float64 now"),
    (_new_buffer, r"'stat' holds another buffer object than the one this EMA was built on \(module.<name> = "
                  r"tensor\): the EMA would go on averaging the old one"),
    (_deleted, r"the parameter 'bias' is gone from the model"),
])
def test_a_tracked_name_that_holds_another_tensor_is_refused_by_name_at_the_next_firing(change, match):
    m, ema = _built()
    before = [ema.shadow.view(n, 0).clone() for n in ("weight", "bias", "stat")]
    change(m)
    ema.step(0)                                        # no firing: nothing read, nothing refused
    with pytest.raises(ValueError, match=r"^EMA.step\(\): .*" + match + r".*Build a new EMA of the model as it "
                                         r"is .* Nothing was updated.$"):
        ema.step(1)
    with pytest.raises(ValueError, match=match):
        ema.step(torch.ones((), dtype=torch.int64))     # the device step, too
    with pytest.raises(ValueError, match=match):        # a cold start reads the model
        ema.load_state_dict({})
    assert all(torch.equal(ema.shadow.view(n, 0), b) for n, b in zip(("weight", "bias", "stat"), before))


def test_a_submodule_wrapped_after_the_build_holding_the_same_tensors_is_followed():
    """The slots are found again by canonical name: activation checkpointing's wrapper segment added after
    the build (the same parameter objects under ``_checkpoint_wrapped_module``) is the same model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    outer = nn.Module()
    outer.block = nn.Linear(4, 4)
    ema = EMA.Config(decays=[0.5]).build(model_parts=[outer])
    start = outer.block.weight.detach().clone()
    outer.block = checkpoint_wrapper(outer.block)
    with torch.no_grad():
        outer.block.weight.add_(2)
    ema.step(1)
    torch.testing.assert_close(ema.shadow.view("block.weight", 0), start + 1, rtol=0, atol=1e-6)


def test_the_shadow_reads_the_models_tensors_never_an_alias_of_the_faces():
    """At run time: every source of the shadow is the model's parameter or buffer object itself (whole
    tensors, a given layout's plain local shard, the offloaded shadow's); fastema.torch.EMA's too."""
    from fastema.torch import EMA as TorchEMA

    for offload in (False, True):
        m, ema = _built(offload)
        assert all(s is t.tensor is t.local for s, t in zip(ema.shadow.sources, ema.tracked))
        assert [t.tensor for t in ema.tracked] == [m.weight, m.bias, m.stat]
    m = nn.Linear(4, 4)
    torch_ema = TorchEMA(m, 0.9)
    assert all(s is p for s, p in zip(torch_ema._side.avg.sources, (m.weight, m.bias)))


ALIASING = {"detach", "to_local", "view", "view_as", "reshape", "flatten", "unflatten", "narrow", "contiguous",
            "clone", "to", "as_strided", "expand", "expand_as", "squeeze", "unsqueeze", "t", "transpose",
            "permute", "select", "chunk", "split", "unbind", "detach_", "full_tensor"}


def _made_aliases(source: str) -> list[str]:
    """Where a ``Tracked(...)`` (or ``._replace(local=...)``) gets a local tensor the face made: a call of an
    aliasing method, an index or ``.data``, in the argument or in what its names were assigned in the
    enclosing function."""
    tree = ast.parse(source)
    bad = []

    def made(expr: ast.AST, fn: ast.AST | None, depth: int = 0) -> bool:
        for node in ast.walk(expr):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ALIASING:
                return True
            if isinstance(node, ast.Subscript) or (isinstance(node, ast.Attribute) and node.attr == "data"):
                return True
            if isinstance(node, ast.Name) and fn is not None and depth < 4:
                for a in ast.walk(fn):
                    if isinstance(a, ast.Assign) and any(isinstance(x, ast.Name) and x.id == node.id
                                                         for x in a.targets):
                        if made(a.value, fn, depth + 1):
                            return True
        return False

    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            args = [k.value for k in node.keywords if k.arg == "local"]
            if name == "Tracked" and len(node.args) > 2:
                args.append(node.args[2])
            if name in ("Tracked", "_replace") and any(made(a, fn) for a in args):
                bad.append(f"{fn.name}:{node.lineno}")
    return sorted(bad)


def test_no_tracked_local_tensor_is_an_alias_the_face_made():
    """From the AST of every module of fastema.torchtitan: a ``Tracked``'s local tensor is never a
    ``.detach()``, ``to_local()``, view or index the face made of the model's tensor; and the rule sees the
    forms a2c5924 used."""
    sources = {p.name: p.read_text() for p in sorted((ROOT / "fastema" / "torchtitan").glob("*.py"))}
    assert sum(s.count("Tracked(") for s in sources.values()) >= 2
    assert {n: _made_aliases(s) for n, s in sources.items() if _made_aliases(s)} == {}
    old = """
def _tracked(fqn, t, given):
    if isinstance(t, DTensor):
        local = t.to_local().detach()
        return Tracked(fqn, t, local, layout)
    return Tracked(fqn, t, t.detach(), None)

def follow(t, held):
    return t._replace(local=held.data[0])
"""
    assert _made_aliases(old) == ["_tracked:5", "_tracked:6", "follow:9"]
