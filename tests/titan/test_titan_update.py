"""fastema.torchtitan.EMA's update against torchtitan main's EMA (``titan_upstream.MainEMA``, its firing
rule and per-copy ``_foreach_lerp_`` passes on torchtitan 0.3.0's pieces): every config field set, a
20-step run, within one ulp; the config's refusals; the device-side step (a captured graph's) equal to
the host's (on a GPU: test_titan_graph.py)."""
import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

from titan_models import FIELDS, Net, _train_step, _ulps  # noqa: E402
from titan_upstream import MainEMA  # noqa: E402

from fastema.torchtitan import EMA, ema_key, parse_ema_key  # noqa: E402


@pytest.mark.parametrize("dtype, offload", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_twenty_steps_with_every_field_set_match_mains_rule_within_one_ulp(dtype, offload):
    """Every field set (offload_to_cpu too: fastema's offloaded shadow, host memory, the fold on a thread)."""
    ours_model, main_model = Net(dtype), Net(dtype)
    ema = EMA.Config(**FIELDS, offload_to_cpu=offload).build(model_parts=[ours_model])
    main = MainEMA([main_model], **FIELDS)
    assert ema.keys == main.keys == ["decay_0p9", "decay_0p75", "half_life_0p05", "half_life_0p5"]
    fired = 0
    for step in range(1, 21):
        _train_step([ours_model, main_model], step)
        before = ema.shadow.view("proj.weight", 2).clone()
        ema.step(step)
        main.step(step)
        fired += not torch.equal(before, ema.shadow.view("proj.weight", 2))
        for row, key in enumerate(ema.keys):
            ref = main.copy(key)
            for t in ema.tracked:
                assert _ulps(ema.shadow.view(t.fqn, row), ref[t.fqn]) <= 1, (step, key, t.fqn)
    assert fired == 8                     # steps 5, 7, ..., 19: (step - 3) % 2 == 0 and step > 3
    assert {t.fqn for t in ema.tracked} == {"proj.weight", "proj.bias", "norm.weight", "norm.bias", "running_mean"}


def test_the_offloaded_update_keys_its_weights_by_the_host_shadows_groups_not_the_weights_device():
    """review 9 H-1: an offloaded shadow's ``groups`` report the weights' device (``cuda:0`` on a GPU) and its
    host layout, which its update reads, ``"cpu"``: the EMA keyed the weights by the first (KeyError 'cpu' at the
    first firing on a GPU). Built on the CPU with ``groups`` reporting what they report on a GPU (a watch sets
    the device in the dicts the property returns), so the two devices differ here too; every firing then hands
    ``update_checked`` the host groups' devices and folds main's rule."""
    from support.calls import watching

    from fastema.torch._placement.offload import OffloadedShadow

    def as_on_a_gpu(arguments, groups):
        for g in groups or ():
            g["device"] = "cuda:0"

    ours, theirs = Net(), Net()
    with watching(OffloadedShadow.groups.fget, on_return=as_on_a_gpu):
        ema = EMA.Config(**FIELDS, offload_to_cpu=True).build(model_parts=[ours])
        assert {g["device"] for g in ema.shadow.groups} == {"cuda:0"}
    main = MainEMA([theirs], **FIELDS)
    host = {g.device for g in ema.shadow.layout.groups}
    assert host == {"cpu"}
    keys: list = []
    with watching(OffloadedShadow.update_checked, on_call=lambda a: keys.append(set(a["weights_by_device"]))):
        for step in range(1, 8):
            _train_step([ours, theirs], step)
            ema.step(step)
            main.step(step)
    assert keys == [host] * 2                          # steps 5 and 7 fire
    for row, key in enumerate(ema.keys):
        for t in ema.tracked:
            assert _ulps(ema.shadow.view(t.fqn, row), main.copy(key)[t.fqn]) <= 1, (key, t.fqn)


def test_the_decays_are_mains_at_every_firing():
    ema = EMA.Config(**FIELDS).build(model_parts=[Net()])
    for n in (1, 2, 7, 1000):
        expected = [0.9, 0.75, 2.0 ** (-1.0 / (0.05 * n)), 2.0 ** (-1.0 / (0.5 * n))]
        assert ema.decays_at(n) == expected


def test_a_float32_average_of_bfloat16_weights_keeps_moving_where_mains_copy_freezes():
    """Main keeps a bfloat16 copy of a bfloat16 parameter: near the weights, (1 - decay) times the gap
    rounds away. shadow_dtype="float32" (fastema's opt-in) keeps moving, as float64 arithmetic does."""
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(False)
    ours, theirs = copy.deepcopy(base).requires_grad_(True), copy.deepcopy(base).requires_grad_(True)
    ema = EMA.Config(decays=[0.999], shadow_dtype="float32").build(model_parts=[ours])
    main = MainEMA([theirs], decays=[0.999])
    ref = base.weight.double().clone()
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.add_(torch.full_like(m.weight, 2.0 ** -4))
        for step in range(1, 6):
            ema.step(step)
            main.step(step)
            ref.lerp_(ours.weight.double(), 1 - 0.999)
    main_still = (main.copy("decay_0p999")["weight"] == base.weight).float().mean()
    ours_still = (ema.shadow.view("weight", 0) == base.weight.float()).float().mean()
    assert float(main_still) > 0.7 and float(ours_still) == 0.0     # 74% of main's never moved
    torch.testing.assert_close(ema.shadow.view("weight", 0).double(), ref, rtol=1e-6, atol=1e-7)


def test_the_device_step_fires_as_the_host_step_bit_for_bit():
    """``step(tensor)``: the rule worked out with torch operations (what a captured graph replays)."""
    a, b = Net(), Net()
    host = EMA.Config(**FIELDS).build(model_parts=[a])
    dev = EMA.Config(**FIELDS).build(model_parts=[b])
    counter = torch.zeros((), dtype=torch.int64)
    for step in range(1, 16):
        _train_step([a, b], step)
        counter += 1
        host.step(step)
        dev.step(counter)
        for row in range(len(host.keys)):
            for t in host.tracked:
                assert torch.equal(host.shadow.view(t.fqn, row), dev.shadow.view(t.fqn, row)), (step, row, t.fqn)


def test_keys_are_mains_and_parse_back():
    assert ema_key("decay_", 0.999) == "decay_0p999"
    assert ema_key("half_life_", 1e-05) == "half_life_1em05"
    assert ema_key("decay_", 0) == "decay_0p0"
    for key, parsed in (("decay_0p999", (True, 0.999)), ("half_life_0p05", (False, 0.05)),
                        ("half_life_1em05", (False, 1e-05))):
        assert parse_ema_key(key) == parsed
    for bad in ("ema_0p9", "decay_xyz", 3):
        with pytest.raises(ValueError, match="neither decay_<value> nor half_life_<value>"):
            parse_ema_key(bad)


@pytest.mark.parametrize("fields, match", [
    (dict(), "both empty"),
    (dict(decays=[1.0]), r"decays entry 1.0 must be finite and in \[0, 1\)"),
    (dict(decays=[math.nan]), "decays entry nan"),
    (dict(half_life_fractions=[0.0]), "half_life_fractions entry 0.0 must be finite and greater than 0"),
    (dict(decays=[0.9, 0.9]), r"duplicate copies \['decay_0p9'\]"),
    (dict(decays=[0.9], update_every_n_steps=0), "update_every_n_steps must be an int >= 1, got 0"),
    (dict(decays=[0.9], step_bias=-1), "step_bias must be an int >= 0, got -1"),
    (dict(decays=[0.9], start_step=1.5), "start_step must be an int, got 1.5"),
    (dict(decays=[0.9], buffer_patterns=["("]), "buffer_patterns entry '\\(' is not a regular expression"),
    (dict(decays=[0.9], shadow_dtype="bfloat16"), "shadow_dtype must be one of"),
    (dict(decays=[0.1 * i for i in range(1, 10)]), "asks for 9 copies; fastema keeps at most 8"),
])
def test_a_bad_config_is_refused_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        EMA.Config(**fields)


def test_what_build_and_step_refuse():
    m = Net()
    with pytest.raises(ValueError, match=r"step\(tensor\) .* does not go with EMA.Config.offload_to_cpu=True"):
        EMA.Config(decays=[0.9], offload_to_cpu=True).build(model_parts=[m]).step(torch.ones((), dtype=torch.int64))
    with pytest.raises(ValueError, match="matched buffer 'count' of dtype torch.int64"):
        EMA.Config(decays=[0.9], buffer_patterns=["count"]).build(model_parts=[m])
    with pytest.raises(ValueError, match=r"share the names \['norm.bias'"):
        EMA.Config(decays=[0.9]).build(model_parts=[m, m])
    with pytest.raises(ValueError, match="layouts= names"):
        EMA.Config(decays=[0.9]).build(model_parts=[m], layouts={"nope": (None, ())})
    ema = EMA.Config(decays=[0.9]).build(model_parts=[m])
    for bad in (1.0, True, "3"):
        with pytest.raises(TypeError, match="current_step must be an int"):
            ema.step(bad)
    with pytest.raises(TypeError, match="one-element int64 tensor"):
        ema.step(torch.zeros(2, dtype=torch.int64))
    before = ema.shadow.view("proj.weight", 0).clone()
    ema.step(0)                                        # elapsed 0: no firing
    assert torch.equal(before, ema.shadow.view("proj.weight", 0))


@pytest.mark.parametrize("change, match", [
    (lambda c: c.decays.append(1.0), r"decays entry 1.0 must be finite and in \[0, 1\); decay=1 never updates"),
    (lambda c: setattr(c, "update_every_n_steps", 0), "update_every_n_steps must be an int >= 1, got 0"),
    (lambda c: setattr(c, "decays", [0.9, 0.9]), r"duplicate copies \['decay_0p9'\]"),
])
def test_a_config_changed_after_construction_is_checked_again_at_build(change, match):
    """Issue 85 L1: the config is a mutable dataclass, checked at construction; changed after it, it built a
    copy that never moves, a ZeroDivisionError at the first firing, or two rows under one key."""
    cfg = EMA.Config(decays=[0.9])
    change(cfg)
    with pytest.raises(ValueError, match=match):
        cfg.build(model_parts=[Net()])
