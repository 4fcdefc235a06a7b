"""Fail closed at the boundary: tensors whose memory is not where data_ptr() says (DTensors,
freed or shrunk storages, ZeRO-3 and FSDP1 parameters, lazy neg/conj views) are refused by
name with what to do, before anything is written, at construction and at every rebind; refused
calls (swap, update, construction) change nothing and count nothing. FlatShadow's refusals are in
tests/array/test_flat.py.

The former crashes (segfaults at 3c5c42b) run in a child process (one for all of them, each case in
its own namespace): a regression fails the tests instead of killing the test run."""
import subprocess
import sys

import pytest
import torch
from models import moved
from torch import nn

from fastema.schedules import NumUpdates, PowerWarmup
from fastema.torch import EMA
from fastema.torch.compat import ModelEmaV3

PRE = """
import torch, torch.nn as nn, torch.distributed as dist
import fastema
from fastema.torch import EMA
from fastema.torch.compat import ExponentialMovingAverage
dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
from torch.distributed.tensor import distribute_module, init_device_mesh
from torch.distributed.fsdp import fully_shard
mesh = init_device_mesh("cpu", (1,))

def refused(fn, *snapshots):
    before = [t.clone() for t in snapshots]
    try:
        fn()
    except (TypeError, ValueError) as err:
        assert all(torch.equal(a, b) for a, b in zip(before, snapshots)), "written before refusing"
        print("REFUSED:", err)
    else:
        print("NOT REFUSED")
"""

CASES = {
    # EMA(model) over DTensor parameters (FSDP2, tensor parallel) averages local shards: test_sharded.py
    "ema_over_partial_dtensor": (
        "from torch.distributed.tensor import DTensor, Partial\n"
        "m = nn.Linear(4, 4); m.weight = nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()]))\n"
        "refused(lambda: EMA(m, 0.9))", "placement P.*pending reductions"),
    "torch_ema_compat_over_fsdp2_params": (
        "refused(lambda: ExponentialMovingAverage(fully_shard(nn.Linear(4, 4)).parameters(), 0.9))",
        "is a DTensor.*to_local"),
    "ema_update_many_over_dtensors": (
        "a = distribute_module(nn.Linear(4, 4), mesh); b = distribute_module(nn.Linear(4, 4), mesh)\n"
        "with torch.no_grad(): refused(lambda: fastema.ema_update_many_(list(a.parameters()), "
        "list(b.parameters()), 0.9))", "is a DTensor"),
    "update_after_storage_freed": (
        "m = nn.Linear(64, 64); e = EMA(m, 0.9); avg = e.state_dict()['averaged']['weight']\n"
        "with torch.no_grad(): m.weight.untyped_storage().resize_(0)\n"
        "refused(e.update, avg)", "storage of source 'weight' was freed"),
    "update_after_storage_shrunk": (
        "m = nn.Linear(512, 512); e = EMA(m, 0.9); avg = e.state_dict()['averaged']['weight']\n"
        "with torch.no_grad(): m.weight.untyped_storage().resize_(16)\n"
        "refused(e.update, avg)", "holds 16 bytes but the tensor needs 1048576"),
    "swap_after_storage_shrunk": (
        "m = nn.Linear(512, 512); e = EMA(m, 0.9); avg = e.state_dict()['averaged']['weight']\n"
        "with torch.no_grad(): m.weight.untyped_storage().resize_(16)\n"
        "refused(e.swap, avg)", "holds 16 bytes"),
    "registered_replacement_with_freed_storage": (
        "m = nn.Linear(8, 8); e = EMA(m, 0.5); avg = e.state_dict()['averaged']['weight']\n"
        "m.weight = nn.Parameter(torch.zeros(8, 8)); m.weight.untyped_storage().resize_(0)\n"
        "refused(e.update, avg); assert e.calls == 0 and e.updates == 0", "was freed"),
    "views_of_a_freed_flat_buffer": (
        "flat = torch.zeros(4 * 64 + 64); w = nn.Parameter(flat[:256].view(4, 64)); b = nn.Parameter(flat[256:])\n"
        "f = fastema.FlatShadow([w, b]); flat.untyped_storage().resize_(0)\n"
        "refused(lambda: f.update(0.5), f.view(0))", "was freed"),
}


