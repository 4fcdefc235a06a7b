"""Benchmark rows that cannot lie (issue 70 item 7, ``bench/suite/checked.py``), on the CPU: a baseline
that writes into its own sources, one that computes another update and one never checked are
refused, naming the row; a row above the run's device-time ceiling is refused, one above the copy but
within the ceiling flagged, and a ceiling timed end to end is none. The false row of the 2026-11-26 H100
headline is rebuilt as it was."""
import numpy as np
import pytest
import torch
from torch import nn

from bench.suite.checked import (
    Refused,
    agree,
    aliased,
    checked,
    device_ceiling,
    is_baseline,
    same_work,
    to_float64,
    within_ceiling,
)
from fastema.torch import EMA


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.ParameterList([nn.Parameter(torch.randn(s).to(dtype)) for s in [(8, 4), (4,), (3, 5)]])


def _moved(params, by=0.1):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p), alpha=by)


def _rows(model, shadows):
    params = list(model.parameters())
    ema = EMA(model, 0.999)
    fns = {"fastema EMA.update": ema.update,
           "torch._foreach_lerp_": lambda: torch._foreach_lerp_(shadows(params), params, 0.001)}
    return params, ema, fns


def test_the_headline_baseline_that_lerped_each_tensor_into_itself_is_refused():
    """``p.detach().float()`` of a float32 parameter is the parameter: the 2026-11-26 baseline."""
    model = _model()
    params = list(model.parameters())
    f32 = [p.detach().float() for p in params]
    assert f32[0].data_ptr() == params[0].data_ptr()           # the defect, as it was
    ema = EMA(model, 0.999)
    with torch.no_grad(), pytest.raises(Refused, match="torch._foreach_lerp_: refused") as err:
        checked({"fastema EMA.update": ema.update,
                 "torch._foreach_lerp_": lambda: torch._foreach_lerp_(f32, params, 0.001)},
                {"fastema EMA.update": lambda: list(ema.averaged_state_dict().values()),
                 "torch._foreach_lerp_": lambda: f32}, ours="fastema EMA.update", inputs=params,
                move=lambda: _moved(params))
    assert "memory of input" in str(err.value) and err.value.row == "torch._foreach_lerp_"


def test_a_copied_shadow_agrees_and_the_callables_come_back_unchanged():
    model = _model()
    params = list(model.parameters())
    f32 = [p.detach().to(torch.float32, copy=True) for p in params]
    ema = EMA(model, 0.999)
    fns = {"fastema EMA.update": ema.update, "copy (ceiling)": lambda: None,
           "torch._foreach_lerp_": lambda: torch._foreach_lerp_(f32, params, 0.001)}
    with torch.no_grad():
        out = checked(dict(fns), {"fastema EMA.update": lambda: list(ema.averaged_state_dict().values()),
                                  "torch._foreach_lerp_": lambda: f32},
                      ours="fastema EMA.update", inputs=params, move=lambda: _moved(params))
    assert out == fns
    assert not torch.equal(f32[0], params[0])                  # the check saw an update, not a copy
    np.testing.assert_allclose(to_float64(f32[0]), to_float64(ema.averaged_state_dict()["0"]), rtol=1e-6)


@pytest.mark.parametrize("wrong", ["decay", "nothing", "copy"])
def test_a_baseline_computing_another_update_is_refused(wrong):
    """A baseline of another decay, one that does nothing and one that copies the sources (the
    result of lerping a tensor into itself, in fresh memory) all differ from fastema's result."""
    model = _model()
    params = list(model.parameters())
    shadows = [p.detach().clone() for p in params]
    ema = EMA(model, 0.999)
    update = {"decay": lambda: torch._foreach_lerp_(shadows, params, 0.01), "nothing": lambda: None,
              "copy": lambda: torch._foreach_copy_(shadows, params)}[wrong]
    refused = "as they were before it ran" if wrong == "nothing" else "differs from fastema's result"
    with torch.no_grad(), pytest.raises(Refused, match=refused):
        checked({"fastema EMA.update": ema.update, "baseline": update},
                {"fastema EMA.update": lambda: list(ema.averaged_state_dict().values()),
                 "baseline": lambda: shadows}, ours="fastema EMA.update", inputs=params,
                move=lambda: _moved(params))


