"""EMAOptions: the one list of a model EMA's options, checked together, with one wording per
rule; the faces and the callbacks validate through it (tests/bridges/test_contract.py runs
every option on every face)."""
import dataclasses

import pytest

from fastema.average import HOST_ONLY_REFUSALS, EMAOptions, Plan
from fastema.average._options import SELECTION
from fastema.schedules import BEMA, HalfLife, PowerFunction, PowerWarmup


def test_the_defaults_are_one_constant_decay_of_0_9999():
    opts = EMAOptions()
    plan = opts.plan()
    assert isinstance(plan, Plan) and plan.decay == 0.9999 and opts.shadow_rows == 1
    assert opts.given() == {}
    assert opts.shadow() == ("float32", "nearest", 0, False)


def test_every_option_of_the_torch_signature_is_an_emaoption():
    import inspect

    torch = pytest.importorskip("torch")  # noqa: F841
    from fastema.torch import EMA
    from fastema.torch.ema import PLACEMENT

    face = set(inspect.signature(EMA).parameters) - {"model", *SELECTION, *PLACEMENT}
    assert face == set(EMAOptions.names())          # and where the average lives over the ranks, torch's own


def test_lists_become_tuples_so_options_compare_and_hash():
    a, b = EMAOptions.of([0.9, 0.5]), EMAOptions.of((0.9, 0.5))
    assert a == b and hash(a) == hash(b) and a.decay == (0.9, 0.5)
    assert a.plan().rows == 2 and a.shadow_rows == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.decay = 0.5                                        # type: ignore[misc]


@pytest.mark.parametrize("decay, kind, rows", [
    ([PowerFunction.of(0.05), PowerFunction.of(0.1)], PowerFunction, 2),
    (HalfLife(3.0), HalfLife, 1),
    (BEMA(), BEMA, 3),
])
def test_timed_schedules_and_bema_make_their_plan_and_rows(decay, kind, rows):
    opts = EMAOptions.of(decay)
    assert all(isinstance(s, kind) for s in opts.plan().schedules)
    assert opts.shadow_rows == rows                          # BEMA keeps output, EMA and theta_0
    assert opts.plan().rows == len(opts.plan().schedules)     # ...and shows one average


@pytest.mark.parametrize("kw, error, words", [
    (dict(decay=[0.9, PowerFunction.of(0.1)]), ValueError, "decay= takes one kind of schedule for every average"),
    (dict(decay=[PowerWarmup(0.9), PowerFunction.of(0.1)]), ValueError, "decay= takes one kind of schedule"),
    (dict(decay=1.5), ValueError, "decay must be a float in"),
    (dict(decay=[0.9] * 9), ValueError, "1 to 8 decays"),
    (dict(warmup="power"), TypeError, "unknown EMA option(s) ['warmup']"),
    (dict(decay=PowerFunction.of(0.1), update_every=2, compensate=True), ValueError,
     "decay=PowerFunction(...) is a schedule over training time, exact for any update interval: it takes no "
     "compensate="),
    (dict(rounding="up"), ValueError, "rounding must be 'nearest' or 'stochastic'"),
    (dict(rounding="stochastic"), ValueError, "stochastic rounding is for bfloat16 shadows"),
    (dict(seed=-1), ValueError, "seed must be an int in"),
    (dict(seed=True), ValueError, "seed must be an int in"),
    (dict(skip_nonfinite=1), TypeError, "skip_nonfinite must be True or False"),
    (dict(debias="no"), TypeError, "debias must be True or False, got 'no'"),       # (read as True before)
    (dict(update_every=2, compensate="False"), TypeError, "compensate must be True or False"),
    (dict(device_step="yes"), TypeError, "device_step must be True, False or None"),
    (dict(offload="disk"), ValueError, "offload must be None or 'cpu'"),
    (dict(offload="cpu", skip_nonfinite=True), ValueError, "does not take device_step=True or skip_nonfinite"),
    (dict(decay=BEMA(), device_step=True), ValueError, "decay=BEMA(...) applies its bias correction"),
    (dict(decay=BEMA(), debias=True), ValueError, "decay=BEMA(...) keeps one average"),
    (dict(decay=[BEMA(), BEMA(lag=5.0)]), ValueError, "decay=BEMA(...) keeps one average.*give one BEMA"),
    (dict(update_every=0), ValueError, "update_every must be an int >= 1"),
])
def test_a_bad_value_is_refused_with_the_rule_and_the_fix(kw, error, words):
    decay = kw.pop("decay", None)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        EMAOptions.of(decay, **kw)


def test_the_options_are_one_knob_per_concept():
    assert EMAOptions.names() == ("decay", "update_every", "compensate", "debias", "shadow_dtype", "rounding",
                                  "seed", "skip_nonfinite", "device_step", "offload")


def test_an_unknown_name_is_refused_with_the_list_of_options():
    with pytest.raises(TypeError, match=r"unknown EMA option\(s\) \['sigma'\].*decay, update_every.*offload"):
        EMAOptions.of(0.9, sigma=0.1)
    for removed in ("sigma_rel", "half_life", "bema", "warmup", "min_decay", "inv_gamma", "power",
                    "update_after_step"):             # the schedule parameters are decay='s schedules now
        with pytest.raises(TypeError, match=rf"unknown EMA option\(s\) \['{removed}'\]"):
            EMAOptions.of(0.9, **{removed: 1})


def test_split_separates_the_torch_model_selection_and_refuses_unknown_names():
    options, selection = EMAOptions.split({"decay": PowerFunction.of(0.1), "exclude": ["head.*"],
                                           "buffers": "average", "trainable_only": True})
    assert options == {"decay": PowerFunction.of(0.1)}
    assert selection == {"exclude": ["head.*"], "buffers": "average", "trainable_only": True}
    with pytest.raises(TypeError, match=r"unknown EMA option\(s\) \['excludes'\].*exclude"):
        EMAOptions.split({"excludes": ["x"]})


def test_a_face_refuses_by_name_only_what_is_given():
    EMAOptions.of(0.9).refuse("face", HOST_ONLY_REFUSALS)                  # defaults pass
    EMAOptions.of(0.9, device_step=False).refuse("face", HOST_ONLY_REFUSALS)  # False/None: the host plan
    with pytest.raises(ValueError, match=r"face does not take device_step=True: the plan on the device"):
        EMAOptions.of(0.9, device_step=True).refuse("face", HOST_ONLY_REFUSALS)
    with pytest.raises(ValueError, match=r"face does not take offload='cpu': offload='cpu' is the torch face's"):
        EMAOptions.of(0.9, offload="cpu").refuse("face", HOST_ONLY_REFUSALS)