# Every case in one child, one after the other, each in its own copy of PRE's names: a case's report
# is the lines between its "CASE" and "END" lines; a case that kills the child (a former crash come
# back) leaves no "END" line, and fails its test and the ones after it with the child's exit status.
ALL_CASES = """
import traceback
for name, body in {cases!r}:
    print("CASE", name, flush=True)
    try:
        exec(body, dict(globals()))
    except Exception:
        print("ERROR:", traceback.format_exc())
    print("END", name, flush=True)
import gc; gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every case's report (its lines of output), and the child's exit status and stderr's end."""
    store = tmp_path_factory.mktemp("refusals") / "store"
    script = PRE.format(store=store) + ALL_CASES.format(cases=sorted((k, v[0]) for k, v in CASES.items()))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    found = {}
    for section in r.stdout.split("CASE ")[1:]:
        name, _, rest = section.partition("\n")
        if f"END {name}" in rest:
            found[name] = rest.split(f"END {name}")[0]
    return found, r.returncode, r.stderr[-3000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_former_crashes_are_refused_in_a_subprocess(case, reports):
    found, returncode, stderr = reports
    assert case in found, f"the child died before case {case} ended: exit {returncode} (negative: killed by a " \
                          f"signal)\n{stderr}"
    assert returncode == 0, f"exit {returncode}\n{stderr}"
    _, match = CASES[case]
    out = found[case]
    assert "REFUSED:" in out, out + stderr[-2000:]
    import re
    assert re.search(match, out), out
    assert "Nothing was written" in out or "Nothing was updated" in out, out


def zero3_param(shape=(5, 16)):
    """What DeepSpeed ZeRO-3 leaves on a module: an empty tensor with the partition elsewhere."""
    p = nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_shape, p.ds_numel = 0, shape, 80
    p.ds_tensor = torch.zeros(40)
    return p


def test_zero3_parameters_are_refused_by_name():
    m = nn.Linear(16, 5)
    m.weight = zero3_param()
    with pytest.raises(TypeError, match="ZeRO-3 partitioned parameter.*full shape \\(5, 16\\)"):
        EMA(m, 0.9)
    with pytest.raises(TypeError, match="ZeRO-3"):
        ModelEmaV3(m, 0.9).update(m)


def test_fsdp1_parameters_and_names_are_refused():
    m = nn.Linear(4, 4)
    m.weight._fsdp_flattened = True                    # what FSDP1 marks its parameters with
    with pytest.raises(TypeError, match="FSDP1.*fully_shard"):
        EMA(m, 0.9)

    class Wrapped(nn.Module):                          # FSDP1's module naming, without an accelerator
        def __init__(self):
            super().__init__()
            self._fsdp_wrapped_module = nn.Linear(4, 4)

    with pytest.raises(TypeError, match="FSDP1"):
        EMA(Wrapped(), 0.9)






def test_lazy_modules_are_refused_until_materialised():
    m = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match="uninitialized parameter of a lazy module.*forward pass"):
        EMA(m, 0.9)
    m(torch.zeros(2, 3))
    assert EMA(m, 0.9).averaged_state_dict()["0.weight"].shape == (4, 3)


# ------------------------------------------------------------------ refused calls change nothing

# reliability review M10, L2
def test_a_refused_swap_or_update_leaves_everything_as_it_was():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(m, 0.5)
    moved(ema, m)
    raw = m[0].weight.detach().clone()
    avg = ema.state_dict()["averaged"]["0.weight"].clone()
    m[1].running_mean.data = m[1].running_mean.data.half()
    with pytest.raises(ValueError, match="running_mean"):
        with ema.average_parameters():
            pass
    assert torch.equal(m[0].weight, raw) and not ema.swapped
    with pytest.raises(ValueError, match="running_mean"):
        ema.update()
    assert torch.equal(ema.state_dict()["averaged"]["0.weight"], avg)
    assert ema.updates == 1 and ema.calls == 1
    m[1].running_mean.data = m[1].running_mean.data.float()
    with ema.average_parameters():
        assert torch.equal(m[0].weight, avg[0])
    assert torch.equal(m[0].weight, raw)


