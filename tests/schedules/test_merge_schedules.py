"""Online checkpoint merging (issue 36 item 6): the merge schedules ``WSM`` (WSM's decay-emulating
weights, arXiv 2507.17634) and ``EmaDecaySqrt`` (Levanter's EMA-then-1-sqrt model averaging), given
as ``decay=`` to every face. Their weights against float64 closed forms and the offline merge's
``wsm:`` weights bit for bit; the running average of a real small training run on torch (EMA and
TargetNetwork), JAX and TensorFlow against ``fastema.merge.merge_checkpoints`` of the checkpoints saved
at the same steps (float32 rounding); Levanter's rule reimplemented from its source side by side;
hypothesis properties; checkpoint resume mid-decay bit for bit; the device plan against the host plan
bit for bit; bad parameters refused by name.

The example of docs/guides/merging.md ("Merging online, as training runs")::

    from fastema.schedules import WSM
    from fastema.torch import EMA

    merged = EMA(model, decay=WSM("1-sqrt", start=800, end=1000, every=100))
    for step in range(1, 1001):
        ...; optimizer.step()
        merged.update(step=step)          # counts at 800, 900, 1000; writes nothing at the other steps
    # merged holds the wsm:1-sqrt merge of checkpoints 800, 900 and 1000
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import assert_same_averages
from models import device_step_model as model
from reference import assert_cuda_plan_kernel_equals_the_cpu_one
from safetensors.numpy import load_file, save_file
from torch import nn

from fastema.average import EMAOptions, Plan
from fastema.average._device_plan import parameters
from fastema.kernels import cpu
from fastema.merge import merge_checkpoints, merge_weights
from fastema.schedules import (
    WSM,
    WSM_SHAPES,
    Cosine,
    EmaDecaySqrt,
    PowerWarmup,
    from_state,
    merged_weight,
    wsm_coefficients,
    wsm_mean,
)
from fastema.torch import EMA, TargetNetwork

SHAPES = tuple(WSM_SHAPES)


# ---------------------------------------------------------------- the weights

def _quadrature_mean(shape, x0, x1, points=40):
    """The mean of WSM's decay over [x0, x1] by Gauss-Legendre quadrature in float64 (no antiderivative)."""
    f = {"linear": lambda x: 1.0 - x, "cosine": lambda x: (1 + np.cos(np.pi * x)) / 2,
         "1-sqrt": lambda x: 1.0 - np.sqrt(x)}[shape]
    nodes, weights = np.polynomial.legendre.leggauss(points)
    x = (x1 - x0) / 2 * nodes + (x1 + x0) / 2
    return float(np.sum(weights * f(x)) / 2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("start, end, every", [(0, 4, 1), (100, 1000, 100), (7, 37, 6), (3, 4, 1)])
def test_wsm_weights_are_the_closed_form(shape, start, end, every):
    s = WSM(shape, start, end, every)
    grid = list(range(start, end + 1, every))
    x = [(t - start) / (end - start) for t in grid]
    w = [1.0] + [_quadrature_mean(shape, a, b) for a, b in zip(x, x[1:])] + [0.0]    # w_0 = 1, w_K = 0
    expected = [w[j] - w[j + 1] for j in range(len(grid))]
    got = [s.weight(t) for t in grid]
    # 1-sqrt's quadrature converges slowly at 0 (the square root's slope); its antiderivative is exact
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 if shape == "1-sqrt" else 1e-13)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-15) and min(got) >= 0
    if shape == "linear" and len(grid) > 2:              # the trapezoid rule: half weights at both ends
        k = len(grid) - 1
        np.testing.assert_allclose(got, [0.5 / k] + [1 / k] * (k - 1) + [0.5 / k], rtol=1e-13)
    # between, before and after the checkpoints: 0
    assert [s.weight(t) for t in (start - 1, end + 1, end + every)] == [0.0] * 3
    if every > 1:
        assert s.weight(start + 1) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_wsm_weights_are_the_offline_merges_bit_for_bit(shape):
    for start, end, every in [(0, 4, 1), (500, 1000, 100), (7, 37, 6), (1, 2, 1), (0, 30, 3)]:
        s = WSM(shape, start, end, every)
        grid = list(range(start, end + 1, every))
        offline = merge_weights(f"wsm:{shape}", len(grid), steps=grid)
        assert list(offline.raw) == [s.weight(t) for t in grid]
        assert offline.raw == tuple(wsm_coefficients(shape, [(t - start) / (end - start) for t in grid]))
        equally = merge_weights(f"wsm:{shape}", len(grid))       # no steps: positions j / (K - 1), the same floats
        assert equally.raw == offline.raw


