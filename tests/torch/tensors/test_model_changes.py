"""fastema.torch.EMA and the model it averages: tied weights, wrappers, aliased buffers, and
parameters or modules replaced, reshaped or moved after EMA(model), with or without the
registration hooks: followed, or refused by name with nothing changed.

The defect IDs in the comments are those of the first reliability review (H, M, L)."""
import os

import pytest
import torch
from models import mlp, moved, tied
from torch import nn

from fastema.torch import EMA, WindowAverage

# ------------------------------------------------------------------ new layers, new tensors, moved or cast

def test_model_changed_after_ema_is_refused_and_nothing_changes():
    model = mlp(6, 32, 1, act=nn.Tanh)
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
    model[0] = nn.Linear(6, 16)                       # a new layer with other shapes
    with pytest.raises(ValueError, match="make a new"):
        ema.update()
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict()["averaged"].items())


def test_assign_load_is_followed():
    model = mlp(6, 32, 1, act=nn.Tanh)
    ema = EMA(model, 0.0)
    new = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)          # new Parameter objects
    ema.update()
    assert all((v == 3.0).all() for v in ema.state_dict()["averaged"].values())


@pytest.mark.parametrize("swap", [False, True], ids=["data assigned", "tensors swapped"])
def test_model_moved_or_cast_is_refused(swap):
    model = mlp(6, 32, 1, act=nn.Tanh)
    ema = EMA(model, 0.9)
    before = ema.state_dict()["averaged"]["0.weight"].clone()
    weight = model[0].weight
    torch.__future__.set_swap_module_params_on_conversion(swap)   # torch.utils.swap_tensors:
    try:                                           # the same Parameter objects, other TensorImpls
        model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert model[0].weight is weight
    with pytest.raises((ValueError, TypeError), match="float64"):
        ema.update()
    assert torch.equal(ema.state_dict()["averaged"]["0.weight"], before)


# reliability round 3, M4: a tensor added after EMA(model) is refused by name at the next update and at
# every export or swap (it would be left out of the average and exported raw); nothing is written

ADDED = {"module": lambda m: m.add_module("extra", nn.Linear(2, 2)),
         "parameter": lambda m: m[0].register_parameter("scale", nn.Parameter(torch.ones(3))),
         "buffer": lambda m: m[0].register_buffer("mask", torch.ones(3)),
         "replaced_by_a_layer": lambda m: m.__setitem__(1, nn.Linear(32, 32)),     # Tanh (no tensors) -> Linear
         # no hook is called: seen by the per-step check, as the dict holds tracked tensors (issue 25, 2nd pass)
         "written_into_parameters": lambda m: m[0]._parameters.__setitem__("scale", nn.Parameter(torch.ones(3)))}