# reliability review L1, L3-L5
def test_refused_updates_are_not_counted_and_arguments_are_checked_early():
    ema = EMA(nn.Linear(4, 4), NumUpdates(0.5))
    for step in ("abc", -10, float("nan"), 1.5):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            ema.update(step=step)
    assert ema.calls == 0 and ema.updates == 0
    ema.update(step=3)
    assert ema.calls == 1


# reliability review L1, L3-L5
@pytest.mark.parametrize("decay,kwargs,match", [
    (lambda: 0.5, dict(rounding="stochastic", shadow_dtype="bfloat16", seed=-1), "seed must be"),
    (lambda: 0.5, dict(rounding="stochastic", shadow_dtype="bfloat16", seed="abc"), "seed must be"),
    (lambda: PowerWarmup(0.5, min_decay=5, warmup=False), {}, "min_decay must be"),      # the start-only variant too
    (lambda: PowerWarmup(0.5, inv_gamma=-1, warmup=False), {}, "inv_gamma must be"),
    (lambda: PowerWarmup(0.5, update_after_step=1.5), {}, "update_after_step must be"),
    (lambda: 0.5, dict(skip_nonfinite="yes"), "skip_nonfinite must be"),
])
def test_bad_constructor_arguments_are_refused_whatever_the_warmup(decay, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EMA(nn.Linear(4, 4), decay(), **kwargs)


# reliability review L1, L3-L5
def test_complex_parameters_are_refused_unless_copied():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
            self.w = nn.Parameter(torch.zeros(3))

    with pytest.raises(TypeError, match="complex.*copy="):
        EMA(C(), 0.5)
    m = C()
    ema = EMA(m, 0.5, copy=["z"])
    moved(ema, m, 2.0)
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["z"], m.z.detach()) and torch.equal(sd["w"], torch.ones(3))



def test_a_complex_buffer_is_left_out_with_buffers_ignore_as_the_target_network_leaves_it():
    """``buffers="ignore"`` refused a complex buffer, telling to copy= or exclude= it, where it leaves every
    other floating buffer out (and ``TargetNetwork(buffers="ignore")`` leaves this one out). Left out:
    exported as the model's own; a complex parameter is still refused."""
    from fastema.torch import TargetNetwork

    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))
            self.register_buffer("c", torch.ones(3, dtype=torch.complex64))

    m = C()
    ema = EMA(m, 0.5, buffers="ignore")
    moved(ema, m, 2.0)
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["w"], torch.ones(3)) and torch.equal(sd["c"], m.c)
    state = ema.state_dict()
    assert "c" not in state["copied"] and "c" not in state["averaged"] and "c" not in state["int_buffers"]
    TargetNetwork(C(), C(), tau=0.5, buffers="ignore").update()
    with pytest.raises(TypeError, match="buffer 'c' is complex"):
        EMA(C(), 0.5)

@pytest.mark.parametrize("how", ["copy", "deepcopy"])
def test_an_average_refuses_to_be_copied_and_says_how_to_make_another(how):
    # a copy kept the original's kernel tables (its buffers' and the model's addresses): the copy's
    # update wrote into the original's shadow, and the process aborted at exit (double free)
    import copy

    from fastema.torch import EMA, WindowAverage

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    for average in (EMA(model, 0.9), WindowAverage(model, 4)):
        with pytest.raises(TypeError, match=r"cannot be copied.*load_state_dict\(old.state_dict\(\)\)"):
            getattr(copy, how)(average)
    again = EMA(model, 0.9)
    again.update()                                          # the originals are untouched
    assert again.updates == 1
