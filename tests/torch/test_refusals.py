"""Fail closed at the boundary: tensors whose memory is not where data_ptr() says (DTensors,
freed or shrunk storages, ZeRO-3 and FSDP1 parameters, lazy neg/conj views) are refused by
name with what to do, before anything is written, at construction and at every rebind.

Each former crash (a segfault at 3c5c42b) runs in its own process: a regression fails the
test instead of killing the test run."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastema
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_former_crashes_are_refused_in_a_subprocess(case, tmp_path):
    body, match = CASES[case]
    script = PRE.format(store=tmp_path / "store") + body + "\ndist.barrier()\ndist.destroy_process_group()\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"exit {r.returncode} (negative: killed by a signal)\n{r.stderr[-3000:]}"
    out = r.stdout
    assert "REFUSED:" in out, out + r.stderr[-2000:]
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


@pytest.mark.parametrize("make,match", [
    (lambda: [torch.zeros(3)._neg_view()], "negated or conjugated"),
    (lambda: [], "sources is empty"),
    (lambda: torch.zeros(3), "must be a sequence"),
])
def test_flat_shadow_refuses_bad_sources(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastema.FlatShadow(make())


def test_flat_shadow_rows_must_be_an_int_not_a_bool():
    with pytest.raises(ValueError, match="rows must be an int"):
        fastema.FlatShadow([torch.zeros(3)], rows=True)


def test_lazy_modules_are_refused_until_materialised():
    m = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match="uninitialized parameter of a lazy module.*forward pass"):
        EMA(m, 0.9)
    m(torch.zeros(2, 3))
    assert EMA(m, 0.9).averaged_state_dict()["0.weight"].shape == (4, 3)


def test_meta_tensors_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="meta tensor has no memory"):
        fastema.FlatShadow([torch.zeros(3, device="meta")])


def test_overlapping_sources_are_refused_and_identical_pairs_averaged_once():
    x = torch.zeros(1000)
    with pytest.raises(ValueError, match="share memory"):
        fastema.FlatShadow([x, x])
    with pytest.raises(ValueError, match="share memory"):
        fastema.FlatShadow([x[:600], x[400:]])
    s, y = torch.zeros(1 << 16), torch.randn(1 << 16)
    ref = s.clone()
    for _ in range(4):                                 # the same pair twice: averaged once, no race
        fastema.ema_update_many_([s, s], [y, y], 0.5)
        ref.lerp_(y, 0.5)
    assert torch.equal(s, ref)
    with pytest.raises(ValueError, match="another source"):
        fastema.ema_update_many_([s, s], [y, torch.randn(1 << 16)], 0.5)
    with pytest.raises(ValueError, match="share memory"):
        fastema.ema_update_many_([s[:100], s[50:150]], [y[:100], y[:100]], 0.5)


def test_layout_cache_follows_length_and_dtype_at_one_address():
    # M6: the cache is keyed by address, element count and dtype, so views at one address
    # get their own layout
    s, x = torch.zeros(1000), torch.ones(1000)
    fastema.ema_update_many_([s], [x], 0.5)
    fastema.ema_update_many_([s[:10]], [x[:10]], 0.5)
    assert torch.equal(s[:10], torch.full((10,), 0.75)) and torch.equal(s[10:], torch.full((990,), 0.5))
    t, y = torch.zeros(1000), torch.ones(1000)
    fastema.ema_update_many_([t[:10]], [y[:10]], 0.5)
    fastema.ema_update_many_([t], [y], 0.5)
    assert torch.equal(t[:10], torch.full((10,), 0.75)) and torch.equal(t[10:], torch.full((990,), 0.5))
    u, z = torch.zeros(1000), torch.ones(1000)
    fastema.ema_update_many_([u], [z], 0.5)
    ub, zb = u.view(torch.bfloat16), z.view(torch.bfloat16)
    ref = ub.float().lerp(zb.float(), 0.5).bfloat16()
    fastema.ema_update_many_([ub], [zb], 0.5)
    assert torch.equal(ub, ref)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_layout_cache_keeps_no_model_alive():
    # M7: ModelEmaV3 / ema_update_many_ over models that are then deleted: their memory goes back
    # (at 3c5c42b the cache pinned the last 32 models' storages: +400 MiB here)
    import gc

    gc.collect()
    before = _rss_mib()
    for _ in range(10):
        m = nn.Linear(3200, 3200)                      # 40 MiB of weights, twice with the EMA copy
        ema = ModelEmaV3(m, decay=0.9)
        ema.update(m)
        fastema.ema_update_many_(list(ema.module.parameters()), list(m.parameters()), 0.5)
        del m, ema
        gc.collect()
    assert _rss_mib() - before < 150
