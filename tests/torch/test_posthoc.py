"""Post-hoc EMA (issue #16), first part: the power-function profile's width <-> exponent
(Karras et al. 2024, EDM2, Eqs. 123 and 126), against the closed form and the paper's values."""
import functools
import math
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastema.schedules import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma


def _profile_std(gamma: float) -> float:
    """The standard deviation of p(tau) = (gamma+1) tau^gamma on [0, 1], by its moments, in exact
    rationals: in float64, m2 - m1^2 cancels to a relative error of 1e-8 at gamma ~ 1e4."""
    g = Fraction(gamma)
    m1 = (g + 1) / (g + 2)
    m2 = (g + 1) / (g + 3)
    return math.sqrt(m2 - m1 * m1)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94), (0.15, 3.56), (0.20, 1.83)])
def test_edm2_values(sigma_rel, gamma):
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=5e-3)


@given(st.floats(min_value=1e-3, max_value=1e4))
def test_width_is_the_profiles_standard_deviation_and_the_inverse_round_trips(gamma):
    s = gamma_to_sigma_rel(gamma)
    assert s == pytest.approx(_profile_std(gamma), rel=1e-9)
    assert sigma_rel_to_gamma(s) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_the_width_narrows_as_gamma_grows_and_tends_to_sqrt_one_twelfth():
    gammas = np.geomspace(1e-6, 1e3, 50)
    widths = [gamma_to_sigma_rel(float(g)) for g in gammas]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert widths[0] == pytest.approx(SIGMA_REL_MAX, rel=1e-5)


@pytest.mark.parametrize("bad", [0, -0.1, SIGMA_REL_MAX, 0.3, float("nan"), True, "0.1"])
def test_out_of_range_widths_are_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel must be a number in"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), None])
def test_bad_exponents_are_refused(bad):
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        gamma_to_sigma_rel(bad)


# --------------------------------------------------------------------------- timed schedules

torch = pytest.importorskip("torch")
from models import mlp, train_sampled, with_complex_buffer  # noqa: E402
from posthoc_cli import one_line, run_cli  # noqa: E402
from torch import nn  # noqa: E402

from fastema import posthoc  # noqa: E402
from fastema.average import Plan  # noqa: E402
from fastema.schedules import BEMA, HalfLife, PowerFunction, PowerWarmup  # noqa: E402
from fastema.torch import EMA, PostHocEMA  # noqa: E402


def _net(seed=0):
    return mlp(6, 12, 1, norm=nn.BatchNorm1d, seed=seed)


def _train(net, steps, *averages, seed=1, record=None, lr=0.05):
    """A real loop (forward, loss, backward, SGD with momentum, BatchNorm); each average's
    ``update()`` after every step; ``record(i)`` sees the weights after step i (1-based)."""
    def each(i):
        if record is not None:
            record(i)
        for a in averages:
            a.update()

    train_sampled([net], steps, each, optimizer=lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9), seed=seed)


def _power_ema64(samples, gamma):
    """Float64 reference: the sample taken at t_i weighs (t_i^(g+1) - t_(i-1)^(g+1)) / t^(g+1)."""
    times = [t for t, _ in samples]
    last = times[-1]
    out = 0
    for (t, w), prev in zip(samples, [0] + times[:-1]):
        out = out + ((t / last) ** (gamma + 1) - (prev / last) ** (gamma + 1)) * w
    return out


@pytest.mark.parametrize("every", [1, 4])
def test_tracked_profiles_equal_a_float64_power_function_ema_of_the_recorded_weights(tmp_path, every):
    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10, 0.2), snapshot_every=None, path=tmp_path, update_every=every)
    samples = []
    _train(net, 60, ph, record=lambda i: (i - 1) % every == 0 and samples.append(
        (i, {k: v.detach().double().clone() for k, v in net.named_parameters()})))
    for row, s in enumerate((0.05, 0.10, 0.2)):
        got = ph.averaged_state_dict(row)
        for name, _ in net.named_parameters():
            ref = _power_ema64([(t, w[name]) for t, w in samples], sigma_rel_to_gamma(s))
            torch.testing.assert_close(got[name].double(), ref, rtol=1e-5, atol=1e-6)
    assert ph.plan.last_time == samples[-1][0]


