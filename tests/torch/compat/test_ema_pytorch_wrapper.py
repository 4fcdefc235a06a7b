"""ema-pytorch 0.8.3's additions in ``fastema.torch.compat``: ``EMAPytree`` (the EMA of a tensor
or a tree of tensors, what ``EMA(tree)`` makes) and ``EMAModuleWrapper`` (EMA outputs routed into
the online model), side by side with ema_pytorch itself over real training loops."""
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from reference import no_host_reads
from torch import nn

from fastema.torch import compat

ema_pytorch = pytest.importorskip("ema_pytorch")

ROOT = pathlib.Path(__file__).parents[3]


# ------------------------------------------------------------------------------------ tensor trees

def _tree(seed=0):
    """A tiny functional MLP (6 -> 10 -> 1) as a nested tree: dict / list / tuple of tensors that
    require grad, and a non-tensor leaf."""
    g = torch.Generator().manual_seed(seed)
    return {"layers": [{"w": torch.randn(6, 10, generator=g) * 0.4, "b": torch.zeros(10)},
                       (torch.randn(10, 1, generator=g) * 0.3, torch.zeros(1))],
            "scale": 1.0}


def _grad_tree(tree):
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if torch.is_tensor(leaf):
            leaf.requires_grad_(True)
    return tree


def _forward(tree, x):
    h = torch.tanh(x @ tree["layers"][0]["w"] + tree["layers"][0]["b"])
    w2, b2 = tree["layers"][1]
    return (h @ w2 + b2) * tree["scale"]


def _train_tree(trees, steps, each, out_of_place=False, seed=1):
    """The same real loop (forward, MSE, backward, SGD with momentum-free steps) on identical
    trees; ``out_of_place``: each step writes new tensors into the tree (a functional loop),
    else the tensors are updated in place. ``each(i)`` after every step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 6, generator=g)
    y = x.sum(1, keepdim=True).sin()
    for i in range(steps):
        b = torch.randint(0, 128, (16,), generator=g)
        for tree in trees:
            leaves = [leaf for leaf in _leaves(tree) if leaf.is_floating_point()]
            loss = F.mse_loss(_forward(tree, x[b]), y[b])
            grads = torch.autograd.grad(loss, leaves)
            if out_of_place:
                new = iter([(p - 0.1 * g_).detach().requires_grad_() for p, g_ in zip(leaves, grads)])
                tree["layers"][0] = {"w": next(new), "b": next(new)}
                tree["layers"][1] = (next(new), next(new))
            else:
                with torch.no_grad():
                    for p, g_ in zip(leaves, grads):
                        p.sub_(0.1 * g_)
        each(i)


def _leaves(tree):
    return [leaf for leaf in torch.utils._pytree.tree_leaves(tree) if torch.is_tensor(leaf)]


def _equal_trees(a, b):
    assert torch.utils._pytree.tree_structure(a) == torch.utils._pytree.tree_structure(b)
    for x, y in zip(_leaves(a), _leaves(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kw, steps, out_of_place", [
    (dict(), 130, False),                                             # ema-pytorch's defaults (100, every 10)
    (dict(beta=0.95, update_after_step=5, update_every=3, power=3 / 4, min_value=0.1), 40, True),
])
def test_tree_ema_equals_ema_pytorch_over_a_training_loop(kw, steps, out_of_place):
    theirs_tree, ours_tree = _grad_tree(_tree()), _grad_tree(_tree())
    theirs = ema_pytorch.EMA(theirs_tree, **kw)
    ours = compat.EMA(ours_tree, **kw)
    assert type(ours) is compat.EMAPytree and compat.EMATensor is compat.EMAPytree

    def each(i):
        theirs.update()
        ours.update()
        _equal_trees(ours.ema_model, theirs.ema_model)

    _train_tree([theirs_tree, ours_tree], steps, each, out_of_place)
    assert int(ours.step) == int(theirs.step) == steps and bool(ours.initted)
    assert ours.get_current_decay() == theirs.get_current_decay()
    assert ours() is ours.ema_pytree and ours.pytree is ours_tree
    assert not any(leaf.requires_grad for leaf in _leaves(ours.ema_pytree))
    assert not torch.equal(_leaves(ours.ema_pytree)[0], _leaves(ours_tree)[0])      # it averaged


def test_tree_ema_against_a_float64_reference_with_integer_leaves():
    """ema-pytorch's lerp fails on an integer leaf; here it is copied at each due update and the
    floating leaves follow the float64 EMA with ema-pytorch's warm-up."""
    beta, after, every, power = 0.9, 3, 2, 0.75
    tree = _grad_tree(_tree())
    tree["count"] = torch.tensor(0)
    ema = compat.EMA(tree, beta=beta, update_after_step=after, update_every=every, power=power)
    ref = [leaf.detach().double().clone() for leaf in _leaves(tree)[:-1]]
    count = [0]

    def each(s):
        tree["count"] += 1
        ema.update()
        now = [leaf.detach().double() for leaf in _leaves(tree)[:-1]]
        if s == 0 or (s % every == 0 and s <= after):
            ref[:] = [t.clone() for t in now]
            count[0] = s + 1
        elif s % every == 0:
            decay = min(beta, 1 - (1 + (s - after)) ** -power)
            ref[:] = [decay * r + (1 - decay) * t for r, t in zip(ref, now)]
            count[0] = s + 1
        for got, want in zip(_leaves(ema.ema_pytree)[:-1], ref):
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
        assert int(ema.ema_pytree["count"]) == count[0]

    _train_tree([tree], 25, each)