def test_rows_named_with_their_scenario_are_told_apart():
    assert is_baseline("flat 2^28 | torch.lerp_") and is_baseline("timm ModelEmaV3")
    assert not is_baseline("flat 2^28 | copy (ceiling)") and not is_baseline("gpt2 | fastema EMA.update")
    assert not is_baseline("flat 2^28 | add_ (ceiling)")


def test_a_baseline_without_a_result_to_check_is_refused_before_anything_runs():
    ran = []
    with pytest.raises(Refused, match="torch.lerp_: refused: no result to check"):
        checked({"fastema": lambda: ran.append("fastema"), "torch.lerp_": lambda: ran.append("lerp")},
                {"fastema": lambda: []}, ours="fastema")
    assert ran == []


def test_bfloat16_results_are_compared_at_bfloat16_precision():
    model = _model(torch.bfloat16)
    params = list(model.parameters())
    f32 = [p.detach().float() for p in params]                 # a new tensor for bfloat16: no alias
    ema = EMA(model, 0.999)
    with torch.no_grad():
        checked({"fastema EMA.update": ema.update,
                 "mixed": lambda: (torch._foreach_mul_(f32, 0.999), torch._foreach_add_(f32, params, alpha=0.001))},
                {"fastema EMA.update": lambda: list(ema.averaged_state_dict().values()), "mixed": lambda: f32},
                ours="fastema EMA.update", inputs=params, move=lambda: _moved(params, by=100.0))


@pytest.mark.parametrize("by, refused", [(0.1, "a baseline that did nothing would agree"),
                                         (100.0, "as they were before it ran")])
def test_a_bfloat16_baseline_that_does_nothing_is_refused(by, refused):
    """At bfloat16 precision (2^-6 of the scale) one update at decay 0.999 after a small move is lost in
    the tolerance, and a baseline that did nothing agreed: the check refuses to vouch for it; after a
    move large enough to see, the same baseline is refused for leaving its result as it was."""
    model = _model(torch.bfloat16)
    params = list(model.parameters())
    shadows = [p.detach().clone() for p in params]
    ema = EMA(model, 0.999)
    with torch.no_grad(), pytest.raises(Refused, match=refused):
        checked({"fastema EMA.update": ema.update, "nothing": lambda: None},
                {"fastema EMA.update": lambda: list(ema.averaged_state_dict().values()), "nothing": lambda: shadows},
                ours="fastema EMA.update", inputs=params, move=lambda: _moved(params, by=by))


def test_numpy_arrays_and_views_that_share_memory_are_found():
    a = np.zeros(16, np.float32)
    assert aliased([a[4:8]], [a]) == [(0, 0)]
    assert aliased([a.copy()], [a]) == []
    with pytest.raises(Refused, match="row: refused: its result 0 is the memory of input 0"):
        agree("row", lambda: [a + 1], lambda: [a[:]], inputs=[a])
    t = torch.zeros(8)
    assert aliased([t[2:]], [t[:2]]) == [(0, 0)]               # one storage, whatever the view


def test_shapes_and_counts_must_match():
    with pytest.raises(Refused, match="2 arrays written against fastema's 1"):
        agree("row", lambda: [np.ones(3)], lambda: [np.ones(3), np.ones(3)])
    with pytest.raises(Refused, match=r"array 0 of shape \(4,\)"):
        agree("row", lambda: [np.ones(3)], lambda: [np.ones(4)])
    with pytest.raises(Refused, match="differs"):
        agree("row", lambda: [np.ones(3)], lambda: [np.array([1.0, np.nan, 1.0])])


