"""GPU figures that cannot flatter (issue 86 item 1, ``bench/suite/figures.py``, ``bench/gpu/measure.py``):
each rule shown to refuse a deliberately broken row, on the CPU with no device. A row above the run's
device-time ceiling (``bench/tests/test_checked.py`` holds the ceiling itself), an unchecked baseline, a
baseline of another run or none, a host figure taken while the host waited for the GPU, a median without
its spread: each is refused, naming the row; every EMA group of the suite has its foreach row."""
import inspect

import pytest

from bench.suite.checked import Ceiling, Refused
from bench.suite.figures import MIN_ROUNDS, cell, check_row, ratio, table


def _row(us=10.0, run=1, **extra) -> dict:
    """A row as ``measure.interleaved`` writes it: each figure a median with its min-max over 7 batches."""
    m = {"calls": 200, "batches": 7, "run": run, "host_waited": 0, "host_bound_batches": 0}
    for figure, scale in (("host", 1.0), ("device", 0.5), ("e2e", 2.0)):
        v = us * scale
        m.update({f"{figure}_us": v, f"{figure}_us_min": 0.9 * v, f"{figure}_us_max": 1.2 * v, f"{figure}_rounds": 7})
    m.update(extra)
    return m


def test_a_median_is_printed_with_its_spread_and_refused_without_it():
    m = _row()
    assert cell(m, "host") == "10.0 (9.0-12.0)" and cell(m, "e2e") == "20.0 (18.0-24.0)"
    with pytest.raises(Refused, match=r"s \| fastema: refused: its device median \(5.0 us\) comes without its "
                                      r"spread"):
        cell(dict(m, device_us_max=None), "device", row="s | fastema")
    with pytest.raises(Refused, match=f"over >= {MIN_ROUNDS} rounds"):
        check_row("s | fastema", _row(host_rounds=1, device_rounds=1, e2e_rounds=1))
    assert cell(dict(m, host_bound_batches=3), "device").endswith("host-bound 3/7")


def test_a_host_figure_taken_while_the_host_waited_is_invalid_and_refused_as_a_number():
    """The H200's bfloat16 baseline: "40 ms" of host time, the GPU sleep it waited behind (host_bound 5/5)."""
    waited = _row(host_us=None, host_us_min=None, host_us_max=None, host_waited=5)
    assert cell(waited, "host") == "invalid: waited for the GPU in 5/7 batches"
    with pytest.raises(Refused, match=r"bf16 \| timm mixed: refused: its host figure \(40000.0 us\) was taken while "
                                      r"the host waited for the GPU in 5 of 7 batches"):
        check_row("bf16 | timm mixed", _row(host_us=40000.0, host_waited=5))
    rows = {"fastema": _row(), "timm mixed": dict(waited, checked=True)}
    assert ratio("bf16", rows, "fastema", "timm mixed", "host") is None     # no host ratio from it
    assert ratio("bf16", rows, "fastema", "timm mixed", "device") == pytest.approx(1.0)


def test_a_ratio_needs_a_checked_baseline_of_the_same_run():
    """The absolute host targets of round 8 had no baseline in their run (``EMA.update()`` at 148 tensors
    read 39.2 us in one script and 30.5 in another), and targets.py timed its baselines unchecked."""
    ours, base = _row(10.0, run=3), _row(15.0, run=3, checked=True)
    assert ratio("s", {"fastema": ours, "foreach": base}, "fastema", "foreach", "host") == pytest.approx(1.5)
    with pytest.raises(Refused, match=r"s \| foreach: refused: not checked against fastema's result"):
        ratio("s", {"fastema": ours, "foreach": dict(base, checked=False)}, "fastema", "foreach", "host")
    with pytest.raises(Refused, match=r"s \| foreach: refused: no baseline row in the same run"):
        ratio("s", {"fastema": ours}, "fastema", "foreach", "host")
    with pytest.raises(Refused, match=r"timed in another call \(run 4\) than 'fastema' \(run 3\)"):
        ratio("s", {"fastema": ours, "foreach": dict(base, run=4)}, "fastema", "foreach", "host")
    with pytest.raises(Refused, match="timed in another call"):       # a row without a run id: timed apart
        ratio("s", {"fastema": dict(ours, run=None), "foreach": base}, "fastema", "foreach", "host")
    native = _row(8.0, run=3)                                          # fastema against fastema: no check needed
    assert ratio("s", {"fastema compat": ours, "fastema native": native}, "fastema compat", "fastema native",
                 "e2e") == pytest.approx(0.8)


