"""The drop-ins that are module trees (timm's ``ModelEmaV3``; ema-pytorch's ``EMA``, ``KarrasEMA``,
``EMAModuleWrapper`` and ``PostHocEMA``) load all or nothing, as the migration guide says: what
torch's ``load_state_dict`` refuses (a shape, a value that is not a tensor, a missing or unexpected
key under ``strict``) is refused, in torch's words, before a tensor is written. torch copies key by
key and raises at the end: a refused load had changed the average, its counters, and with
ema-pytorch's ``include_online_model`` (its default) the user's own model."""
import warnings

import pytest
import torch
from torch import nn

from fastema.torch import compat


def _net(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, out))


MAKERS = {
    "timm ModelEmaV3": (lambda m, tmp: compat.ModelEmaV3(m, decay=0.9), lambda e, m: e.update(m)),
    "ema-pytorch EMA": (lambda m, tmp: compat.EMA(m, beta=0.9, update_after_step=0, update_every=1),
                        lambda e, m: e.update()),
    "ema-pytorch KarrasEMA": (lambda m, tmp: compat.KarrasEMA(m, sigma_rel=0.05, update_every=1),
                              lambda e, m: e.update()),
    "ema-pytorch EMAModuleWrapper": (lambda m, tmp: compat.EMAModuleWrapper(m), lambda e, m: e.update()),
    "ema-pytorch PostHocEMA": (lambda m, tmp: compat.PostHocEMA(m, sigma_rels=(0.05, 0.28), update_every=1,
                                                                checkpoint_folder=str(tmp / "posthoc")),
                               lambda e, m: e.update()),
}


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trained(name, tmp_path, out=3):
    make, update = MAKERS[name]
    model = _net(out)
    ema = make(model, tmp_path)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        update(ema, model)
    return model, ema


def _bad_states(name, tmp_path) -> dict:
    """State dicts torch refuses, from a trained twin's: another head, a value not a tensor, a key
    missing, a key more, a meta tensor."""
    _, twin = _trained(name, tmp_path / "twin")
    _, wider = _trained(name, tmp_path / "wider", out=5)
    good = twin.state_dict()
    first = next(k for k, v in good.items() if v.is_floating_point() and v.dim() > 0)
    return {"another head": (wider.state_dict(), "size mismatch for "),
            "not a tensor": ({**good, first: good[first].tolist()}, "expected torch.Tensor"),
            "a key missing": ({k: v for k, v in good.items() if k != first}, "Missing key"),
            "a key more": ({**good, "extra.weight": torch.zeros(2)}, "Unexpected key"),
            "a meta tensor": ({**good, first: torch.empty_like(good[first], device="meta")}, "meta tensor")}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_refused_load_changes_nothing_and_says_what_torch_says(name, tmp_path):
    model, ema = _trained(name, tmp_path / "ours")
    before, model_before = _state(ema), _state(model)
    for case, (state, said) in _bad_states(name, tmp_path).items():
        with pytest.raises(RuntimeError, match="Nothing was loaded") as refused:
            ema.load_state_dict(state)
        assert said in str(refused.value), (case, str(refused.value))
        assert _same(_state(ema), before) and _same(_state(model), model_before), case
    # and it goes on as before: an update moves it as a fresh twin's moves
    _, update = MAKERS[name]
    twin_model, twin = _trained(name, tmp_path / "again")
    for m in (model, twin_model):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5)
    update(ema, model)
    update(twin, twin_model)
    assert _same(_state(ema), _state(twin))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_good_load_and_a_loose_one_load_as_torch_loads_them(name, tmp_path):
    model, ema = _trained(name, tmp_path / "ours")
    _, other = _trained(name, tmp_path / "other")
    with torch.no_grad():
        for v in other.state_dict().values():
            if v.is_floating_point():
                v.add_(1.0)
    ema.load_state_dict(other.state_dict())
    assert _same(_state(ema), _state(other))
    loose = {k: v for i, (k, v) in enumerate(_state(other).items()) if i % 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ema.load_state_dict(loose, strict=False)
    assert set(result.missing_keys) == set(other.state_dict()) - set(loose) and not result.unexpected_keys


class _Stateful(nn.Linear):
    """A module with an extra state (``get_extra_state``), as Transformer Engine's layers keep."""

    def __init__(self):
        super().__init__(4, 3)
        self.note = {"scale": 1.0}

    def get_extra_state(self):
        return dict(self.note)

    def set_extra_state(self, state):
        self.note = dict(state)


def test_an_extra_state_is_handed_to_set_extra_state_as_torch_hands_it():
    """The all-or-nothing check leaves a module's extra state to its set_extra_state, as torch does:
    it is no tensor of a shape (a dict here)."""
    torch.manual_seed(0)
    ema = compat.ModelEmaV3(nn.Sequential(_Stateful()), decay=0.9)
    state = ema.state_dict()
    assert state["module.0._extra_state"] == {"scale": 1.0}
    ema.load_state_dict({**state, "module.0._extra_state": {"scale": 2.0}})
    assert ema.module[0].note == {"scale": 2.0}


def test_timms_seed_past_its_range_is_refused_at_construction_by_its_name():
    """Taken at construction, a seed of 2**64 or more failed at the first update, naming seed."""
    with pytest.raises(ValueError, match=r"stochastic_rounding_seed must be an int in \[0, 2\*\*64\)"):
        compat.ModelEmaV3(_net(), stochastic_rounding_seed=2 ** 64)
    compat.ModelEmaV3(_net(), stochastic_rounding_seed=2 ** 64 - 1).update(_net())