def test_with_update_every_4_the_realised_profile_is_the_exact_delta_t_one():
    """Each sample's weight, read off a one-hot parameter, equals the integral of the profile
    over its interval [t_i - 4, t_i] (not the per-call profile of ema-pytorch), and its width is
    the requested sigma_rel."""
    T, every, sigma = 4001, 4, 0.05
    p = nn.Parameter(torch.zeros(T, dtype=torch.float64))
    holder = nn.Module()
    holder.p = p
    ema = EMA(holder, PowerFunction.of(sigma), update_every=every)
    with torch.no_grad():
        for c in range(1, T + 1):
            p.zero_()
            p[c - 1] = 1.0
            ema.update()
    w = ema.averaged_state_dict()["p"].numpy()
    g = sigma_rel_to_gamma(sigma)
    t = np.arange(1, T + 1, dtype=np.float64)
    due = (t - 1) % every == 0
    prev = np.concatenate([[0.0], t[due][:-1]])
    exact = np.zeros(T)
    exact[due] = (t[due] / T) ** (g + 1) - (prev / T) ** (g + 1)
    np.testing.assert_allclose(w, exact, rtol=1e-9, atol=1e-15)
    mid = t[due] - every / 2                                        # each sample stands for its interval
    mean = (w[due] * mid).sum()
    realised = math.sqrt((w[due] * mid ** 2).sum() - mean ** 2) / T
    assert realised == pytest.approx(sigma, abs=1e-3)


def test_half_life_schedule_is_exact_for_any_interval_and_for_steps_in_samples():
    net = _net()
    by_calls = EMA(net, HalfLife(7.0), update_every=3)
    by_samples = EMA(net, HalfLife(640.0))
    ref_c = {k: v.detach().double().clone() for k, v in net.named_parameters()}
    ref_s = {k: v.clone() for k, v in ref_c.items()}
    seen, last_c, last_s = 0, 0, 0
    g = torch.Generator().manual_seed(3)
    for call in range(1, 31):
        with torch.no_grad():
            for q in net.parameters():
                q.add_(torch.randn(q.shape, generator=g))
        batch = int(torch.randint(8, 64, (1,), generator=g))      # dynamic batch size
        seen += batch
        if (call - 1) % 3 == 0:
            d = 2.0 ** (-(call - last_c) / 7.0)
            ref_c = {k: d * ref_c[k] + (1 - d) * v.detach().double() for k, v in net.named_parameters()}
            last_c = call
        d = 2.0 ** (-(seen - last_s) / 640.0)
        ref_s = {k: d * ref_s[k] + (1 - d) * v.detach().double() for k, v in net.named_parameters()}
        last_s = seen
        by_calls.update()
        by_samples.update(step=seen)
    for ema, ref in ((by_calls, ref_c), (by_samples, ref_s)):
        got = ema.averaged_state_dict()
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-6)