def test_wsm_mean_is_the_mean_of_the_decay():
    for shape in SHAPES:
        for x0, x1 in [(0.0, 1.0), (0.0, 0.1), (0.3, 0.35), (0.9, 1.0)]:
            assert wsm_mean(shape, x0, x1) == pytest.approx(_quadrature_mean(shape, x0, x1, 200), abs=2e-6)


def test_ema_decay_sqrt_weights_are_levanters_closed_form():
    s = EmaDecaySqrt(switch_step=10, decay_steps=16, beta=0.9)
    i = np.arange(40)                                     # Levanter's step: t - 1
    expected = np.where(i < 10, 1 - 0.9, 1 - np.sqrt(np.clip((i - 10) / 16, 0, 1)))
    assert [s.weight(float(t)) for t in i + 1] == list(expected)
    assert s.weight(11.0) == 1.0 and s.weight(15.0) == 0.5 and s.weight(27.0) == 0.0


def test_merged_weight_is_levanters_alpha():
    assert merged_weight(0.0, 0.0) == (0.0, 0.0)          # nothing yet: the average stays as it was
    assert merged_weight(0.5, 0.0) == (1.0, 0.5)          # the first sample is copied
    assert merged_weight(0.25, 0.75) == (0.25, 1.0)


# ---------------------------------------------------------------- the plan: properties

def _coefficients(plan, steps, rows=1):
    """Each sample's coefficient in each row's average (float64), the initial weights' first."""
    coef = [[1.0] for _ in range(rows)]
    for t in steps:
        p = plan.next(t)
        for r in range(rows):
            w = p.weights[r] if p.due else 0.0
            coef[r] = [c * (1.0 - w) for c in coef[r]] + [w]
        plan.done(p)
    return coef


schedules = st.one_of(
    st.builds(lambda shape, start, k, every: WSM(shape, start, start + k * every, every),
              st.sampled_from(SHAPES), st.integers(0, 30), st.integers(1, 12), st.integers(1, 7)),
    st.builds(EmaDecaySqrt, st.integers(0, 40), st.integers(1, 40), st.floats(0.0, 1.0)))


@given(s=schedules, steps=st.lists(st.integers(0, 140), min_size=1, max_size=60, unique=True),
       values=st.lists(st.floats(-1e3, 1e3), min_size=61, max_size=61))
def test_the_average_is_the_normalised_merge_of_the_samples_a_convex_combination(s, steps, values):
    steps = sorted(steps)
    coef = _coefficients(Plan(s), steps)[0]
    weights = [s.weight(t) for t in steps]
    total = math.fsum(weights)
    assert all(0.0 <= c <= 1.0 for c in coef)
    assert math.fsum(coef) == pytest.approx(1.0, abs=1e-12)             # normalised
    if total > 0:                                                       # the merge of the samples weighed
        assert coef[0] == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(coef[1:], [a / total for a in weights], rtol=1e-12, atol=1e-15)
    else:
        assert coef[0] == 1.0                                           # still the initial weights
    avg = values[0]                                                     # the running average (float64)
    plan = Plan(s)
    for t, x in zip(steps, values[1:]):
        p = plan.next(t)
        if p.due:
            avg = avg + p.weights[0] * (x - avg)
        plan.done(p)
    kept = [x for x, c in zip(values, coef) if c > 0]
    assert min(kept) - 1e-9 <= avg <= max(kept) + 1e-9                  # a convex combination of the samples


def test_calls_that_count_nothing_are_skipped_and_not_counted():
    plan = Plan(WSM("cosine", 10, 30, 10))
    due = []
    for t in range(1, 41):
        p = plan.next(t)
        due.append(p.due)
        plan.done(p)
    assert [t for t, d in zip(range(1, 41), due) if d] == [10, 20, 30]
    assert plan.updates == 3 and plan.calls == 40 and plan.norms == [pytest.approx(1.0)]
    assert plan.decay == 1.0                                            # after the span: nothing moves
    ended = Plan(EmaDecaySqrt(2, 3))
    due = []
    for t in range(1, 10):
        p = ended.next(t)
        due.append(p.due)
        ended.done(p)
    assert due == [True] * 5 + [False] * 4                              # a(i) = 0 from i = 2 + 3