def test_tree_state_dict_round_trip_resumes_bit_exactly_and_interchanges_with_ema_pytorch():
    kw = dict(beta=0.9, update_after_step=2, update_every=1)
    trees = [_grad_tree(_tree()), _grad_tree(_tree())]
    ours = compat.EMA(trees[0], **kw)
    _train_tree(trees[:1], 12, lambda i: ours.update())
    sd = ours.state_dict()
    assert list(sd) == ["initted", "step", "ema_pytree.layers.0.w", "ema_pytree.layers.0.b", "ema_pytree.layers.1.0",
                        "ema_pytree.layers.1.1"]
    with torch.no_grad():                                   # the resumed run starts from the same weights
        for a, b in zip(_leaves(trees[1]), _leaves(trees[0])):
            a.copy_(b)
    resumed = compat.EMA(trees[1], **kw)
    resumed.load_state_dict(sd)
    _equal_trees(resumed.ema_pytree, ours.ema_pytree)
    assert int(resumed.step) == 12
    _train_tree(trees, 8, lambda i: (ours.update(), resumed.update()), seed=2)
    _equal_trees(resumed.ema_pytree, ours.ema_pytree)

    theirs = ema_pytorch.EMA(_grad_tree(_tree()), **kw)
    theirs.update()
    theirs.update()
    fresh = compat.EMA(_grad_tree(_tree(seed=3)), **kw)
    before = [t.clone() for t in fresh.state_dict().values()]
    with pytest.raises(RuntimeError, match="saves only initted and step.*strict=False"):
        fresh.load_state_dict(theirs.state_dict())              # no average in it: nothing loaded
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.state_dict().values()))
    fresh.load_state_dict(theirs.state_dict(), strict=False)   # the counters; the average kept
    assert int(fresh.step) == 2 and bool(fresh.initted)
    assert all(torch.equal(a, b) for a, b in zip(before[2:], list(fresh.state_dict().values())[2:]))
    theirs.load_state_dict(ours.state_dict(), strict=False)    # ours into ema-pytorch's: the counters
    assert int(theirs.step) == int(ours.step)