def test_bema_equals_its_formula_over_a_training_loop():
    """Output = EMA_t + alpha_t (theta_t - theta_0), EMA weight beta_t = (lag + mult*tau)^-kappa
    (clamped below by min_ema_multiplier), alpha_t = (lag + mult*tau)^-eta, tau the steps since
    the first update, which copies (TRL's BEMACallback with update_freq = update_every)."""
    net = _net()
    sched = BEMA(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, min_ema_multiplier=0.05)
    ema = EMA(net, sched, update_every=2)
    ref = {}

    def record(i):
        if (i - 1) % 2:
            return
        theta = {k: v.detach().double().clone() for k, v in net.named_parameters()}
        if not ref:
            ref.update(theta0=theta, ema=dict(theta), t0=i)
            ref["out"] = dict(theta)
            return
        base = 10.0 + 1.0 * (i - ref["t0"])
        beta = max(base ** -0.5, 0.05)
        alpha = base ** -0.2
        ref["ema"] = {k: (1 - beta) * ref["ema"][k] + beta * theta[k] for k in theta}
        ref["out"] = {k: ref["ema"][k] + alpha * (theta[k] - ref["theta0"][k]) for k in theta}

    _train(net, 41, ema, record=record)
    out = ema.averaged_state_dict()                       # the one average BEMA shows: its output
    rows = ema.state_dict()["averaged"]                   # the checkpoint keeps its state: output, EMA, theta_0
    avg, first = ({k: v[r] for k, v in rows.items()} for r in (1, 2))
    assert ema.rows == 1
    for k in ref["out"]:
        torch.testing.assert_close(out[k].double(), ref["out"][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(avg[k].double(), ref["ema"][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(first[k].double(), ref["theta0"][k], rtol=0, atol=1e-7)
    with ema.average_parameters():                       # the swap puts the bias-corrected output in
        for k, v in net.named_parameters():
            torch.testing.assert_close(v.detach().double(), ref["out"][k], rtol=1e-5, atol=1e-6)


def test_timed_schedules_resume_bit_exact_from_a_checkpoint():
    for kw in (dict(decay=[PowerFunction.of(0.05), PowerFunction.of(0.1)], update_every=3),
               dict(decay=HalfLife(5.0)), dict(decay=BEMA())):
        a_net, b_net = _net(), _net()
        a = EMA(a_net, **kw)
        _train(a_net, 10, a)
        b_net.load_state_dict(a_net.state_dict())
        b = EMA(b_net, **kw)
        b.load_state_dict(a.state_dict())
        assert (b.plan.first_time, b.plan.last_time) == (a.plan.first_time, a.plan.last_time)
        _train(a_net, 7, a, seed=5)
        _train(b_net, 7, b, seed=5)
        saved_a, saved_b = a.state_dict()["averaged"], b.state_dict()["averaged"]     # every row (BEMA: its state)
        for k, v in saved_a.items():
            assert torch.equal(v, saved_b[k]), (kw, k)


def test_a_checkpoint_from_before_the_timed_schedules_still_loads():
    net = _net()
    ema = EMA(net, 0.9)
    _train(net, 3, ema)
    state = ema.state_dict()
    del state["first_time"], state["last_time"]
    again = EMA(net, 0.9)
    again.load_state_dict(state)
    assert again.updates == 3 and again.plan.last_time == 0.0
    assert all(torch.equal(v, ema.averaged_state_dict()[k]) for k, v in again.averaged_state_dict().items())


BAD_SCHEDULES = {      # the keyword arguments of EMA (made when the case runs: a bad schedule raises when made)
    "decay and a profile": (lambda: dict(decay=[0.9, PowerFunction.of(0.1)]),
                            "one kind of schedule for every average, got Constant, PowerFunction"),
    "a profile and a half-life": (lambda: dict(decay=[PowerFunction.of(0.1), HalfLife(3.0)]),
                                  "one kind of schedule for every average, got PowerFunction, HalfLife"),
    "a profile and a warm-up": (lambda: dict(decay=[PowerFunction.of(0.1), PowerWarmup(0.9)]),
                                "one kind of schedule for every average"),
    "a profile compensated": (lambda: dict(decay=PowerFunction.of(0.1), compensate=True, update_every=2),
                              r"decay=PowerFunction\(\.\.\.\) is a schedule over training time.*takes no compensate="),
    "a half-life compensated": (lambda: dict(decay=HalfLife(10.0), compensate=True, update_every=2),
                                r"decay=HalfLife\(\.\.\.\) is a schedule over training time.*takes no compensate="),
    "BEMA compensated": (lambda: dict(decay=BEMA(), compensate=True, update_every=2), "takes no compensate="),
    "a warm-up setting beside a profile": (lambda: dict(decay=PowerFunction.of(0.1), update_after_step=100),
                                           "unexpected keyword argument 'update_after_step'"),
    "a warm-up setting beside BEMA": (lambda: dict(decay=BEMA(), min_decay=0.5),
                                      "unexpected keyword argument 'min_decay'"),
    "sigma_rel too wide": (lambda: dict(decay=PowerFunction.of(0.3)), "sigma_rel must be a number in"),
    "half-life of 0": (lambda: dict(decay=HalfLife(0.0)), "half_life must be a finite number > 0"),
    "BEMA debiased": (lambda: dict(decay=BEMA(), debias=True), r"decay=BEMA\(\.\.\.\) keeps one average.*no debias="),
    "two BEMAs": (lambda: dict(decay=[BEMA(), BEMA(lag=5.0)]), r"decay=BEMA\(\.\.\.\) keeps one average.*one BEMA"),
    "BEMA on the device": (lambda: dict(decay=BEMA(), device_step=True), "does not take device_step=True"),
    "not a schedule": (lambda: dict(decay="yes"), "decay must be"),
}


@pytest.mark.parametrize("case", BAD_SCHEDULES)
def test_bad_schedule_arguments_are_refused(case):
    make, match = BAD_SCHEDULES[case]
    with pytest.raises((ValueError, TypeError), match=match):
        EMA(_net(), **make())


def test_a_step_that_goes_back_is_refused_and_changes_nothing():
    net = _net()
    ema = EMA(net, PowerFunction.of(0.1))
    ema.update(step=10)
    before = {k: v.clone() for k, v in ema.averaged_state_dict().items()}
    with pytest.raises(ValueError, match="do not go back"):
        ema.update(step=9)
    assert ema.updates == 1 and ema.calls == 1 and ema.plan.last_time == 10
    assert all(torch.equal(v, before[k]) for k, v in ema.averaged_state_dict().items())


def test_power_function_closed_form():
    s = PowerFunction.of(0.1)
    assert s.sigma_rel == pytest.approx(0.1)
    assert s.between(None, 0, 5) == 0.0                       # the first update copies
    assert s.between(1, 3, 7) == pytest.approx((3 / 7) ** (s.gamma + 1), rel=1e-15)
    assert s(8) == pytest.approx((1 - 1 / 8) ** (s.gamma + 1), rel=1e-15)      # EDM2's unit-step form
    assert Plan(PowerFunction.of(0.1)).decay == 0.0


# --------------------------------------------------------------------------- synthesis

def test_least_squares_picks_a_stored_profile_exactly_and_sums_to_one():
    times = [100, 100, 200, 200, 300, 300]
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.1)] * 3
    sol = posthoc.solve(times, gammas, sigma_rel=0.1)
    assert sol.error < 1e-6
    assert sol.coefficients[5] == pytest.approx(1, abs=1e-6)
    assert sol.coefficients.sum() == pytest.approx(1, abs=1e-12)
    mid = posthoc.solve(times, gammas, sigma_rel=0.07, time=250, max_error=1.0)     # 3 snapshots: rough
    assert mid.coefficients.sum() == pytest.approx(1, abs=1e-12) and mid.time == 250


def test_profile_inner_product_is_the_integral_of_the_product():
    ga, gb, ta, tb = 3.5, 9.0, 70.0, 100.0
    tau = np.linspace(0, 100, 200001)
    num = np.trapezoid(posthoc.profile(tau, ta, ga) * posthoc.profile(tau, tb, gb), tau)
    assert posthoc.profile_dot(ta, ga, tb, gb) == pytest.approx(num, rel=1e-4)
    assert posthoc.profile_dot(tb, gb, ta, ga) == pytest.approx(num, rel=1e-4)


def test_synthesis_between_two_tracked_profiles_on_a_training_run(tmp_path):
    """Done-when: sigma_rel 0.07 synthesised from 0.05 and 0.10 snapshots is within 2% of the
    distance between those two of an EMA tracked at 0.07; the blend of the last snapshots is not."""
    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=20, path=tmp_path)
    truth = EMA(net, PowerFunction.of(0.07))
    _train(net, 600, ph, truth)
    assert len(list(tmp_path.glob("snapshot-*.safetensors"))) == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fastema-") and p.name != ".fastema-run"]
    synth = ph.synthesize(sigma_rel=0.07)
    ref, a, b = truth.averaged_state_dict(), ph.averaged_state_dict(0), ph.averaged_state_dict(1)
    names = [n for n, _ in net.named_parameters()]

    def dist(x, y):
        return math.sqrt(sum(float((x[n].double() - y[n].double()).norm()) ** 2 for n in names))

    gap = dist(a, b)
    blend = {n: (a[n] + b[n]) / 2 for n in names}
    assert dist(synth, ref) < 0.02 * gap, (dist(synth, ref), gap)
    assert dist(blend, ref) > 0.02 * gap
    assert synth.solution.error < 1e-2
    for k, v in net.state_dict().items():                    # buffers from the last snapshot
        if "running" in k or "num_batches" in k:
            assert torch.equal(synth[k], ref[k]), k
    model = _net(7)
    ph.synthesize(sigma_rel=0.07, into=torch.compile(model))       # wrappers looked through
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, synth[k].to(v.dtype))


