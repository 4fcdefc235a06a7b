"""One contract for the model EMAs of every framework: fastema.torch.EMA, fastema.jax.EMA,
fastema.tensorflow.EMA and fastema.torch.TargetNetwork (the average in the target's tensors),
each driven through a small adapter, checked against the same float64 references. A behaviour
that one face changes alone shows up here as a failure of that parameter."""
import importlib

import numpy as np
import pytest

from fastema import schedules

SHAPES = [(3, 4), (5,)]


NAN_STEP = 99


def _values(k: int) -> list:
    """The model's weights after training step ``k`` (float32, deterministic); step ``NAN_STEP``
    diverged (a NaN in the first tensor)."""
    rng = np.random.default_rng(100 + k)
    values = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    if k == NAN_STEP:
        values[0][0, 0] = np.nan
    return values


class TorchModel:
    name = "torch"
    many = [0.9, 0.5]                      # several averages in one pass
    unknown = "unexpected keyword argument 'sigma'"   # the signature spells the options: Python's TypeError

    def refusal(self, option):
        """The words of this face's refusal of ``option`` (None: it takes it)."""
        return None

    def schedule_refusal(self, decay):
        """The words of this face's refusal of ``decay=`` given this schedule (None: it takes it)."""
        return None

    def state(self, ema):
        return ema.state_dict()

    def load(self, ema, state):
        ema.load_state_dict(state)

    def __init__(self):
        import torch

        self.torch = torch
        self.model = torch.nn.ParameterList([torch.nn.Parameter(torch.from_numpy(v)) for v in _values(0)])

    def ema(self, decay, **kw):
        import fastema.torch

        return fastema.torch.EMA(self.model, decay, **kw)

    def set(self, k):
        with self.torch.no_grad():
            for p, v in zip(self.model, _values(k)):
                p.copy_(self.torch.from_numpy(v))

    def update(self, ema, step=None):
        ema.update(step)

    def average(self, ema):
        return [np.asarray(t.detach().double().numpy()) for t in ema.averaged_state_dict().values()]

    def weights(self):
        return [p.detach().double().numpy().copy() for p in self.model]

    def block(self, ema):
        return ema.average_parameters()


class HostPlanFace:
    """What the faces whose update runs eagerly with the plan on the host (JAX, TensorFlow) share."""
    many = [0.9, 0.5]
    unknown = r"unknown EMA option.*'sigma'.*decay, update_every"

    def refusal(self, option):
        from fastema.average import HOST_ONLY_REFUSALS

        why = HOST_ONLY_REFUSALS.get(option)
        return None if why is None else f"does not take {option}=.*: {why[:20]}"

    def schedule_refusal(self, decay):
        return None                        # the host plan runs every schedule

    def state(self, ema):
        return ema.state_dict()

    def load(self, ema, state):
        ema.load_state_dict(state)


class JaxModel(HostPlanFace):
    name = "jax"

    def __init__(self):
        self.jnp = importlib.import_module("jax.numpy")
        self.params = {"a": self.jnp.asarray(_values(0)[0]), "b": self.jnp.asarray(_values(0)[1])}

    def ema(self, decay, **kw):
        import fastema.jax

        return fastema.jax.EMA(self.params, decay, **kw)

    def set(self, k):
        v = _values(k)
        self.params = {"a": self.jnp.asarray(v[0]), "b": self.jnp.asarray(v[1])}

    def update(self, ema, step=None):
        ema.update(self.params, step)

    def average(self, ema):
        out = ema.shadow()
        return [np.asarray(out["a"], np.float64), np.asarray(out["b"], np.float64)]


class TfModel(HostPlanFace):
    name = "tensorflow"

    def __init__(self):
        self.tf = importlib.import_module("tensorflow")
        self.variables = [self.tf.Variable(v) for v in _values(0)]

    def ema(self, decay, **kw):
        import fastema.tensorflow

        return fastema.tensorflow.EMA(self.variables, decay, **kw)

    def set(self, k):
        for var, v in zip(self.variables, _values(k)):
            var.assign(v)

    def update(self, ema, step=None):
        ema.update(step)

    def average(self, ema):
        return [np.asarray(t.numpy(), np.float64) for t in ema.averages()]

    def weights(self):
        return [np.asarray(v.numpy(), np.float64) for v in self.variables]

    def block(self, ema):
        return ema.average_parameters()