def test_tree_refusals_name_the_problem_and_change_nothing():
    tree = _grad_tree(_tree())
    ema = compat.EMA(tree, beta=0.9, update_after_step=0, update_every=1)
    for _ in range(3):
        ema.update()
    with torch.no_grad():
        tree["layers"][0]["w"].add_(1.0)

    def state():
        return [t.clone() for t in ema.state_dict().values()]

    before = state()
    w, extra = tree["layers"][0]["w"], torch.zeros(10)
    for change, undo, message in [
        (lambda: tree.update(extra=extra), lambda: tree.pop("extra"),
         r"structure of pytree changed since the EMA was made \(gone: \[\]; new: \['ema_pytree.extra'\]\)"),
        (lambda: tree.update(layers=tuple(tree["layers"])), lambda: tree.update(layers=list(tree["layers"])),
         "the same paths in other containers"),
        (lambda: tree["layers"][0].update(w=torch.zeros(5, 10)), lambda: tree["layers"][0].update(w=w),
         r"ema_pytree.layers.0.w has shape \(5, 10\) but its EMA copy \(6, 10\)"),
        (lambda: tree["layers"][0].update(w=0.5), lambda: tree["layers"][0].update(w=w), "is a float, not a tensor"),
    ]:
        change()
        with pytest.raises(ValueError, match=message):
            ema.update()
        with pytest.raises(ValueError, match=message):
            ema.copy_params_from_pytree_to_ema()
        undo()
        assert all(torch.equal(a, b) for a, b in zip(before, state()))
    bad = ema.state_dict()
    bad["ema_pytree.layers.1.0"] = torch.zeros(3, 1)
    with pytest.raises(RuntimeError, match=r"size mismatch for ema_pytree.layers.1.0"):
        ema.load_state_dict(bad)
    bad = ema.state_dict()
    bad["step"] = torch.tensor(99)
    bad["ema_pytree.other"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ema.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, state()))

    with pytest.raises(ValueError, match="no tensor to average"):
        compat.EMA({"a": 1.0, "b": [2]})
    with pytest.raises(TypeError, match="use fastema.torch.compat.EMA\\(model\\)"):
        compat.EMAPytree(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ema_pytree= does not match pytree"):
        compat.EMA({"a": torch.zeros(2)}, ema_pytree={"a": torch.zeros(3)})  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="same state_dict key 'ema_pytree.a.b'"):
        compat.EMA({"a.b": torch.zeros(2), "a": {"b": torch.zeros(2)}})
    with pytest.raises(ValueError, match="beta"):
        compat.EMA(torch.zeros(2), beta=1.5)
    with pytest.raises(TypeError, match="EMA\\(tree\\)"):
        compat.KarrasEMA({"a": torch.zeros(2)}, sigma_rel=0.1)


def test_a_bare_tensor_a_factory_the_kernels_and_no_host_read_per_update():
    x = torch.randn(5)
    made = compat.EMA(  # type: ignore[call-arg]
        model=x, ema_pytree=lambda: torch.zeros(5), beta=0.5, update_after_step=0, update_every=1,
        inv_gamma=1e-6)                   # the decay is beta from the first update on
    assert list(made.state_dict()) == ["initted", "step", "ema_pytree"] and torch.equal(made(), torch.zeros(5))
    made.update()
    assert torch.equal(made(), x)
    x.add_(2.0)
    with no_host_reads(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "lerp_", None)                  # fastema's kernels average, not torch
        for _ in range(3):
            made.update()
    torch.testing.assert_close(made(), x - 2.0 * 0.5 ** 3)


# ------------------------------------------------------------------------------------ EMAModuleWrapper