def test_synthesis_of_a_tracked_profile_returns_that_profile(tmp_path):
    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=10, path=tmp_path, update_every=3)
    _train(net, 90, ph)
    for row, s in enumerate((0.05, 0.10)):
        got = ph.synthesize(s)
        for k, v in ph.averaged_state_dict(row).items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k], v.float(), rtol=1e-5, atol=1e-6)


def test_a_time_between_two_snapshots_is_refused_naming_them(tmp_path):
    """A profile at a time is combined from the snapshots up to it, and the last of them must be at
    that time: between two snapshots the refusal names both (it said the time was after the last
    snapshot, the range being the snapshots before the time)."""
    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=50, path=tmp_path)
    _train(net, 150, ph)
    for synthesize in (ph.synthesize, functools.partial(posthoc.synthesize, tmp_path)):
        with pytest.raises(ValueError, match="between the snapshots at 50 and 100.*such as 50 or "
                                             "100"):
            synthesize(0.07, time=75)
    assert ph.synthesize(0.07, time=100, max_error=1.0).solution.time == 100


def test_the_constructor_refuses_what_it_cannot_take_by_name(tmp_path):
    """A width given as a string, a misspelt keyword and a path that is a file: each refused by
    name before anything is made (they read "must differ from each other, got ('0', '.', '0',
    '5')", "ema_parts() got an unexpected keyword argument" and a bare FileExistsError)."""
    net = _net()
    with pytest.raises(TypeError, match="sigma_rels must be a number or a sequence.*str '0.05'"):
        PostHocEMA(net, "0.05", snapshot_every=10, path=tmp_path / "a")
    with pytest.raises(TypeError, match=r"PostHocEMA\(\) got an unexpected keyword argument "
                                        r"'updte_every' \(did you mean 'update_every'\?\)"):
        PostHocEMA(net, snapshot_every=10, path=tmp_path / "b", updte_every=2)
    for wrong, meant in (("sigma_rel", "sigma_rels"), ("snapshot_dtyp", "snapshot_dtype")):
        with pytest.raises(TypeError, match=f"'{wrong}' \\(did you mean '{meant}'\\?\\)"):
            PostHocEMA(net, snapshot_every=10, path=tmp_path / "b", **{wrong: 0.1})
    with pytest.raises(TypeError, match="unexpected keyword argument 'kind'"):
        PostHocEMA(net, snapshot_every=10, path=tmp_path / "c", kind="EMA")
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(NotADirectoryError, match="is a file: PostHocEMA writes its snapshots into "
                                                 "a folder"):
        PostHocEMA(net, snapshot_every=10, path=file)
    assert file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    one = PostHocEMA(net, np.float32(0.05), snapshot_every=10, path=tmp_path / "d")  # NumPy's
    assert one.sigma_rels == (pytest.approx(0.05),)