@pytest.mark.parametrize("hooks", [True, False])
@pytest.mark.parametrize("change", sorted(ADDED))
def test_a_tensor_added_after_ema_is_refused_everywhere_and_nothing_changes(change, hooks, tmp_path):
    import fastema.torch as ft
    from fastema.torch import PostHocEMA

    ft.registration_hooks(hooks)
    try:
        model = mlp(6, 32, 1, act=nn.Tanh)
        ema = EMA(model, 0.9)
        post = PostHocEMA(model, snapshot_every=None, path=tmp_path / "snapshots")
        ema.update()
        post.update()
        ADDED[change](model)
        moved_by_training = {k: v.detach().clone() for k, v in model.state_dict().items()}
        before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
        calls = (ema.calls, ema.updates, post.calls)
        other = mlp(6, 32, 1, act=nn.Tanh, seed=3)
        other_before = {k: v.clone() for k, v in other.state_dict().items()}
        ADDED[change](other)
        for what, call in [("update", ema.update), ("averaged_state_dict", ema.averaged_state_dict),
                           ("full_state_dict", ema.full_state_dict), ("module", ema.module),
                           ("save", lambda: ema.save(tmp_path / "ema.pt")),
                           ("save", lambda: ema.save(tmp_path / "ema.safetensors")),
                           ("swap", ema.swap), ("average_parameters", lambda: ema.average_parameters().__enter__()),
                           ("copy_to", ema.copy_to), ("copy_to(other)", lambda: ema.copy_to(other)),
                           ("PostHocEMA.update", post.update), ("PostHocEMA.snapshot", post.snapshot)]:
            with pytest.raises(ValueError, match=r"added after (EMA|PostHocEMA)\(model\).*'(extra\.weight|0\.scale|"
                                                 r"0\.mask|1\.weight)'.*exclude="):
                call()
        assert not ema.swapped and (ema.calls, ema.updates, post.calls) == calls
        assert all(torch.equal(v, before[k]) for k, v in ema.state_dict()["averaged"].items())
        assert all(torch.equal(v, moved_by_training[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(v, other_before[k]) for k, v in other.state_dict().items() if k in other_before)
        written = [f for f in os.listdir(tmp_path / "snapshots") if f != ".fastema-run"]  # a claim: no snapshot
        assert not written and not (tmp_path / "ema.pt").exists()
        assert not (tmp_path / "ema.safetensors").exists()
    finally:
        ft.registration_hooks(True)


@pytest.mark.parametrize("hooks", [True, False])
def test_added_tensors_that_are_excluded_ignored_or_aliases_are_fine(hooks):
    import fastema.torch as ft

    ft.registration_hooks(hooks)
    try:
        model = mlp(6, 32, 1, act=nn.Tanh)
        excluded, ignoring = EMA(model, 0.5, exclude=["extra.*"]), EMA(model, 0.5, buffers="ignore")
        model.add_module("extra", nn.Linear(2, 2))                    # excluded by the pattern
        model[0].register_buffer("cache", torch.ones(3), persistent=False)   # in no export: a copy is itself
        model.add_module("again", model[0])                           # new names of tracked tensors
        excluded.update()
        del model.extra
        model[0].register_buffer("mask", torch.ones(3))               # a buffer; ignoring ignores buffers
        ignoring.update()
        moved(ignoring, model)
        sd = ignoring.averaged_state_dict()
        assert torch.equal(sd["again.weight"], sd["0.weight"]) and torch.equal(sd["0.weight"],
                                                                              model[0].weight.detach() - 0.5)
    finally:
        ft.registration_hooks(True)


def test_an_added_tie_excluded_by_one_of_its_names_is_fine():
    """A tensor added under two names (a new head tied to a new embedding), excluded by its second
    name, was refused as untracked under its first: any of its names excludes it, as at construction."""
    model = mlp(6, 32, 1, act=nn.Tanh)
    ema = EMA(model, 0.5, exclude=["head.*"])
    model.add_module("extra", nn.Linear(2, 2, bias=False))
    model.add_module("head", nn.Linear(2, 2, bias=False))
    model.head.weight = model.extra.weight
    ema.update()                                                 # (refused before)
    assert "extra.weight" not in ema.state_dict()["averaged"]


def test_a_deleted_module_is_refused_with_or_without_hooks():
    model = mlp(6, 32, 1, act=nn.Tanh)
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
    del model[2]                                       # no registration hook fires for a deletion
    with pytest.raises(ValueError, match=r"no longer has \['2.weight', '2.bias'\]"):
        ema.update()
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict()["averaged"].items()) and ema.calls == 0


# ------------------------------------------------------------------ H1, M1: tied weights

def test_tied_weights_export_the_average_under_every_name(tmp_path):
    m = tied()
    ema = EMA(m, 0.5)
    moved(ema, m)
    average = m.emb.weight.detach() - 0.5
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["emb.weight"], average) and torch.equal(sd["head.weight"], average)
    ema.save(tmp_path / "ema.pt")
    m2 = tied()
    m2.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert torch.equal(m2.emb.weight, average)
    assert torch.equal(ema.module().emb.weight, average)
    other = tied()
    ema.copy_to(other)
    assert torch.equal(other.head.weight, average)


class _AliasBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("alias", self.lin.weight.data)          # the weight's memory under a buffer's name