def test_a_row_above_the_device_time_ceiling_is_refused_and_one_above_the_copy_flagged():
    """The ceiling: the fastest round by CUDA events of the run's copy (1:1) and in-place ``add_`` (2:1, a
    lerp's traffic); "% of a copy" divides by the copy's median. The 2026-11-26 headline's baseline read
    3830 GB/s against the run's copy of 3016: refused; a row one percent above the ceiling too (the broken
    input), one at it not."""
    n = 1 << 28
    c = device_ceiling({"copy (ceiling)": (8 * n, [8 * n / 3016e9, 8 * n / 3000e9, 8 * n / 2990e9]),
                        "add_ (ceiling)": (12 * n, [12 * n / 3080e9, 12 * n / 3050e9])}, elements=n)
    assert c.source == "add_ (ceiling)" and c.GBps == pytest.approx(3080) and c.copy_GBps == pytest.approx(3000)
    with pytest.raises(Refused, match=r"host-cost gpt2 float32 \| torch._foreach_lerp_: refused: 3830 GB/s "
                                      r"is 124.4% of this run's ceiling \(3080 GB/s, the fastest round of add_"):
        within_ceiling("host-cost gpt2 float32 | torch._foreach_lerp_", 3830.0, c)
    with pytest.raises(Refused, match="100.5% of this run's ceiling"):
        within_ceiling("flat | row", 1.005 * 3080.0, c)
    assert "103% of the copy, within the run's ceiling" in within_ceiling("flat | torch.lerp_", 3080.0, c)
    assert within_ceiling("row", 2900.0, c) is None
    assert within_ceiling("row", 3830.0, None) is None         # no ceiling measured (a CPU): nothing to hold to


def test_a_ceiling_timed_end_to_end_or_without_its_spread_or_copy_is_refused():
    """The suite's old ceiling: the 2^24 copy as a call and a sync (2885 GB/s on the H200 against 4262 by
    device time): no ceiling, and neither is one round (no spread) nor streams without a copy."""
    n = 1 << 24
    with pytest.raises(Refused, match="a e2e time is no ceiling"):
        device_ceiling({"copy (ceiling)": (8 * n, [46.5e-6] * 3)}, elements=n, timing="e2e")
    with pytest.raises(Refused, match="1 rounds: a ceiling needs at least 2"):
        device_ceiling({"copy (ceiling)": (8 * n, [31.5e-6])}, elements=n)
    with pytest.raises(Refused, match="no copy among"):
        device_ceiling({"add_ (ceiling)": (12 * n, [40e-6] * 3)}, elements=n)


def test_the_suite_refuses_a_baseline_row_without_a_check_or_without_fastema_in_its_rounds():
    """``bench/suite/conftest.py``'s ``checked_row``: what every suite scenario goes through. A baseline
    needs a check, and the check must keep fastema's update (``checked`` does; a check calling ``agree``
    names it, ``same_work``), which is then timed in the baseline's rounds: a check that keeps none (the
    broken input) is refused, so no speed-up is read against a row timed apart."""
    from types import SimpleNamespace

    from bench.suite.conftest import checked_row

    bench = SimpleNamespace(group="flat float32 (cuda)", extra_info={})
    with pytest.raises(Refused, match=r"flat float32 \(cuda\) \| torch.lerp_: refused: no check"):
        checked_row(bench, "torch.lerp_", None)
    ran = []
    with pytest.raises(Refused, match="its check kept no fastema update"):
        checked_row(bench, "torch.lerp_", lambda: ran.append(1))
    assert ran == [1]
    mine = lambda: None                                             # noqa: E731
    assert checked_row(bench, "torch.lerp_", lambda: (ran.append(2), same_work(mine))) is mine
    assert bench.extra_info == {"checked": True}
    ours, src, update, move = _many()
    theirs = [o.clone() for o in ours]
    got = checked_row(bench, "foreach", lambda: checked(
        {"fastema": update, "foreach": lambda: torch._foreach_lerp_(theirs, src, 0.1)},
        {"fastema": lambda: ours, "foreach": lambda: theirs}, ours="fastema", inputs=src, move=move))
    assert got is update                                            # checked() keeps fastema's own
    assert checked_row(SimpleNamespace(group="g", extra_info={}), "fastema", None) is None   # fastema's own
    assert checked_row(SimpleNamespace(group="g", extra_info={}), "add_ (ceiling)", None) is None
    with pytest.raises(Refused, match="differs"):
        checked_row(bench, "torch.lerp_", lambda: agree("torch.lerp_", lambda: [np.ones(2)], lambda: [np.zeros(2)]))