def test_targets_the_snapshots_cannot_represent_are_refused(tmp_path):
    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=50, path=tmp_path)
    with pytest.raises(RuntimeError, match="before any update"):
        ph.snapshot()
    _train(net, 100, ph)
    with pytest.raises(ValueError, match="relative error of"):
        ph.synthesize(sigma_rel=0.25)
    with pytest.raises(ValueError, match="not after the last snapshot"):
        ph.synthesize(sigma_rel=0.07, time=101)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        posthoc.synthesize(tmp_path / "empty", 0.07)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        posthoc.synthesize(tmp_path / "missing", 0.07)
    target = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="do not match this model"):
        ph.synthesize(0.07, into=target, max_error=1.0)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    wider = nn.Sequential(nn.Linear(6, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 1))   # same names
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="do not fit this model.*nothing was loaded"):
        ph.synthesize(0.07, into=wider, max_error=1.0)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())


def test_a_synthesis_beyond_the_models_dtype_is_refused_with_nothing_loaded(tmp_path):
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(1e5)                                  # beyond float16's 65504
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=5, path=tmp_path)
    for _ in range(20):
        ph.update()
    half = nn.Linear(3, 2).half()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    with pytest.raises(ValueError, match=r"'weight' hold values beyond the model's dtype \(float16.*nothing was"):
        ph.synthesize(0.07, into=half, max_error=1.0)
    assert all(torch.equal(v, before[k]) for k, v in half.state_dict().items())
    wide = nn.Linear(3, 2).double()
    ph.synthesize(0.07, into=wide, max_error=1.0)             # float64 holds it
    assert torch.allclose(wide.weight, torch.full((2, 3), 1e5, dtype=torch.float64))