class TargetModel:
    """A target network of the torch model: the average is the target's own tensors. An EMA's
    ``shadow_dtype`` is the target's dtype here (the adapter makes the target in it)."""
    name = "target"
    many = 0.9                             # one average: several decays are refused (see refusal)
    unknown = r"unknown option\(s\) \['sigma'\]; it takes tau or momentum"

    def __init__(self):
        import torch

        self.torch = torch
        self.model = torch.nn.ParameterList([torch.nn.Parameter(torch.from_numpy(v)) for v in _values(0)])

    def refusal(self, option):
        from fastema.torch.target import REFUSALS

        if option == "decay":
            return "does not take several decays"
        why = REFUSALS.get(option) if option != "shadow_dtype" else None
        return None if why is None else f"does not take {option}=.*: {why[:20]}"

    def schedule_refusal(self, decay):
        from fastema.torch.target import SCHEDULE_REFUSALS

        kind = type(decay[0] if isinstance(decay, list) else decay)
        if kind in SCHEDULE_REFUSALS:                    # refused by name, one or several
            return rf"does not take momentum={kind.__name__}\(\.\.\.\): {SCHEDULE_REFUSALS[kind][:20]}"
        return "does not take several decays" if isinstance(decay, list) else None

    def ema(self, decay, shadow_dtype=None, **kw):
        import copy

        import fastema.torch

        target = copy.deepcopy(self.model).requires_grad_(False)
        if shadow_dtype is not None:
            target = target.to(getattr(self.torch, shadow_dtype))
        return fastema.torch.TargetNetwork(self.model, target, momentum=decay, **kw)

    set = TorchModel.set
    update = TorchModel.update
    weights = TorchModel.weights

    def average(self, ema):
        return [t.detach().double().numpy().copy() for t in ema.target.parameters()]

    def state(self, ema):
        return {"tn": ema.state_dict(), "target": {k: v.clone() for k, v in ema.target.state_dict().items()}}

    def load(self, ema, state):
        ema.target.load_state_dict(state["target"])
        ema.load_state_dict(state["tn"])


MODELS = {"torch": TorchModel, "jax": JaxModel, "tensorflow": TfModel, "target": TargetModel}


@pytest.fixture(params=list(MODELS))
def model(request):
    pytest.importorskip({"torch": "torch", "jax": "jax", "tensorflow": "tensorflow", "target": "torch"}[request.param])
    return MODELS[request.param]()


def _reference(decays_per_update, first=0) -> list:
    """The textbook recursion in float64 over the weights the updates saw."""
    avg = [v.astype(np.float64) for v in _values(first)]
    for k, d in decays_per_update:
        avg = [d * a + (1.0 - d) * v.astype(np.float64) for a, v in zip(avg, _values(k))]
    return avg


def _assert_close(got, ref):
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=2e-6, atol=2e-7)


def test_starts_as_the_model_and_follows_the_reference(model):
    ema = model.ema(0.9)
    _assert_close(model.average(ema), _reference([]))
    for k in range(1, 6):
        model.set(k)
        model.update(ema)
    _assert_close(model.average(ema), _reference([(k, 0.9) for k in range(1, 6)]))
    assert ema.updates == 5


def test_update_every_updates_on_the_first_call_then_every_kth(model):
    ema = model.ema(0.5, update_every=2)
    seen = []
    for k in range(1, 6):                                  # calls 1..5: calls 1, 3, 5 update
        model.set(k)
        model.update(ema)
        if k % 2 == 1:
            seen.append((k, 0.5))
    _assert_close(model.average(ema), _reference(seen))
    assert ema.updates == 3


def test_power_warmup_uses_the_schedule_at_each_step(model):
    ema = model.ema(schedules.PowerWarmup(0.999, power=0.75))
    sched = schedules.PowerWarmup(0.999, 0.0, 1.0, 0.75, 0)
    seen = []
    for k in range(1, 5):
        model.set(k)
        assert ema.decay == pytest.approx(sched(k))
        model.update(ema)
        seen.append((k, sched(k)))
    _assert_close(model.average(ema), _reference(seen))


def test_checkpoint_resume_is_bit_identical(model):
    ema = model.ema(model.many)
    for k in range(1, 3):
        model.set(k)
        model.update(ema)
    resumed = model.ema(model.many)
    model.load(resumed, model.state(ema))
    for k in range(3, 5):
        model.set(k)
        model.update(ema)
        model.update(resumed)
    assert ema.updates == resumed.updates == 4
    for a, b in zip(model.average(ema), model.average(resumed)):
        assert np.array_equal(a, b)


def test_a_checkpoint_of_another_shape_is_refused_and_changes_nothing(model):
    if model.refusal("decay"):
        pytest.skip(f"{model.name} keeps one average: no checkpoint of another number of averages")
    ema = model.ema([0.9, 0.5])
    model.set(1)
    model.update(ema)
    before, updates = model.average(ema), ema.updates
    other = model.ema(0.9).state_dict()                     # one decay, not two
    with pytest.raises(ValueError):
        ema.load_state_dict(other)
    assert ema.updates == updates
    for a, b in zip(before, model.average(ema)):
        assert np.array_equal(a, b)