def test_decay_reports_the_next_updates_decay():
    plan = Plan(EmaDecaySqrt(1, 4, beta=0.5))
    for _ in range(8):
        decay = plan.decay
        p = plan.next()
        assert p.decays == [decay]
        plan.done(p)
    assert decay == 1.0


def test_several_rows_each_keep_their_total():
    rows = [WSM("linear", 0, 20, 5), WSM("1-sqrt", 10, 30, 10)]
    plan = Plan(rows)
    coef = _coefficients(plan, range(0, 35), rows=2)
    for s, c in zip(rows, coef):
        grid = list(range(s.start, s.end + 1, s.every))
        offline = merge_weights(f"wsm:{s.shape}", len(grid), steps=grid).values
        got = [c[1 + t] for t in grid]                                  # sample t is entry 1 + t (steps from 0)
        np.testing.assert_allclose(got, offline, rtol=1e-12)
    assert plan.norms == [pytest.approx(1.0), pytest.approx(1.0)]


# ---------------------------------------------------------------- online == offline, a real run per face

class _TorchRun:
    """A small MLP trained by SGD with a constant learning rate (WSM's premise), the average kept by
    ``make(model)`` (an EMA, or a TargetNetwork's target)."""

    def __init__(self, make):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.x, self.y = torch.randn(64, 6), torch.randn(64, 3)
        self.avg, self.averaged = make(self.model)

    def step(self, k):
        i = (k * 8) % 64
        loss = ((self.model(self.x[i:i + 8]) - self.y[i:i + 8]) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def update(self, k):
        self.avg.update(step=k)

    def weights(self):
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}

    def average(self):
        return {k: v.detach().numpy().copy() for k, v in self.averaged().items()}


def _torch_ema(decay):
    def make(m):
        ema = EMA(m, decay=decay)
        return ema, ema.averaged_state_dict
    return _TorchRun(make)


def _torch_target(decay):
    def make(m):
        import copy

        t = TargetNetwork(m, copy.deepcopy(m).requires_grad_(False), momentum=decay)
        return t, t.target.state_dict
    return _TorchRun(make)


class _JaxRun:
    def __init__(self, decay):
        self.jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        from fastema.jax import EMA as JaxEMA

        self.jnp = jnp
        k = self.jax.random.split(self.jax.random.PRNGKey(0), 4)
        self.params = {"w": self.jax.random.normal(k[0], (6, 3)), "b": self.jax.random.normal(k[1], (3,))}
        self.x, self.y = self.jax.random.normal(k[2], (64, 6)), self.jax.random.normal(k[3], (64, 3))

        def loss(p, x, y):
            return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)

        self.grad = self.jax.jit(self.jax.grad(loss))
        self.avg = JaxEMA(self.params, decay=decay)

    def step(self, k):
        i = (k * 8) % 64
        g = self.grad(self.params, self.x[i:i + 8], self.y[i:i + 8])
        self.params = self.jax.tree_util.tree_map(lambda p, d: p - 0.05 * d, self.params, g)

    def update(self, k):
        self.avg.update(self.params, step=k)

    def weights(self):
        return {k: np.asarray(v) for k, v in self.params.items()}

    def average(self):
        return {k: np.asarray(v) for k, v in self.avg.shadow().items()}


class _TfRun:
    def __init__(self, decay):
        self.tf = tf = pytest.importorskip("tensorflow")
        from fastema.tensorflow import EMA as TfEMA

        rng = np.random.default_rng(0)
        self.vars = [tf.Variable(rng.standard_normal((6, 3)).astype(np.float32)),
                     tf.Variable(rng.standard_normal(3).astype(np.float32))]
        self.x = tf.constant(rng.standard_normal((64, 6)).astype(np.float32))
        self.y = tf.constant(rng.standard_normal((64, 3)).astype(np.float32))
        self.avg = TfEMA(self.vars, decay=decay)

    def step(self, k):
        i = (k * 8) % 64
        with self.tf.GradientTape() as tape:
            loss = self.tf.reduce_mean((self.tf.tanh(self.x[i:i + 8] @ self.vars[0] + self.vars[1])
                                        - self.y[i:i + 8]) ** 2)
        for v, g in zip(self.vars, tape.gradient(loss, self.vars)):       # SGD
            v.assign_sub(0.05 * g)

    def update(self, k):
        self.avg.update(k)

    def weights(self):
        return {f"v{i}": v.numpy().copy() for i, v in enumerate(self.vars)}

    def average(self):
        return {f"v{i}": a.numpy().copy() for i, a in enumerate(self.avg.averages())}