UNTIE = {"tie, EMA": (tied, lambda m: EMA(m, 0.9), "head.weight", "emb.weight",
                      lambda m: setattr(m.head, "weight", nn.Parameter(m.emb.weight.detach().clone()))),
         "tie, WindowAverage": (tied, lambda m: WindowAverage(m, 2), "head.weight", "emb.weight",
                                lambda m: setattr(m.head, "weight", nn.Parameter(m.emb.weight.detach().clone()))),
         "alias, buffers=average": (_AliasBuffer, lambda m: EMA(m, 0.9, buffers="average"), "alias", "lin.weight",
                                    lambda m: setattr(m, "alias", m.alias.clone())),
         "alias, buffers=copy": (_AliasBuffer, lambda m: EMA(m, 0.9), "alias", "lin.weight",
                                 lambda m: setattr(m, "alias", m.alias.clone()))}


@pytest.mark.parametrize("case", sorted(UNTIE))
def test_a_tie_broken_after_construction_is_refused_by_name_and_nothing_changes(case):
    """The tie's second name was in the names known at construction, so no relook looked at it: updates
    went on and every export (average_parameters() too) carried its raw value as the average."""
    make, average_of, name, first, untie = UNTIE[case]
    model = make()
    avg = average_of(model)
    avg.update()
    untie(model)
    before, calls = {k: v.clone() for k, v in avg.state_dict()["averaged"].items()}, avg.calls
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for call in (avg.update, avg.averaged_state_dict, avg.module, lambda: avg.average_parameters().__enter__()):
        with pytest.raises(ValueError, match=rf"'{name}' no longer shares its memory with '{first}' \(untied after "
                                             rf"(EMA|WindowAverage)\(model\)\).*Make a new.*exclude='{name}'"):
            call()
    assert avg.calls == calls and not avg.swapped
    assert all(torch.equal(v, before[k]) for k, v in avg.state_dict()["averaged"].items())
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", [EMA, WindowAverage])
def test_two_tracked_parameters_tied_after_construction_are_named_as_tied_not_missing(kind):
    """The refusal said "the model no longer has ['1.weight']", a name the model still has."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    avg = kind(model, 0.9) if kind is EMA else kind(model, 2)
    before = {k: v.clone() for k, v in avg.state_dict()["averaged"].items()}
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=rf"'1.weight' now shares its memory with '0.weight' \(tied after "
                                         rf"{kind.__name__}\(model\)\).*make a new {kind.__name__}"):
        avg.update()
    assert all(torch.equal(v, before[k]) for k, v in avg.state_dict()["averaged"].items()) and avg.calls == 0


def test_a_tie_made_again_or_an_ignored_alias_untied_is_fine():
    model = tied()
    ema = EMA(model, 0.5)
    old = model.emb.weight.detach().double()
    model.emb.weight = nn.Parameter(model.emb.weight.detach() + 1)  # load_state_dict(assign=True), then tie_weights()
    model.head.weight = model.emb.weight
    ema.update()
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["head.weight"], sd["emb.weight"])
    assert torch.allclose(sd["head.weight"].double(), old + 0.5, rtol=0, atol=1e-6)
    model = _AliasBuffer()
    ignoring = EMA(model, 0.5, buffers="ignore")
    model.alias = model.alias.clone()                                # ignored buffers export the model's own
    ignoring.update()
    assert torch.equal(ignoring.averaged_state_dict()["alias"], model.alias)



@pytest.mark.parametrize("option", ["exclude", "copy"])
def test_an_alias_named_in_exclude_or_copy_may_be_untied(option):
    """An alias ``exclude=`` or ``copy=`` names exports the model's own value either way: untying it was
    refused, telling to exclude= the name already excluded. Updates go on; the export carries the model's
    value under that name and the average under the weight's."""
    model = _AliasBuffer()
    ema = EMA(model, 0.5, **{option: ("alias",)})
    ema.update()
    model.alias = model.alias.clone() + 1.0
    ema.update()
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["lin.weight"], model.lin.weight.detach())       # the weight did not move
    if option == "copy":
        assert torch.equal(sd["alias"], model.alias)
    else:
        assert "alias" not in sd or torch.equal(sd["alias"], model.alias)