def test_bad_decay_and_step_are_refused(model):
    with pytest.raises(ValueError):
        model.ema(1.5)
    ema = model.ema(0.9)
    with pytest.raises((TypeError, ValueError)):
        model.update(ema, step=-1)
    assert ema.updates == 0


def test_swap_puts_the_average_in_and_the_weights_back_bit_for_bit(model):
    if not hasattr(model, "block"):
        pytest.skip(f"the {model.name} face swaps nothing in (JAX hands the average back with shadow(); a target "
                    f"network's average is the target itself)")
    ema = model.ema(0.5)
    model.set(1)
    model.update(ema)
    raw, avg = model.weights(), model.average(ema)
    with model.block(ema):
        for w, a in zip(model.weights(), avg):
            np.testing.assert_array_equal(w, a)
        with model.block(ema):                            # re-entrant: the inner block leaves them in
            pass
        for w, a in zip(model.weights(), avg):
            np.testing.assert_array_equal(w, a)
        with pytest.raises(RuntimeError, match="swapped"):
            model.update(ema)                             # refused while the average is in, nothing changed
        with pytest.raises(RuntimeError, match="average 0 is swapped in"):
            ema.swap(1)
    for w, r in zip(model.weights(), raw):
        np.testing.assert_array_equal(w, r)
    assert ema.updates == 1


def test_checkpoint_headers_are_checked_alike(model):
    ema = model.ema(0.9)
    state = ema.state_dict()
    fmt = state["format"]
    with pytest.raises(ValueError, match=f"not a {fmt} state dict .format='other'."):
        ema.load_state_dict({**state, "format": "other"})
    with pytest.raises(ValueError, match=f"{fmt} checkpoint version 99 is not supported .expected 1."):
        ema.load_state_dict({**state, "version": 99})


def test_smoother_checkpoint_header_follows_the_same_rule():
    from fastema import Smoother

    s = Smoother(decay=0.9)
    s.update(1.0)
    state = s.state_dict()
    with pytest.raises(ValueError, match="fastema.Smoother checkpoint version 99 is not supported"):
        Smoother(decay=0.9).load_state_dict({**state, "version": 99})


# ---- every option on every face: taken (and equal to the torch face's average, which the torch
# suite checks against float64 references option by option), or refused by name with the reason.

OPTION_CASES = {        # one non-default value of every EMAOptions field, with what it needs
    "decay": dict(decay=[0.9, 0.5]),
    "update_every": dict(decay=0.5, update_every=2),
    "compensate": dict(decay=0.9, update_every=2, compensate=True),
    "debias": dict(decay=0.9, debias=True),
    "shadow_dtype": dict(decay=0.9, shadow_dtype="bfloat16"),
    "rounding": dict(decay=0.9, shadow_dtype="bfloat16", rounding="stochastic", seed=3),
    "seed": dict(decay=0.9, shadow_dtype="bfloat16", rounding="stochastic", seed=2 ** 40 + 1),
    "skip_nonfinite": dict(decay=0.9, skip_nonfinite=True),
    "device_step": dict(decay=0.9, device_step=True),
    "offload": dict(decay=0.9, offload="cpu"),
}


def test_the_option_cases_cover_every_option():
    from fastema.average import EMAOptions

    assert list(OPTION_CASES) == list(EMAOptions.names())


#: decay='s schedules (what sigma_rel=, half_life=, bema= and warmup= with its parameters were before
#: 0.2's one knob per concept): each kind, and each parameter of the power warm-up
SCHEDULE_CASES = {
    "power_function": dict(decay=schedules.PowerFunction.of(0.2)),
    "power_functions": dict(decay=[schedules.PowerFunction.of(0.05), schedules.PowerFunction.of(0.2)]),
    "half_life": dict(decay=schedules.HalfLife(2.0)),
    "bema": dict(decay=schedules.BEMA()),
    "num_updates": dict(decay=schedules.NumUpdates(0.99)),
    "min_decay": dict(decay=schedules.PowerWarmup(0.99, min_decay=0.5)),
    "inv_gamma": dict(decay=schedules.PowerWarmup(0.99, inv_gamma=2.0)),
    "power": dict(decay=schedules.PowerWarmup(0.99, power=0.75)),
    "update_after_step": dict(decay=schedules.PowerWarmup(0.9, update_after_step=2)),
    "start_only": dict(decay=schedules.PowerWarmup(0.9, update_after_step=2, warmup=False)),
}