def test_command_line_synthesis_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import subprocess
    import sys

    from safetensors.torch import load_file

    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=25, path=tmp_path / "snaps", snapshot_dtype="float16")
    _train(net, 200, ph)
    out, png = tmp_path / "ema.safetensors", tmp_path / "profiles.png"
    run = subprocess.run([sys.executable, "-m", "fastema", "posthoc", str(tmp_path / "snaps"), "--sigma-rel", "0.07",
                          "--out", str(out), "--plot", str(png)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "relative error" in run.stdout
    assert png.stat().st_size > 10_000
    got = load_file(str(out))
    want = posthoc.synthesize(tmp_path / "snaps", 0.07)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    bad = subprocess.run([sys.executable, "-m", "fastema", "posthoc", str(tmp_path / "snaps"), "--sigma-rel", "0.26",
                          "--out", str(tmp_path / "bad.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 1 and "relative error" in bad.stderr and not (tmp_path / "bad.safetensors").exists()


def test_post_hoc_ema_inside_torch_compile_fullgraph_snapshots_and_equals_eager(tmp_path):
    """PostHocEMA.update() compiled with the forward (fullgraph=True: no graph break) writes its
    snapshots at the same updates as an eager PostHocEMA of the same model, with equal profiles."""
    import torch._dynamo as dynamo

    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=3, path=tmp_path / "c")
    eager = PostHocEMA(net, (0.05, 0.10), snapshot_every=3, path=tmp_path / "e")

    def step(model, ema, x, y):
        loss = nn.functional.mse_loss(model(x), y)
        ema.update()
        return loss

    compiled = torch.compile(step, fullgraph=True)
    dynamo.reset()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(7):
        x = torch.randn(16, 6, generator=g)
        loss = compiled(net, ph, x, x.sum(1, keepdim=True))
        eager.update()
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = sorted(p.name for p in (tmp_path / "c").glob("snapshot-*"))
    assert names == sorted(p.name for p in (tmp_path / "e").glob("snapshot-*")) and len(names) == 2
    for r in range(2):
        for k, v in ph.averaged_state_dict(r).items():
            assert torch.equal(v, eager.averaged_state_dict(r)[k]), (r, k)
    explain = dynamo.explain(step)(net, ph, x, x.sum(1, keepdim=True))
    assert (explain.graph_count, explain.graph_break_count) == (1, 0)


@given(st.lists(st.tuples(st.integers(1, 10), st.floats(0.06, 0.25)), min_size=2, max_size=6, unique_by=lambda v: v[0]),
       st.floats(0.06, 0.25), st.floats(0.5, 1.0))
@example([(1, 0.25), (9, 0.25)], 0.24999999999999997, 1.0)   # the target is a stored profile: error 0 (CI, 11-26)
def test_reported_error_is_the_l2_distance_of_the_synthesised_profile(stored, target, when):
    """Property: the relative error solve() reports equals the L2 distance, integrated
    numerically, between the target profile and the combination of stored profiles it returns."""
    times = [100.0 * t for t, _ in stored]
    gammas = [sigma_rel_to_gamma(s) for _, s in stored]
    t_r = max(times) * when
    sol = posthoc.solve(times, gammas, sigma_rel=target, time=t_r, max_error=float("inf"))
    # Gauss-Legendre on each piece between the profiles' ends, where every profile is smooth (a
    # grid across an end integrates its jump to O(h): a target ending just before a snapshot's
    # end, when=0.99999, was off by 7%)
    nodes, w = np.polynomial.legendre.leggauss(64)
    ends = sorted({0.0, t_r, *times})
    tau = np.concatenate([(b - a) / 2 * nodes + (a + b) / 2 for a, b in zip(ends, ends[1:])])
    dtau = np.concatenate([(b - a) / 2 * w for a, b in zip(ends, ends[1:])])
    synth = sum(x * posthoc.profile(tau, t, g) for t, g, x in zip(times, gammas, sol.coefficients))
    want = posthoc.profile(tau, t_r, sol.gamma)
    num = math.sqrt(np.sum((want - synth) ** 2 * dtau) / np.sum(want ** 2 * dtau))
    # solve() computes the error as the square root of a difference of O(1) terms (|t|^2 - 2 x.b + x.A.x),
    # so near an exact fit it reads sqrt(a few ulps), about 1e-8, where the integral gives 1e-16
    assert sol.error == pytest.approx(num, rel=1e-6, abs=5e-8)
    assert sol.coefficients.sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("snapshot_dtype", ["float32", "bfloat16", "float16"])
def test_streamed_snapshot_files_read_back_with_safetensors(tmp_path, snapshot_dtype):
    """Snapshots are streamed one tensor at a time in the safetensors format: safetensors itself
    reads them back (every tensor, its dtype, shape and values, and the metadata), for a bfloat16
    model with a channels_last convolution, an empty parameter and integer buffers."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    net.empty = nn.Parameter(torch.zeros(0, 3))
    net = net.to(torch.bfloat16).to(memory_format=torch.channels_last)
    ph = PostHocEMA(net, (0.05, 0.1), snapshot_every=None, path=tmp_path, snapshot_dtype=snapshot_dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1)
    ph.update()
    path = ph.snapshot()
    got = load_file(path)
    want_dtype = getattr(torch, snapshot_dtype)
    for k in range(2):
        for name, v in ph.averaged_state_dict(k).items():
            if name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
                assert torch.equal(got[f"model:{name}"], net.state_dict()[name]), name
                continue
            shadow = ph._avg.view(name, k)
            assert got[f"{k}:{name}"].dtype == want_dtype and got[f"{k}:{name}"].shape == shadow.shape
            assert torch.equal(got[f"{k}:{name}"], shadow.to(want_dtype)), (k, name)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == posthoc.FORMAT and meta["dtype"] == snapshot_dtype and float(meta["time"]) == 1.0
    assert posthoc.read_snapshots(tmp_path)[0].averaged == [n for n in net.state_dict() if "running" not in n
                                                            and "num_batches" not in n]


# --------------------------------------------------------------------------- the command line: bad input

@pytest.fixture
def snaps(tmp_path):
    net = _net()
    ph = PostHocEMA(net, (0.05, 0.10), snapshot_every=10, path=tmp_path / "snaps")
    _train(net, 40, ph)
    return tmp_path / "snaps"


@pytest.mark.parametrize("args, rc, named", [
    (["--gamma", "1e308"], 2, "--gamma"),                      # was OverflowError with a traceback
    (["--sigma-rel", "0.07", "--max-error", "-1"], 2, "--max-error"),
    (["--sigma-rel", "0.07", "--max-error", "nan"], 2, "--max-error"),
    (["--sigma-rel", "0.07", "--time", "nan"], 2, "--time"),
    (["--sigma-rel", "0.07", "--gamma", "5"], 2, "--gamma"),
    (["--sigma-rel", "0.07", "--out", "{dir}"], 1, "is a directory"),          # was IsADirectoryError
    (["--sigma-rel", "0.07", "--out", "/sys/o.pt"], 1, "/sys/o.pt"),          # was PermissionError
    (["--sigma-rel", "0.07", "--out", "{file}/o.pt"], 1, "does not exist"),
    (["--sigma-rel", "0.07", "--plot", "{dir}"], 1, "is a directory"),         # L2: wrote DIR.png
])
def test_command_line_refuses_bad_arguments_in_one_line(snaps, tmp_path, capsys, args, rc, named):
    """reliability L1/L2: every bad argument is one line naming it (no traceback), and nothing is written."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    args = [a.format(dir=tmp_path / "adir", file=tmp_path / "afile") for a in args]
    if "--out" not in args and "--plot" not in args:
        args += ["--out", str(tmp_path / "o.safetensors")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    got, out, err = run_cli(capsys, snaps, *args)
    assert got == rc and not out
    one_line(err, named)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("where", ["the last snapshot", "the claim file", "a superseded folder's"])
def test_command_line_never_writes_over_what_the_run_keeps_in_its_folder(snaps, tmp_path, capsys, where):
    """--out over the run's last snapshot replaced it with plain weights (the folder unreadable from
    then on), over .fastema-run the run's claim: refused, nothing written. Another name in the folder
    (a plot beside the snapshots, as the guide's example puts it) is not the run's and is taken."""
    names = sorted(p.name for p in snaps.iterdir())
    target = {"the last snapshot": snaps / [n for n in names if n.startswith("snapshot-")][-1],
              "the claim file": snaps / ".fastema-run",
              "a superseded folder's": snaps / "superseded-000000000010" / "x.safetensors"}[where]
    target.parent.mkdir(exist_ok=True)
    before = {p.name: p.read_bytes() for p in snaps.iterdir() if p.is_file()}
    rc, out, err = run_cli(capsys, snaps, "--sigma-rel", "0.07", "--out", target)
    assert rc == 1 and not out
    one_line(err, "--out", "would replace the run's")
    assert {p.name: p.read_bytes() for p in snaps.iterdir() if p.is_file()} == before
    rc, out, err = run_cli(capsys, snaps, "--sigma-rel", "0.07", "--out", snaps / "ema.safetensors")
    assert rc == 0, err
    assert posthoc.synthesize(snaps, 0.07)                  # the folder still reads


def test_command_line_out_and_plot_of_one_file_or_a_plot_past_max_error_write_nothing(snaps, tmp_path, capsys):
    """--out F --plot F wrote the weights, then the image over them (exit 0); with --max-error inf and a
    target the snapshots represent badly, the weights were written, then the plot refused it at its own
    default max_error of 1 (exit 1, advising the --max-error given)."""
    pytest.importorskip("matplotlib")
    same = tmp_path / "same.png"
    rc, out, err = run_cli(capsys, snaps, "--sigma-rel", "0.07", "--out", same, "--plot", same)
    assert rc == 1 and not out and not same.exists()
    one_line(err, "--out and --plot name one file")
    w, p = tmp_path / "w.safetensors", tmp_path / "p.png"
    rc, out, err = run_cli(capsys, snaps, "--sigma-rel", "0.001", "--max-error", "inf", "--out", w, "--plot", p)
    assert rc == 0, err
    assert w.exists() and p.exists()


def test_command_line_out_safetensors_of_a_dtype_it_cannot_store_is_refused_before_the_synthesis(tmp_path, capsys):
    # a complex128 buffer kept as it is: a traceback (safetensors' KeyError) after the whole synthesis; a
    # torch file holds it. ".SAFETENSORS" was written as a torch file
    net = with_complex_buffer()
    ph = PostHocEMA(net, snapshot_every=5, path=tmp_path / "run", copy=["z"])
    for _ in range(10):
        with torch.no_grad():
            net.lin.weight.add_(0.1)
        ph.update()
    out = tmp_path / "ema.safetensors"
    rc, _, err = run_cli(capsys, tmp_path / "run", "--sigma-rel", "0.07", "--out", out)
    assert rc == 1 and not out.exists()
    one_line(err, "--out", "'z' is complex128", "ema.pt")
    rc, _, err = run_cli(capsys, tmp_path / "run", "--sigma-rel", "0.07", "--max-error", "1", "--out",
                         tmp_path / "ema.pt")
    assert rc == 0, err
    assert torch.equal(torch.load(tmp_path / "ema.pt")["z"], net.z)
    upper = tmp_path / "LIN.SAFETENSORS"
    PostHocEMA(nn.Linear(2, 2), snapshot_every=1, path=tmp_path / "plain").update()
    rc, _, err = run_cli(capsys, tmp_path / "plain", "--sigma-rel", "0.07", "--max-error", "inf", "--out", upper)
    assert rc == 0, err
    from safetensors.torch import load_file

    assert set(load_file(str(upper))) == {"weight", "bias"}


def test_command_line_plot_prints_the_file_it_wrote(snaps, tmp_path, capsys):
    """reliability L2: ``--plot NAME`` without an extension wrote NAME.png and printed NAME."""
    pytest.importorskip("matplotlib")
    rc, out, err = run_cli(capsys, snaps, "--sigma-rel", "0.07", "--plot", tmp_path / "profiles")
    assert rc == 0 and out.strip() == f"wrote {tmp_path / 'profiles.png'}" and (tmp_path / "profiles.png").exists()
    assert not (tmp_path / "profiles").exists()


def test_command_line_plot_without_matplotlib_says_what_to_install_and_writes_nothing(
        snaps, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)             # not installed: ImportError
    out = tmp_path / "o.safetensors"
    rc, printed, err = run_cli(capsys, snaps, "--sigma-rel", "0.07", "--out", out,
                               "--plot", tmp_path / "profiles")
    assert rc == 1 and not printed
    one_line(err, "matplotlib", "pip install 'fastema[plot]'")
    assert not out.exists() and not (tmp_path / "profiles.png").exists()


def test_every_command_line_option_has_help_and_its_default(capsys):
    """reliability L14: every posthoc option says what it does and its default."""
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    blocks = {}
    for line in out.split("options:")[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif line.strip():
            blocks[current] += " " + line.strip()
    options = {"--sigma-rel", "--gamma", "--time", "--out", "--plot", "--max-error"}
    assert options <= set(blocks), blocks
    for option in options:
        text = " ".join(blocks[option].split()[2:])
        assert len(text) > 20 and "default" in text, (option, blocks[option])
    assert "(default: 0.05)" in " ".join(blocks["--max-error"].split())


def test_no_snapshot_at_time_0(tmp_path):
    """A loop passing its global step from 0 wrote a snapshot of time 0 (snapshot_every=1, or
    snapshot() after the first update), and every synthesis of the folder was refused from then on
    without naming the file: the cadence skips time 0, and snapshot() there says why it cannot."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    ph = PostHocEMA(m, sigma_rels=(0.05, 0.1), snapshot_every=1, path=str(tmp_path / "a"))
    ph.update(step=0)
    with pytest.raises(RuntimeError, match=r"snapshot\(\) at time 0 .*after an update at a later"):
        ph.snapshot()
    for step in range(1, 40):
        with torch.no_grad():
            m.weight.add_(0.01)
        ph.update(step=step)
    names = sorted(p.name for p in (tmp_path / "a").glob("snapshot-*"))
    assert len(names) == 39 and not any(n.startswith("snapshot-000000000000.") for n in names)
    assert ph.synthesize(0.07).solution.error < 1e-2


def test_a_renamed_snapshot_is_refused_not_overwritten(tmp_path):
    """A snapshot renamed to the name of a time still to come (snapshot-…40 holding time 10) was
    replaced by the writer at time 40 without a word, and time 10 was lost: a file whose name is
    not its time's is refused by name, before the update that would write over it."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    folder = tmp_path / "s"
    ph = PostHocEMA(m, sigma_rels=(0.05, 0.1), snapshot_every=10, path=str(folder))
    for step in range(1, 36):
        ph.update(step=step)
    (folder / "snapshot-000000000010.safetensors").rename(folder / "snapshot-000000000040"
                                                                    ".safetensors")
    kept = (folder / "snapshot-000000000040.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"snapshot-000000000040.safetensors' holds the snapshot of "
                                         r"time 10 \(its metadata\), whose name is 'snapshot-0+10"):
        for step in range(36, 41):
            ph.update(step=step)
    assert ph.updates == 39                                   # the update that would write: refused
    assert (folder / "snapshot-000000000040.safetensors").read_bytes() == kept


def test_a_checkpoint_of_another_number_of_profiles_names_both_widths(tmp_path):
    # posthoc.md: refused "naming both sets of widths"; with another count the message gave the
    # shapes and decay counts only
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    two = PostHocEMA(m, sigma_rels=(0.05, 0.1), snapshot_every=10, path=str(tmp_path / "a"))
    two.update(step=1)
    three = PostHocEMA(m, sigma_rels=(0.05, 0.1, 0.15), snapshot_every=10, path=str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"its profiles are sigma_rels=\[0.05, 0.1\] .*tracks "
                                         r"sigma_rels=\[0.05, 0.1, 0.15\].*sigma_rels=\(0.05, 0.1\)"):
        three.load_state_dict(two.state_dict())
    assert three.updates == 0


def test_a_module_whose_extra_state_is_no_tensor_is_refused_by_name_at_construction(tmp_path):
    """A module's ``get_extra_state()`` returning a dict (torch's documented hook, kept as it is by
    ``state_dict()``) failed construction with a foreign ``AttributeError: 'dict' object has no attribute
    'layout'``. A snapshot holds tensors only: refused by name, saying what to do, nothing made."""
    class WithExtra(nn.Linear):
        def get_extra_state(self):
            return {"seen": 3}

        def set_extra_state(self, state):
            pass

    with pytest.raises(TypeError, match=r"PostHocEMA cannot store _extra_state \(a dict: a module's "
                                        r"get_extra_state\(\)\) in its snapshots .* extra state as a tensor"):
        PostHocEMA(WithExtra(3, 3), (0.05,), snapshot_every=2, path=tmp_path / "snaps")
    assert not (tmp_path / "snaps").exists()