class Block(nn.Module):
    """ema-pytorch's README block: predicts the EMA output it receives (cosine loss)."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    def forward(self, x, ema_output=None):
        h = F.relu(self.net(x))
        if ema_output is None:
            return h, self.zero
        if isinstance(ema_output, tuple):
            ema_output, _ = ema_output
        return h, 1.0 - F.cosine_similarity(self.proj(h), ema_output, dim=-1).mean()


class Branch(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block1, self.block2 = Block(dim), Block(dim)

    def forward(self, x):
        x, loss1 = self.block1(x)
        x, loss2 = self.block2(x)
        return x, loss1 + loss2


class Nested(nn.Module):
    def __init__(self, dim=8, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.branch_a, self.branch_b = Branch(dim), Branch(dim)

    def forward(self, x):
        h_a, loss_a = self.branch_a(x)
        h_b, loss_b = self.branch_b(h_a)
        return h_b, loss_a + loss_b


ROUTES = {"branch_a.block1": "branch_b.block1",                                  # a path: its EMA output
          "branch_a.block2": {"ema_module_path": "branch_b.block2", "ema_kwarg": "ema_output",
                              "transform": lambda out: out[0] * 2.0}}


@pytest.mark.parametrize("two_views", [False, True])
def test_module_wrapper_equals_ema_pytorch_over_a_training_loop(two_views):
    kw = dict(beta=0.9, update_after_step=3, update_every=2)
    nets = [Nested(), Nested()]
    theirs = ema_pytorch.EMAModuleWrapper(nets[0], ema_module_kwargs=ROUTES, **kw)
    ours = compat.EMAModuleWrapper(nets[1], ema_module_kwargs=ROUTES, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2) for n in nets]
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        x = torch.randn(4, 8, generator=g)
        view = dict(ema_args=x + 0.1 * torch.randn(4, 8, generator=g)) if two_views else {}
        losses = []
        for wrapper, opt in ((theirs, opts[0]), (ours, opts[1])):
            out, loss = wrapper(x, **view)
            (out.pow(2).mean() + loss).backward()
            opt.step()
            opt.zero_grad()
            wrapper.update()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1]) and losses[1] > 0            # the routes carried EMA outputs
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(4, 8)
    nets[0].eval(), nets[1].eval()                                           # not training: the EMA copy's output
    assert torch.equal(ours(x)[0], theirs(x)[0]) and torch.equal(ours(x)[0], ours.ema_model(x)[0])
    assert torch.equal(ours.forward_eval(x)[0], theirs.forward_eval(x)[0])
    assert torch.equal(ours(x, only_online=True)[0], nets[1](x)[0])
    resumed = compat.EMAModuleWrapper(Nested(seed=5), ema_module_kwargs=ROUTES, **kw)
    resumed.load_state_dict(theirs.state_dict())                              # their checkpoint resumes ours
    assert resumed.ema.get_current_decay() == theirs.ema.get_current_decay()
    assert torch.equal(resumed.ema_model(x)[0], theirs.ema_model(x)[0])


def test_module_wrapper_refusals_leave_no_hook_behind():
    net = Nested()

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())

    for routes, error, message in [
        ({"branch_a.block1": "branch_b.block1", "branch_a.nope": "branch_b.block2"}, ValueError,
         "'branch_a.nope' is not a submodule"),
        ({"branch_a.block1": "branch_b.block1", "branch_a.block2": ("branch_b.block2", "teacher")}, ValueError,
         "no forward keyword argument 'teacher'"),
        ({"branch_a.block1": 3}, TypeError, "ema_module_kwargs\\['branch_a.block1'\\] is a int"),
    ]:
        with pytest.raises(error, match=message):
            compat.EMAModuleWrapper(net, ema_module_kwargs=routes)
        assert hooks() == 0
    ema = compat.EMA(net)
    with pytest.raises(ValueError, match="got ema= and EMA arguments \\['beta'\\]"):
        compat.EMAModuleWrapper(net, ema=ema, beta=0.9)
    with pytest.raises(TypeError, match="must be a fastema.torch.compat.EMA"):
        compat.EMAModuleWrapper(net, ema=ema_pytorch.EMA(net))
    with pytest.raises(ValueError, match="averages another model"):
        compat.EMAModuleWrapper(Nested(), ema=ema)
    wrapper = compat.EMAModuleWrapper(net, ema=ema, ema_module_kwargs=["branch_a.block1"])
    with pytest.raises(ValueError, match="only_online=True and only_ema=True"):
        wrapper(torch.randn(2, 8), only_online=True, only_ema=True)
    wrapper.remove_ema_module_hooks()
    assert hooks() == 0


def test_module_wrapper_with_a_lazy_ema_hooks_its_routes_at_the_first_update():
    eager, lazy = (compat.EMAModuleWrapper(Nested(), ema_module_kwargs=ROUTES, lazy_init_ema=lazy)
                   for lazy in (False, True))
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="call update\\(\\) once first"):
        lazy(x)
    # every other way to the EMA copy says the same before it is made (was: 'NoneType' object is
    # not callable / has no attribute)
    calls = [lambda: lazy(x, only_ema=True), lambda: lazy.forward_eval(x), lazy.eval, lambda: lazy.ema(x),
             lazy.ema.copy_params_from_ema_to_model, lazy.ema.update_model_with_ema,
             lambda: list(lazy.ema.iter_all_ema_params_and_buffers())]
    for call in calls:
        with pytest.raises(RuntimeError, match="not made yet.*call update\\(\\) once first"):
            call()
    lazy.model.eval()                            # not training: the forward is the EMA copy's
    with pytest.raises(RuntimeError, match="not made yet"):
        lazy(x)
    lazy.model.train()
    eager.update(), lazy.update()
    assert torch.equal(lazy(x)[1], eager(x)[1]) and lazy(x)[1] > 0


def test_the_migrating_guide_example_runs(capsys):
    text = (ROOT / "docs" / "guides" / "migrating.md").read_text()
    block = re.search(r"## ema-pytorch 0\.8\.3.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "guides/migrating.md", "exec"), {})
    out = capsys.readouterr().out
    assert "EMAPytree ['initted', 'step', 'ema_pytree.w', 'ema_pytree.b']" in out and "routed loss" in out


def test_a_tensor_tied_at_two_places_of_the_tree_is_averaged_once():
    """ema-pytorch's loop lerps a shared leaf twice per update (2.5 below); the EMA is 2.0."""
    results = []
    for make in (ema_pytorch.EMA, compat.EMA):
        t = torch.ones(3)
        ema = make({"a": t, "tied": [t]}, beta=0.5, update_after_step=0, update_every=1, inv_gamma=1e-6)
        ema.update()
        t.fill_(3.0)
        ema.update()
        results.append(ema()["a"])
    assert torch.equal(results[0], torch.full((3,), 2.5))                    # ema-pytorch: averaged twice
    assert torch.equal(results[1], torch.full((3,), 0.5 * 1.0 + 0.5 * 3.0))  # here: the EMA