def test_the_jax_step_rows_check_passes_the_lerp_and_refuses_one_that_averages_nothing():
    """The JAX rows (``test_bench_jax_jit.py``): the tree_map lerp agrees with fastema's step from
    the check's start (the average away from the parameters); a "lerp" that averages nothing is
    refused."""
    jax = pytest.importorskip("jax")
    from bench.suite.test_bench_jax_jit import _check, _Row

    rng = np.random.default_rng(0)
    host = [rng.standard_normal((64,), dtype=np.float32) for _ in range(2)]
    _check(_Row("jit tree_map lerp"), host)()
    idle = _Row("jit tree_map lerp")
    idle._jitted = jax.jit(lambda p, s: ([x - 1e-3 * x for x in p], s))
    with pytest.raises(Refused, match="jit tree_map lerp.*not the same update"):
        _check(idle, host)()


def _many(seed=0):
    """``ema_update_many_``'s row (issue 77, M8): its shadows, its sources, the sources' move."""
    import fastema

    g = torch.Generator().manual_seed(seed)
    src = [torch.randn(s, generator=g) for s in [(8, 4), (4,), (3, 5)]]
    ours = [t.clone() for t in src]
    return ours, src, (lambda: fastema.ema_update_many_(ours, src, 0.9)), (lambda: _moved(src))


def test_a_baseline_that_does_nothing_and_reads_back_fastemas_result_is_refused():
    """M8's reproduction: a copy-paste slip in ``results`` (the baseline's is fastema's) vouched for
    a row that times nothing."""
    ours, src, update, move = _many()
    with pytest.raises(Refused, match="torch foreach: refused") as err:
        checked({"fastema": update, "torch foreach": lambda: None},
                {"fastema": lambda: ours, "torch foreach": lambda: ours}, ours="fastema", inputs=src, move=move)
    assert err.value.row == "torch foreach"


def test_a_baseline_whose_result_is_fastemas_memory_is_refused_whatever_it_writes():
    """It writes (fastema's arrays, a nudge within the tolerance) and reads fastema's update back:
    refused for the shared memory, which no value check can see."""
    ours, src, update, move = _many()
    with pytest.raises(Refused, match=r"nudge: refused: its result 0 is the memory of fastema's result 0 "
                                      r"\(3 such pairs\)"):
        checked({"fastema": update, "nudge": lambda: torch._foreach_mul_(ours, 1 + 1e-6)},
                {"fastema": lambda: ours, "nudge": lambda: ours}, ours="fastema", inputs=src, move=move)
    with pytest.raises(Refused, match="row: refused: its result 0 is the memory of fastema's result 0"):
        agree("row", lambda: ours, lambda: ours[:1])


def test_a_baseline_whose_result_its_run_did_not_change_is_refused():
    """Its result is a copy of fastema's (fresh memory, fastema's values): the baseline's run left it
    as it was, so the check compared nothing the baseline wrote."""
    ours, src, update, move = _many()
    with pytest.raises(Refused, match="copied: refused: its 3 result arrays are as they were before it ran"):
        checked({"fastema": update, "copied": lambda: None},
                {"fastema": lambda: ours, "copied": lambda: [o.clone() for o in ours]},
                ours="fastema", inputs=src, move=move)
    theirs = [o.clone() for o in ours]                # the same row, its baseline written out: agrees
    checked({"fastema": update, "foreach": lambda: torch._foreach_lerp_(theirs, src, 0.1)},
            {"fastema": lambda: ours, "foreach": lambda: theirs}, ours="fastema", inputs=src, move=move)