RUNS = {"torch": _torch_ema, "target": _torch_target, "jax": _JaxRun, "tensorflow": _TfRun}
SPANS = {"wsm:1-sqrt": (WSM("1-sqrt", 20, 60, 10), None), "wsm:cosine": (WSM("cosine", 31, 61, 6), None),
         "wsm:linear": (WSM("linear", 1, 8, 1), None),
         "levanter": (EmaDecaySqrt(switch_step=25, decay_steps=20, beta=0.9), "explicit")}
FIGURES: dict = {}


def _online_and_offline(tmp_path, face, name, steps=64):
    schedule, style = SPANS[name]
    run = RUNS[face](schedule)
    paths, at, weights = [], [], []
    for k in range(1, steps + 1):
        run.step(k)
        run.update(k)                                   # every step; only the checkpoints count
        a = schedule.weight(k)
        if a != 0.0:                                    # a checkpoint the merge takes
            path = os.path.join(tmp_path, f"checkpoint-{k}.safetensors")
            save_file(run.weights(), path, metadata={"step": str(k)})
            paths.append(path)
            at.append(k)
            weights.append(a)
    out = os.path.join(tmp_path, "merged.safetensors")
    report = merge_checkpoints(paths, out, weights=name if style is None else weights, steps=at)
    if style is None:
        assert list(report.weights) == list(merge_weights(name, len(at), steps=at).values)
    states = [load_file(p) for p in paths]
    reference = {n: sum(float(c) * s[n].astype(np.float64) for c, s in zip(report.weights, states))
                 for n in states[0]}
    return run, run.average(), load_file(out), reference, at


@pytest.mark.parametrize("face, name", [(f, n) for f in RUNS for n in SPANS         # two spans suffice for
                                         if f in ("torch", "jax") or n in ("wsm:1-sqrt", "levanter")])  # the others
def test_the_online_average_is_the_offline_merge_of_the_same_checkpoints(tmp_path, face, name):
    """At the end of a real run, the average kept online equals merge_checkpoints of the checkpoints
    saved at the steps the schedule counts, to float32 rounding; both equal the float64 merge."""
    run, online, offline, reference, at = _online_and_offline(tmp_path, face, name)
    assert run.avg.updates == len(at) and run.avg.plan.calls == 64
    worst = 0.0
    for n, ref in reference.items():
        scale = np.abs(ref).max()
        np.testing.assert_allclose(online[n], offline[n], rtol=1e-6, atol=1e-6 * scale, err_msg=n)
        np.testing.assert_allclose(online[n], ref, rtol=1e-6, atol=1e-6 * scale, err_msg=n)
        worst = max(worst, float(np.abs(online[n].astype(np.float64) - offline[n]).max() / scale))
    FIGURES[face, name] = worst
    print(f"{face} {name}: {len(at)} checkpoints, largest |online - offline| / max|merge| = {worst:.2e}")


