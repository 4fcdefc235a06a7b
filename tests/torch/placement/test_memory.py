"""``ema.memory()`` / ``ema.nbytes``: what a torch average holds, by device (issue 43 item 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastema.torch import EMA, Offload


def _tables(shadow) -> int:
    return sum(getattr(g.tables, f).nbytes for g in shadow.layout.groups
               for f in ("shadow_addr", "seg_addr", "seg_offset", "chunk_seg", "chunk_begin"))


def test_the_shadow_rows_and_the_tables_are_counted_once_each():
    model = torch.nn.Sequential(torch.nn.Linear(50, 30), torch.nn.Linear(30, 7))
    numel = sum(p.numel() for p in model.parameters())
    one, three = EMA(model, 0.9), EMA(model, [0.9, 0.99, 0.999])
    assert one.memory() == {"cpu": numel * 4 + _tables(one._avg)}
    assert three.nbytes == numel * 4 * 3 + _tables(three._avg)
    half = EMA(model, 0.9, shadow_dtype="bfloat16")
    assert half.nbytes == numel * 2 + _tables(half._avg)


def test_buffers_copies_and_a_swaps_backup_are_the_averages_and_the_model_is_not():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).half()
    ema = EMA(model, 0.9)                                  # float32 shadow of float16 weights: a lossy swap
    params = sum(p.numel() for p in model.parameters())
    floats = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    counted = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_floating_point())
    before = ema.nbytes
    assert before == params * 4 + floats * 2 + counted + _tables(ema._avg) + _tables(ema._copy)
    with ema.average_parameters():
        during = ema.nbytes
    assert during == before + params * 2 + _tables(ema._swapper.backup)   # raw float16 weights kept
    model.float()                                                     # the model's memory is not the average's
    assert ema.nbytes == during


def test_memory_sums_to_nbytes_and_names_devices():
    ema = EMA(torch.nn.Linear(4, 4), 0.9)
    mem = ema.memory()
    assert sum(mem.values()) == ema.nbytes and set(mem) == {"cpu"}
    assert all(isinstance(v, int) and v > 0 for v in mem.values())
    assert np.isfinite(ema.nbytes)


def test_an_offloaded_average_counts_its_host_shadow_and_two_chunks_not_a_copy_of_the_weights():
    model = torch.nn.Linear(100, 100)
    numel = sum(p.numel() for p in model.parameters())
    ema = EMA(model, 0.9, offload=Offload(chunk=4096))
    ema.update()
    ema.join()
    parts = ema.memory(parts=True)["cpu"]
    assert parts["shadow"] == numel * 4 and parts["staging chunks"] == 2 * 4096
    assert ema.nbytes == sum(parts.values()) < numel * 4 + 2 * 4096 + parts["tables"] + 1


def test_memory_by_part_sums_to_the_same_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).half()
    ema = EMA(model, 0.9)
    with ema.average_parameters():                         # float16 weights: a lossy swap keeps a backup
        parts = ema.memory(parts=True)
        assert {d: sum(v.values()) for d, v in parts.items()} == ema.memory()
        assert set(parts["cpu"]) == {"shadow", "copied buffers", "tables", "swap backup"}


def test_a_target_network_counts_what_it_adds_not_the_target():
    import copy

    from fastema.torch import TargetNetwork

    online = torch.nn.Linear(100, 100)
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.01)
    params = sum(p.numel() * 4 for p in target.parameters())
    assert 0 < tn.nbytes < params and sum(tn.memory().values()) == tn.nbytes    # tables and a flag, no copy


def test_the_jax_and_tensorflow_averages_count_their_shadow_rows_too():
    import importlib
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for face in ("jax", "tensorflow"):
        try:
            mod = importlib.import_module(f"fastema.{face}")
        except ImportError:
            continue
        if face == "jax":
            import jax.numpy as jnp

            ema = mod.EMA({"w": jnp.ones((100, 10)), "b": jnp.zeros(10)}, [0.9, 0.5])
        else:
            import tensorflow as tf

            ema = mod.EMA([tf.Variable(np.ones((100, 10), np.float32)), tf.Variable(np.zeros(10, np.float32))],
                          [0.9, 0.5])
        mem = ema.memory()
        assert set(mem) == {"cpu"} and sum(mem.values()) == ema.nbytes
        assert 1010 * 4 * 2 <= ema.nbytes < 1010 * 4 * 2 + 1024, face       # two rows and the tables


@pytest.mark.parametrize("window,ring_dtype", [(1, "float32"), (8, "float32"), (8, "bfloat16"), (None, "float32")])
def test_a_window_average_counts_its_ring_of_snapshots(window, ring_dtype):
    """The ring (W snapshots of the model) is most of a window average's memory: counted, by part."""
    from fastema.torch import WindowAverage

    model = torch.nn.Linear(256, 256)
    avg = WindowAverage(model, window, ring_dtype=ring_dtype)
    n = sum(p.numel() for p in model.parameters())
    by_part = avg.memory(parts=True)["cpu"]
    if window is None:                                             # SWA: one float32 mean, no ring
        assert by_part["shadow"] == 4 * n and "ring" not in by_part
    else:
        assert by_part["shadow"] == 3 * 4 * n                      # the mean and the compensated sum
        assert by_part["ring"] == window * n * (2 if ring_dtype == "bfloat16" else 4)
        assert avg._avg.nbytes == by_part["shadow"] + by_part["ring"]
    assert sum(avg.memory().values()) == avg.nbytes == sum(by_part.values())
    assert by_part["tables"] < 1024