def test_the_table_keeps_the_figures_apart_and_says_why_a_ratio_is_refused():
    text = table({"s": {"fastema": _row(), "torch.lerp_": _row(20.0), "foreach": _row(30.0, checked=True),
                        "copy (ceiling)": _row(1.0)}})
    header = text.splitlines()[0]
    assert "| host us | device us | e2e us |" in header and "% of copy (device)" in header
    lerp = [ln for ln in text.splitlines() if "| torch.lerp_ |" in ln][0]
    assert "refused: not checked against fastema's result" in lerp
    foreach = [ln for ln in text.splitlines() if "| foreach |" in ln][0]
    assert foreach.endswith("| 3.00x, 3.00x, 3.00x |")
    assert [ln for ln in text.splitlines() if "| copy (ceiling) |" in ln][0].endswith("|  |")
    with pytest.raises(Refused, match="waited for the GPU"):
        table({"s": {"fastema": _row(host_waited=2)}})


class _Rec:
    """``common.Record``'s part that ``measure.record`` uses."""

    def __init__(self, ceiling=None):
        self.data = {"env": {"ceiling": vars(ceiling) if ceiling else None,
                             "copy_GBps": ceiling.copy_GBps if ceiling else None}, "timings": {}}

    def save(self):
        pass


def test_a_gpu_row_above_the_device_time_ceiling_is_refused_where_it_is_recorded():
    """``measure.record`` (the headline, the targets, the probe, the compiled step): a row's GB/s by its
    median device time against the run's ceiling; refused rows are written down as refused, then raised."""
    from bench.gpu import measure as M

    rec = _Rec(Ceiling(GBps=4400.0, copy_GBps=4262.0, source="add_ (ceiling)", elements=1 << 28))
    kept = M.record(rec, "flat", "torch.lerp_", _row(device_GBps=4350.0), checked=True)
    assert kept["checked"] and kept["pct_of_copy"] == pytest.approx(100 * 4350 / 4262) and "above_copy" in kept
    with pytest.raises(Refused, match=r"flat \| fastema.ema_update_: refused: 4500 GB/s is 102.3% of this run's "
                                      r"ceiling"):
        M.record(rec, "flat", "fastema.ema_update_", _row(device_GBps=4500.0))
    assert rec.data["timings"]["flat"]["fastema.ema_update_"] == {
        "refused": "flat | fastema.ema_update_: refused: 4500 GB/s is 102.3% of this run's ceiling (4400 GB/s, "
                   "the fastest round of add_ (ceiling) by device time at 268435456 elements): it cannot move the "
                   "bytes it is counted for"}
    with pytest.raises(Refused, match="waited for the GPU"):
        M.record(rec, "bf16", "timm", _row(host_waited=5))


def test_every_ema_group_of_the_suite_has_its_foreach_row():
    """§7.8 of the review: "EMA.update, float32 model 300x4096" was read against AveragedModel and timm only,
    where ``_foreach_lerp_`` (the same shapes in another group) would have read 0.91x. Each EMA group's
    parametrisation holds torch's foreach update (bfloat16 weights into a float32 shadow: ``_foreach_mul_``
    + ``_foreach_add_``, no mixed-dtype lerp); the stochastic-rounding group has none (no foreach op rounds
    stochastically)."""
    from bench.suite import test_bench_torch as T

    groups = {name: fn for name, fn in inspect.getmembers(T, inspect.isfunction) if name.startswith("test_")
              and ('benchmark.group = f"EMA.update' in inspect.getsource(fn)
                   or 'benchmark.group = "EMA.update' in inspect.getsource(fn))}
    assert set(groups) >= {"test_model_ema_float32", "test_model_ema_bfloat16_model_float32_shadow",
                           "test_ema_update_host_overhead", "test_bfloat16_shadow_stochastic_rounding"}
    for name, fn in groups.items():
        impls = [v for m in fn.pytestmark if m.name == "parametrize" and m.args[0] == "impl" for v in m.args[1]]
        if name == "test_bfloat16_shadow_stochastic_rounding":
            continue
        assert any(i.startswith("torch._foreach_") for i in impls), (name, impls)