def test_a_hugging_face_trainer_run_merged_online_and_offline(tmp_path):
    """EMACallback(decay=WSM(...)) in a real Trainer run (a tiny GPT-2) that saves checkpoint-4, -8 and
    -12: the callback's average equals ``merge_checkpoints`` of those folders with ``wsm:1-sqrt``
    (steps read from the folders), to float32 rounding."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fastema.transformers import EMACallback

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (96, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    callback = EMACallback(decay=WSM("1-sqrt", start=4, end=12, every=4))
    args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8,
                                          learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps",
                                          save_steps=4, save_only_model=True, logging_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.ema.updates == 3 and callback.ema.plan.calls == 12
    folders = [str(tmp_path / "run" / f"checkpoint-{k}") for k in (4, 8, 12)]
    report = merge_checkpoints(folders, tmp_path / "merged", weights="wsm:1-sqrt")
    assert list(report.steps) == [4, 8, 12]
    offline = load_file(str(tmp_path / "merged" / "model.safetensors"))
    online = callback.ema.averaged_state_dict()
    assert set(offline) <= set(online)
    for n, t in offline.items():
        ref = online[n].detach().numpy()
        np.testing.assert_allclose(t, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=n)


# ---------------------------------------------------------------- Levanter, side by side

class LevanterEmaDecaySqrt:
    """stanford-crfm/levanter ``src/levanter/optim/model_averaging.py`` ``EmaDecaySqrtModelAveraging`` at
    9263f81e8b453241332c2c0b2d2001bfb2d2241c (unchanged since it was added in f7815f38, PR #1118),
    reimplemented with jax.numpy: ``_raw_weight`` and ``update`` as written there (float32 arrays, the
    clipped fraction and its square root in float32), ``optax.incremental_update(new, old, step_size)``
    as optax defines it, ``step_size * new + (1 - step_size) * old``. Its trainer
    (``TrainerState.take_step``) calls ``update(model, self.step)`` after the optimizer step, with the
    step before it is incremented (0 first)."""

    def __init__(self, model, switch_step, decay_steps, beta=0.999):
        import jax.numpy as jnp

        self.jnp, self.model = jnp, model
        self.switch_step, self.decay_steps, self.beta, self.tot_weight = switch_step, decay_steps, beta, 0.0

    def _raw_weight(self, step):
        if step < self.switch_step:
            return 1.0 - self.beta
        t = step - self.switch_step
        frac = self.jnp.clip(t / self.decay_steps, 0.0, 1.0)
        return float(1.0 - self.jnp.sqrt(frac))

    def update(self, new_model, step):
        import jax

        w = self._raw_weight(step)
        new_tot_w = self.tot_weight + w
        alpha = 0.0 if new_tot_w == 0.0 else w / new_tot_w
        self.model = jax.tree_util.tree_map(lambda new, old: alpha * new + (1.0 - alpha) * old, new_model, self.model)
        self.tot_weight = new_tot_w


@pytest.mark.parametrize("switch, decay_steps, beta", [(5, 10, 0.5), (0, 4, 0.999), (30, 7, 0.9)])
def test_levanters_rule_side_by_side(switch, decay_steps, beta):
    jax = pytest.importorskip("jax")
    from fastema.jax import EMA as JaxEMA

    keys = jax.random.split(jax.random.PRNGKey(1), 60)
    params = {"w": jax.random.normal(keys[0], (5, 4)), "b": jax.random.normal(keys[1], (4,))}
    theirs = LevanterEmaDecaySqrt(params, switch, decay_steps, beta)
    ours = JaxEMA(params, decay=EmaDecaySqrt(switch, decay_steps, beta))
    for step in range(50):                              # Levanter's step; ours is the steps done, step + 1
        params = jax.tree_util.tree_map(lambda p, k=keys[step + 2]: p + 0.1 * jax.random.normal(k, p.shape), params)
        theirs.update(params, step)
        ours.update(params, step=step + 1)
        assert ours.plan.norms[0] == pytest.approx(theirs.tot_weight, rel=1e-6, abs=1e-6)
        for k, v in ours.shadow().items():
            np.testing.assert_allclose(np.asarray(v), np.asarray(theirs.model[k]), rtol=2e-6, atol=2e-6)
        assert abs(EmaDecaySqrt(switch, decay_steps, beta).weight(step + 1.0) - theirs._raw_weight(step)) < 2e-7


# ---------------------------------------------------------------- checkpoints

def _train_step(m, step):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m[1].running_mean.add_(0.01 * step)


@pytest.mark.parametrize("decay", [WSM("1-sqrt", 4, 16, 2), EmaDecaySqrt(3, 8, beta=0.8),
                                   [WSM("cosine", 2, 14, 3), WSM("linear", 5, 9, 1)]])
@pytest.mark.parametrize("device_step", [False, True])
def test_checkpoint_resume_mid_decay_is_bit_exact(decay, device_step):
    m = model()
    kw = dict(decay=decay, shadow_dtype="bfloat16", rounding="stochastic", seed=5, device_step=device_step)
    a = EMA(m, **kw)
    for step in range(1, 9):                            # stopped in the middle of the span
        _train_step(m, step)
        a.update(step=step)
    state = json.loads(json.dumps(a.plan.state()))      # the plan is plain JSON
    assert from_state(state["schedules"][0]) == (decay[0] if isinstance(decay, list) else decay)
    b = EMA(m, **kw)
    b.load_state_dict(a.state_dict())
    for step in range(9, 21):
        _train_step(m, step)
        a.update(step=step)
        b.update(step=step)
    assert_same_averages(a, b, keys=("updates", "calls", "norms", "schedules"))


def _perturb(m):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_target_network_resume_mid_decay_is_bit_exact():
    import copy

    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    a = TargetNetwork(online, copy.deepcopy(online), momentum=EmaDecaySqrt(2, 6, beta=0.5))
    for step in range(1, 6):
        _perturb(online)
        a.update(step=step)
    b = TargetNetwork(online, copy.deepcopy(online), momentum=EmaDecaySqrt(2, 6, beta=0.5))
    b.target.load_state_dict(a.target.state_dict())
    b.load_state_dict(a.state_dict())
    for step in range(6, 12):
        _perturb(online)
        a.update(step=step)
        b.update(step=step)
    for x, y in zip(a.target.parameters(), b.target.parameters()):
        assert torch.equal(x, y)
    assert a.plan.norms == b.plan.norms and a.plan.updates == b.plan.updates == 8   # a(i) = 0 from i = 8


def test_jax_resume_mid_decay_is_bit_exact():
    jax = pytest.importorskip("jax")
    from fastema.jax import EMA as JaxEMA

    x = {"w": jax.numpy.zeros((3, 2))}
    a = JaxEMA(x, decay=WSM("cosine", 2, 12, 2))
    for k in range(1, 7):
        a.update({"w": jax.numpy.full((3, 2), k * 1.7)}, step=k)
    b = JaxEMA(x, decay=WSM("cosine", 2, 12, 2))
    b.load_state_dict(a.state_dict())
    for k in range(7, 15):
        for e in (a, b):
            e.update({"w": jax.numpy.full((3, 2), math.sin(k))}, step=k)
    assert np.array_equal(np.asarray(a.shadow()["w"]), np.asarray(b.shadow()["w"]))
    assert a.plan.norms == b.plan.norms and a.updates == b.updates == 6


# ---------------------------------------------------------------- the device plan (CUDA graphs)

def _drive_plan_kernel(plan, steps, seed=7, groups=2):
    """The CPU plan kernel (the device plan's twin) beside the host plan, call by call, bit for bit."""
    params, decays = parameters(plan, seed)
    ref = Plan(list(plan.schedules), update_every=plan.update_every)
    state = np.array([plan.calls, plan.updates, plan.last_time, *plan.norms], np.float64)
    w32, w64 = np.zeros(plan.rows, np.float32), np.zeros(plan.rows)
    flag, keys = np.zeros(1, np.int32), np.zeros(groups, np.int64)
    for step in steps:
        cpu.plan_kernel()(state, params, decays, -1 if step is None else step, w32, w64, flag, keys)
        p = ref.next(step)
        assert flag[0] == (0 if p.due else 1), step
        if p.due:
            assert list(w64) == p.weights, step
            assert list(w32) == [np.float32(w) for w in p.weights]
        ref.done(p)
        assert list(state) == [ref.calls, ref.updates, ref.last_time, *ref.norms], step


@pytest.mark.parametrize("shape", SHAPES)
def test_device_plan_kernel_equals_the_host_plan(shape):
    _drive_plan_kernel(Plan(WSM(shape, 3, 27, 4)), [None] * 35)
    _drive_plan_kernel(Plan([WSM(shape, 0, 9, 3), WSM(shape, 5, 8, 1)]), [None] * 6 + [6, 6, 8, 8, 9, 9, 12])
    _drive_plan_kernel(Plan(WSM(shape, 10, 1000, 10)), [1, 10, 15, 20, 30, 500, 990, 1000, 1010, 10 ** 6])


def test_device_plan_kernel_equals_the_host_plan_for_levanters_rule():
    _drive_plan_kernel(Plan([EmaDecaySqrt(6, 10, 0.9), EmaDecaySqrt(0, 3, 0.5)]), [None] * 30)
    _drive_plan_kernel(Plan(EmaDecaySqrt(100, 1000)), [1, 50, 101, 102, 600, 1100, 1101, 5000])


@pytest.mark.parametrize("decay", [WSM("1-sqrt", 3, 15, 3), EmaDecaySqrt(4, 6, beta=0.7)])
def test_ema_device_step_equals_the_host_plan_bit_for_bit(decay):
    kw = dict(decay=decay, shadow_dtype="bfloat16", rounding="stochastic", seed=11)
    m = model()
    dev, host = EMA(m, **kw, device_step=True), EMA(m, **kw, device_step=False)
    for step in range(1, 19):
        _train_step(m, step)
        dev._core.fold_on_device(None, dev._core.device_plan)  # what a CUDA graph replays: no Python of update()
        host.update()
    assert_same_averages(dev, host, keys=("updates", "calls", "norms", "schedules"))


@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not torch.cuda.is_available(),
                    reason="needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("rows", [[WSM(s, 2, 20, 3), WSM(s, 5, 9, 1)] for s in SHAPES]
                         + [[EmaDecaySqrt(4, 6, 0.8)] * 2], ids=[*SHAPES, "levanter"])
def test_cuda_plan_kernel_equals_the_cpu_one(rows):
    """Bit for bit, in the simulator and on a GPU: the weights call no sin or pow (whose libdevice
    and libm versions differ in the last bits; the H100 of 2026-11-26 found 4-7 ulps) and NVVM
    contracts nothing (``tests/kernels/test_same_bits.py``)."""
    plan = Plan(rows)
    steps = [-1] * 8 + [8, 8, 9, 9, 11, 14, 14, 17, 17, 20, 20, 30, 31, 31]     # repeats: a checkpoint counts once
    assert_cuda_plan_kernel_equals_the_cpu_one(plan, 5, steps, True)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("make, words", [
    (lambda: WSM("exp", 0, 10), "shape must be one of 'linear', 'cosine', '1-sqrt'"),
    (lambda: WSM("cosine", 0, 95, 10), r"end - start = 95 is not a multiple of every = 10.*give end=90 or 100"),
    (lambda: WSM("cosine", 10, 10), r"end must be an int >= 11"),
    (lambda: WSM("cosine", -1, 10), r"start must be an int >= 0"),
    (lambda: WSM("cosine", 0, 10, 0), r"every must be an int >= 1"),
    (lambda: WSM("cosine", 0, 10.0), r"end must be an int"),
    (lambda: EmaDecaySqrt(10, 0), r"decay_steps must be an int >= 1"),
    (lambda: EmaDecaySqrt(-5, 10), r"switch_step must be an int >= 0"),
    (lambda: EmaDecaySqrt(5, 10, beta=1.5), r"beta must be a float in \[0, 1\]"),
    (lambda: Plan(WSM("cosine", 0, 10), debias=True), "takes no debias="),
    (lambda: Plan(EmaDecaySqrt(0, 10), update_every=5, compensate=True), "takes no compensate="),
    (lambda: Plan(WSM("cosine", 0, 10), update_every=5), "update_every=5 skips calls.*leave update_every at 1"),
    (lambda: Plan([WSM("cosine", 0, 10), PowerWarmup(0.99)]), "one kind of schedule for every average, got WSM, "
                                                              "PowerWarmup"),
    (lambda: Plan([WSM("cosine", 0, 10), EmaDecaySqrt(0, 10)]), "one kind of schedule for every average"),
    (lambda: Plan([WSM("cosine", 0, 10), 0.99]), "one kind of schedule for every average"),
    (lambda: Plan([WSM("cosine", 0, 10), Cosine(0.9, 1.0, 5)]), "one kind of schedule"),
])
def test_bad_parameters_are_refused_with_the_fix(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_steps_that_go_back_are_refused_and_change_nothing():
    plan = Plan(WSM("linear", 0, 20, 5))
    plan.done(plan.next(10))
    before = plan.state()
    with pytest.raises(ValueError, match="before the last update's time 10"):
        plan.next(5)
    assert plan.state() == before


def test_every_face_takes_a_merge_schedule_through_the_options():
    opts = EMAOptions.of(WSM("1-sqrt", 0, 10, 5))
    assert opts.shadow_rows == 1 and opts.plan().timed
    m = nn.Linear(3, 3)
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match="takes no debias"):
        EMA(m, decay=WSM("1-sqrt", 0, 10, 5), debias=True)
    assert torch.equal(m.weight, before)
