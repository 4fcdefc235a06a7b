"""``EMA(engine, offload="cpu")`` of a DeepSpeed engine under ZeRO-Offload (``offload_optimizer: {device:
cpu}``): the float32 masters are in host memory already, so the host folds read them where they are (no
pack, no staging chunk, no copy; issue 44 item 2). On the CPU (DS_ACCELERATOR=cpu, gloo, 2 spawned ranks,
bfloat16 training), ZeRO-2 and ZeRO-3: ``ema.source`` says so, the shadow's tables hold the masters' own
addresses, ``update()`` returns before its fold and the optimizer's next step waits for it, and the
average equals a float32 lerp of the masters and the synchronous EMA(engine) bit for bit, swaps included.
Needs the ``distributed`` extra (deepspeed)."""
import importlib.util
import time

import pytest
import torch
import torch.distributed as dist
from dist import deepspeed_on_cpu, run_ranks
from test_deepspeed_masters import DECAYS, SOURCES, _masters, _model, _step, poison_padding

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs deepspeed (pip install 'fastema[distributed]')"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]


def _engine(rank, world, stage):
    deepspeed = deepspeed_on_cpu(rank, world)

    model = _model()
    cfg = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False,                      # the torch optimizer given, on the host
           "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                      config=cfg)
    return engine


def _case(rank, world, stage, out):
    from fastema.torch import EMA
    from fastema.torch._placement import folds
    from fastema.torch._placement.host_masters import HostMastersShadow

    engine = _engine(rank, world, stage)
    out[f"{stage}/poisoned"] = torch.tensor(poison_padding(engine) > 0 or stage != 3 or rank == 0)
    ema, plain = EMA(engine, list(DECAYS), offload="cpu"), EMA(engine, list(DECAYS))
    out[f"{stage}/source"] = torch.tensor(ema.source == SOURCES[stage] + "-in-host-memory"
                                          and plain.source == SOURCES[stage])
    shadow = ema._avg
    masters = engine.optimizer
    buffers = getattr(masters, "fp32_partitioned_groups_flat", None) or masters.single_partition_of_fp32_groups
    storages = {b.untyped_storage().data_ptr() for b in buffers}
    addresses = sorted(int(a) for g in shadow.layout.groups
                       for a, n in zip(g.tables.seg_addr, torch.diff(torch.from_numpy(g.tables.seg_offset))) if n)
    out[f"{stage}/in_place"] = torch.tensor(
        isinstance(shadow, HostMastersShadow) and all(b.device.type == "cpu" for b in buffers)
        and all(t.untyped_storage().data_ptr() in storages for t in shadow.sources if t.numel())
        and addresses == sorted(t.data_ptr() for t in shadow.sources if t.numel())
        and not {"staging chunks", "pinned slots"} & set(ema.memory(parts=True).get("cpu", {})))

    seen: list = []

    def slow(stage, run, *args):                             # a fold that takes its time
        if stage == "fold":
            time.sleep(0.2)
        return run(*args)

    with folds.watched(slow):
        inner = masters.optimizer                                # hooked after the EMA's: runs after it
        inner.register_step_pre_hook(lambda opt, a, k: seen.append(shadow._queue.settled()))
        m = _masters(engine)
        ref32 = [{n: v.clone() for n, v in m.items()} for _ in DECAYS]
        returned_early = []
        for step in range(4):
            _step(engine, rank, step)
            ema.update()
            returned_early.append(not shadow._queue.settled())
            plain.update()
            m = _masters(engine)
            for k, d in enumerate(DECAYS):
                for n, v in m.items():
                    ref32[k][n].lerp_(v, 1 - d)
    out[f"{stage}/async"] = torch.tensor(all(returned_early) and len(seen) >= 3 and all(seen))
    a, b = ema.state_dict()["averaged"], plain.state_dict()["averaged"]
    out[f"{stage}/equal"] = torch.tensor(all(torch.equal(getattr(a[n], "_local_tensor", a[n]),
                                                         getattr(b[n], "_local_tensor", b[n])) for n in a))
    rows = {n: getattr(v, "_local_tensor", v).reshape(len(DECAYS), -1) for n, v in a.items()}
    out[f"{stage}/ref"] = torch.tensor(all(torch.equal(rows[n][k], ref32[k][n].flatten()[:rows[n].shape[1]])
                                           for n in rows for k in range(len(DECAYS))))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7)).bfloat16()
    engine.eval()
    with torch.no_grad():
        raw = engine(x)
        with ema.average_parameters():
            got = engine(x)
        with plain.average_parameters():
            want = engine(x)
        out[f"{stage}/swap"] = torch.tensor(torch.equal(got, want) and torch.equal(engine(x), raw))
    engine.train()


def _run(rank, world):
    out: dict = {}
    for stage in (2, 3):
        _case(rank, world, stage, out)
    return out


def test_zero_offload_masters_are_folded_in_place_on_the_host(tmp_path):
    for r in run_ranks(_run, tmp_path / "run", 2, timeout=400):
        failed = [k for k, v in r.items() if not bool(v)]
        assert not failed, failed