# ------------------------------------------------------------------ H3, L6: replaced or reshaped parameters

@pytest.mark.parametrize("replace", ["meta", "parameters_dict", "overwrite_half"])
def test_parameters_replaced_without_hooks_are_followed_or_refused(replace):
    m = nn.Linear(64, 64)
    ema = EMA(m, 0.0)
    before = ema.state_dict()["averaged"]["weight"].clone()
    if replace == "parameters_dict":
        m._parameters["weight"] = nn.Parameter(torch.full((64, 64), 3.0))
        ema.update()                                    # followed: decay 0 copies the new tensor
        assert torch.equal(ema.averaged_state_dict()["weight"], torch.full((64, 64), 3.0))
        with ema.average_parameters():
            assert torch.equal(m.weight, torch.full((64, 64), 3.0))
        return
    if replace == "meta":
        m.to("meta")
        match = "meta"
    else:
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            m.half()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)
        match = "now float16"
    with pytest.raises((ValueError, TypeError), match=match):
        ema.update()
    assert torch.equal(ema.state_dict()["averaged"]["weight"], before)
    assert ema.calls == 0


def test_same_address_reshape_is_named_at_export_and_copy_out():
    m = nn.Linear(128, 32)
    ema = EMA(m, 0.5)
    m.weight.data = m.weight.data.view(128, 32)
    with pytest.raises(ValueError, match=r"source 'weight' was float32 \(32, 128\).*now float32 \(128, 32\)"):
        ema.averaged_state_dict()
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match="source 'weight'"):
        ema.copy_to()
    assert torch.equal(m.weight, before)


# ------------------------------------------------------------------ M2: wrappers named module

def test_a_submodule_named_module_is_not_a_wrapper():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)
            self.weight = nn.Parameter(torch.zeros(4))

    m = Wrapper()
    ema = EMA(m, 0.5)
    moved(ema, m)
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["module.weight"], m.module.weight.detach() - 0.5)
    assert torch.equal(sd["weight"], m.weight.detach() - 0.5) and sd["weight"].shape == (4,)
    ddp_like = ema.state_dict()
    assert {"module.weight", "weight", "head.weight"} <= set(ddp_like["averaged"])


# ------------------------------------------------------------------ M3: aliases

def test_a_buffer_viewing_a_parameter_is_swapped_once():
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1000))
            self.register_buffer("w_view", self.w.data)

    m = B()
    ema = EMA(m, 0.5)
    moved(ema, m)
    raw = m.w.detach().clone()
    with ema.average_parameters():
        assert torch.equal(m.w, raw - 0.5) and torch.equal(m.w_view, raw - 0.5)
    assert torch.equal(m.w, raw)
    assert torch.equal(ema.averaged_state_dict()["w_view"], raw - 0.5)


def test_a_buffer_viewing_part_of_a_parameter_is_refused():
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1000))
            self.register_buffer("part", self.w.data[:500])

    with pytest.raises(ValueError, match="share memory"):
        EMA(B(), 0.5)


# ------------------------------------------------------------------ without registration hooks (layout issue, item 6)


def test_without_registration_hooks_replaced_tensors_and_modules_are_still_followed():
    import fastema.torch as ft

    ft.registration_hooks(False)
    try:
        assert not ft._HOOKS
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        ema = EMA(m, 0.0)
        m[0].weight = nn.Parameter(torch.full((4, 4), 2.0))     # no hook fires: the identity check sees it
        ema.update()
        assert torch.equal(ema.averaged_state_dict()["0.weight"], torch.full((4, 4), 2.0))
        m[1] = nn.Linear(4, 4)                                   # a new submodule: the module check sees it
        with torch.no_grad():
            m[1].weight.fill_(5.0)
        ema.update()
        assert torch.equal(ema.averaged_state_dict()["1.weight"], torch.full((4, 4), 5.0))
    finally:
        ft.registration_hooks(True)
    assert len(ft._HOOKS) == 3
    with pytest.raises(TypeError, match="True or False"):
        ft.registration_hooks("no")
