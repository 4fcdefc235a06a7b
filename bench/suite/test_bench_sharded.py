"""Large models (issue #14): the sharded EMA.update over an FSDP2 model's local shards, and the
training thread's cost of an offloaded EMA.

Sharded: one process (world size 1, gloo on the CPU, NCCL on a GPU) holding an FSDP2
``fully_shard`` model; each rank's work is its local shards, so the row is GB/s of local bytes
against ``torch._foreach_lerp_`` over the ``to_local()`` shards, same run, checked against fastema's
EMA of the same start before it is timed (``bench/suite/checked.py``).
Offload: one training step (a fixed matmul standing in for forward/backward) plus
``update()``, for no EMA, the synchronous EMA and ``offload="cpu"``: the extra time on the
training thread. bytes = the model's float32 bytes, for the table's GB/s column.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from bench.suite.checked import checked
from fastema.torch import EMA

from .conftest import QUICK, devices
from .shapes import MANY_NAME, gpt2_small, many_small
from .test_bench_torch import DECAY, Params


@pytest.fixture(scope="module")
def process_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


SHARDED = {"148 tensors (GPT-2-small shapes / 8)": lambda: [tuple(max(1, d // 8) for d in s) for s in gpt2_small()],
           MANY_NAME: many_small}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema", "torch._foreach_lerp_ over to_local()"])
@pytest.mark.parametrize("scenario", list(SHARDED))
def test_sharded_update_local_shards(process_group, run, benchmark, device, impl, scenario):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    benchmark.group = f"sharded EMA.update, FSDP2 local shards, float32 ({device})"
    model = Params(SHARDED[scenario](), torch.float32, device)
    fully_shard(model, mesh=init_device_mesh(device, (1,)))
    params = list(model.parameters())
    n = sum(p.to_local().numel() for p in params)
    check = None
    if impl == "fastema":
        fn = EMA(model, DECAY).update
    else:
        shadows = [p.to_local().detach().clone() for p in params]
        ref = EMA(model, DECAY)                                   # the same start as the shadows

        def fn():
            with torch.no_grad():
                torch._foreach_lerp_(shadows, [p.to_local() for p in params], 1 - DECAY)

        def check():
            local = [p.to_local() for p in params]
            with torch.no_grad():
                for p in local:
                    p.add_(torch.randn_like(p), alpha=0.1)
            checked({"fastema": ref.update, impl: fn},
                    {"fastema": lambda: [v.to_local() if hasattr(v, "to_local") else v
                                         for v in ref.averaged_state_dict().values()], impl: lambda: shadows},
                    ours="fastema", inputs=local)
    run(fn, device, impl=impl, case=scenario, nbytes=12 * n, elements=n, check=check)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["the step alone (no EMA)", "synchronous EMA (fastema)", "fastema offload='cpu'"])
def test_offload_training_thread_time(run, benchmark, device, impl):
    benchmark.group = f"training step + EMA.update, offload='cpu' ({device})"
    model = Params(many_small(count=300 if QUICK else 1000, numel=4096), torch.float32, device)
    n = sum(p.numel() for p in model.parameters())
    a = torch.randn(384, 384, device=device)

    def step():
        for _ in range(4):
            a.copy_(torch.tanh(a @ a) * 0.5)

    if impl.startswith("the step alone"):
        fn = step
    else:
        ema = EMA(model, DECAY, offload="cpu" if "offload" in impl else None)

        def fn():
            step()
            ema.update()
    run(fn, device, impl=impl, case=f"{n * 4 // 2**20} MiB model", nbytes=4 * n, elements=n,
        reference=True)                  # the step alone and fastema's synchronous EMA: no baseline here
    if not impl.startswith("the step alone"):
        ema.join()