def test_every_attribute_of_ema_pytorchs_classes_is_here():
    def public(obj):
        return {n for n in dir(obj) if not n.startswith("__")}

    tree, net = {"a": torch.zeros(2)}, Nested()
    for theirs, ours in [(ema_pytorch.EMA(tree), compat.EMA(tree)), (ema_pytorch.EMA(net), compat.EMA(net)),
                         (ema_pytorch.KarrasEMA(net, sigma_rel=0.1), compat.KarrasEMA(net, sigma_rel=0.1)),
                         (ema_pytorch.EMAModuleWrapper(net, ema_module_kwargs=["branch_a.block1"]),
                          compat.EMAModuleWrapper(net, ema_module_kwargs=["branch_a.block1"]))]:
        assert public(theirs) - public(ours) == set(), type(ours).__name__
    a, b = torch.zeros(3), torch.ones(3, dtype=torch.float64)
    compat.EMA(tree, coerce_dtype=True).inplace_lerp(a, b, 0.25)               # ema-pytorch's helper, as there
    assert torch.equal(a, torch.full((3,), 0.25))


def test_a_lazy_ema_that_loaded_its_counters_makes_its_copy_at_the_first_update():
    """``lazy_init_ema=True`` and a state dict's counters loaded (``initted=True``, ``strict=False``):
    the first update still makes the EMA copy, from the model (it failed with an AttributeError,
    as in ema-pytorch)."""
    model = nn.Linear(4, 3)
    eager = compat.EMA(model, beta=0.9, update_after_step=0, update_every=1)
    for _ in range(3):
        eager.update()
    lazy = compat.EMA(model, beta=0.9, update_after_step=0, update_every=1, lazy_init_ema=True)
    lazy.load_state_dict({"initted": eager.initted.clone(), "step": eager.step.clone()}, strict=False)
    lazy.update()
    assert lazy.ema_model is not None and int(lazy.step) == 4
    for a, p in zip(lazy.ema_model.parameters(), model.parameters()):
        assert torch.equal(a, p)


def test_an_ema_pytree_on_another_device_is_taken_with_allow_different_devices():
    """EMAPytree read allow_different_devices before setting it: an ema_pytree= on another device
    than the tree raised AttributeError whatever the flag said. With the flag it is averaged there
    (the source moved to it, as ema-pytorch's inplace_lerp does); without it, refused by name."""
    tree = {"w": torch.randn(2, 2), "b": torch.randn(2)}

    def on_meta():
        return {"w": torch.zeros(2, 2, device="meta"), "b": torch.zeros(2, device="meta")}

    ema = compat.EMAPytree(tree, ema_pytree=on_meta(), allow_different_devices=True, update_after_step=0,
                           update_every=1)
    ema.update()
    ema.update()
    assert ema.ema_pytree["w"].device.type == "meta" and ema.step.item() == 2
    with pytest.raises(ValueError, match="ema_pytree.w: the EMA copy is on meta .*allow_different_devices=True"):
        compat.EMAPytree(tree, ema_pytree=on_meta())