def _takes_like_torch(model, kw, refused):
    """``model.ema(**kw)`` refused with ``refused`` (words), or taken and equal to the torch face's average
    after five updates, its checkpoint round-tripping."""
    kw = dict(kw)
    decay = kw.pop("decay")
    if refused:
        with pytest.raises(ValueError, match=refused):
            model.ema(decay, **kw)
        return
    ema = model.ema(decay, **kw)
    reference = TorchModel()
    ref = reference.ema(decay, **kw)
    steps = [1, 2, NAN_STEP, 3, 4] if kw.get("skip_nonfinite") else range(1, 6)   # the guard skips a step
    for k in steps:
        model.set(k)
        reference.set(k)
        model.update(ema)
        reference.update(ref)
    if hasattr(ref, "join"):
        ref.join()
    assert ema.updates == ref.updates and ema.rows == ref.rows
    for got, want in zip(model.average(ema), reference.average(ref)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    resumed = model.ema(decay, **kw)                # and its checkpoint round-trips
    model.load(resumed, model.state(ema))
    for a, b in zip(model.average(ema), model.average(resumed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("option", list(OPTION_CASES))
def test_every_face_takes_every_option_or_refuses_it_by_name(model, option):
    from fastema.average import HOST_ONLY_REFUSALS

    refused = model.refusal(option)        # JAX and TF: exactly HOST_ONLY_REFUSALS; a target network: REFUSALS
    assert (model.name in ("jax", "tensorflow") and option in HOST_ONLY_REFUSALS) == (
        model.name in ("jax", "tensorflow") and refused is not None)
    _takes_like_torch(model, OPTION_CASES[option], refused)


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_every_face_takes_every_schedule_or_refuses_it_by_name(model, case):
    """JAX and TF run every schedule (the plan on the host); a target network refuses the schedules
    over training time by name (``SCHEDULE_REFUSALS``) and several decays."""
    decay = SCHEDULE_CASES[case]["decay"]
    refused = model.schedule_refusal(decay)
    assert (refused is not None) == (model.name == "target" and case in ("power_function", "power_functions",
                                                                         "half_life", "bema"))
    _takes_like_torch(model, SCHEDULE_CASES[case], refused)


def test_a_merge_schedule_with_update_every_is_refused_with_the_fix(model):
    """update_every's skipped calls would miss some of a merge schedule's checkpoints: every face refuses
    it with the same words, before anything is made."""
    for decay in (schedules.WSM("linear", 2, 10, 2), schedules.EmaDecaySqrt(3, 4)):
        with pytest.raises(ValueError, match=r"update_every=2.*leave update_every at 1"):
            model.ema(decay, update_every=2)


def test_an_unknown_option_is_refused_with_the_list(model):
    with pytest.raises(TypeError, match=model.unknown):
        model.ema(0.9, sigma=0.1)


def test_bema_shows_one_average_and_refuses_its_internal_rows(model):
    if model.schedule_refusal(schedules.BEMA()):
        pytest.skip(f"{model.name} refuses decay=BEMA() (the schedule cases check the refusal)")
    ema = model.ema(schedules.BEMA())
    assert ema.rows == 1
    for k in range(1, 4):
        model.set(k)
        model.update(ema)
    if hasattr(ema, "averages"):
        read = ema.averages
    elif hasattr(ema, "shadow") and callable(ema.shadow):
        read = ema.shadow
    else:
        read = ema.averaged_state_dict
    with pytest.raises(IndexError):
        read(2)                                     # theta_0 is BEMA's state, not an average
    if hasattr(model, "block"):
        with pytest.raises(IndexError):
            ema.swap(2)


def test_the_plan_settings_are_read_on_the_plan_only(model):
    """``decay``, ``updates`` and ``rows`` are the face's conveniences; the plan's other settings
    are read on ``ema.plan`` (0.2's development aliases are gone, with no warning left behind)."""
    ema = model.ema(model.many, update_every=2, **({} if model.refusal("debias") else {"debias": True}))
    rows = len(model.many) if isinstance(model.many, list) else 1
    assert (ema.decay, ema.updates, ema.rows) == (model.many, 0, rows)          # the three conveniences stay
    assert ema.plan.update_every == 2
    for name in ("norms", "schedules", "update_every", "compensate", "debias"):
        assert not hasattr(ema, name), name


def test_skip_nonfinite_may_be_switched_on_between_updates(model):
    """``ema.skip_nonfinite = True`` after construction guards the next updates on every face (the
    engine reads it): an EMA's attribute was written and never read after the one-driver change."""
    ema = model.ema(0.9)
    model.set(1)
    model.update(ema)
    ema.skip_nonfinite = True
    for k in (NAN_STEP, 2):
        model.set(k)
        model.update(ema)
    _assert_close(model.average(ema), _reference([(1, 0.9), (2, 0.9)]))
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
        ema.skip_nonfinite = 1
