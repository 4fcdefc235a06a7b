"""DeepSpeed ZeRO-3 (on the CPU: DS_ACCELERATOR=cpu, gloo, 2 spawned ranks): the EMA of each rank's
partitions (p.ds_tensor), exact against a float32 lerp_ of the gathered weights; a swap that
writes the EMA into the partitions, with the persistent (gathered) parameters released; the
partitions checkpointed as 1-D sharded DTensors through DCP, resumed bit for bit, and read by
a plain model's EMA. Needs the ``distributed`` extra (deepspeed)."""
import importlib.util

import pytest
import torch
import torch.distributed as dist
from dist import deepspeed_on_cpu, run_ranks
from models import mlp
from torch import nn

# found, not imported: deepspeed is imported in the ranks only (with DS_ACCELERATOR=cpu), never in pytest's process
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs deepspeed (pip install 'fastema[distributed]')"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]

DECAYS = (0.9, 0.5)


def _model(seed=0):
    # 5 x 8: partitions of 20 on each rank; bias (5,): 3 + 2 (rank 1 has one padding element);
    # Linear(16, 1): a bias of one element, all padding on rank 1
    return mlp(8, 5, 16, 1, seed=seed)


def _engine(rank, world, seed, persistence):
    deepspeed = deepspeed_on_cpu(rank, world)

    model = _model(seed)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence},
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=cfg)
    return engine


def _gathered(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):     # read only (modifier_rank=None)
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _step(engine, rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    loss = (engine(torch.randn(4, 8, generator=g)) - 1).square().mean()
    engine.backward(loss)
    engine.step()


def _zero3(rank, world, ckpt):
    import torch.distributed.checkpoint as dcp

    from fastema.torch import EMA

    out = {}
    # persistence 1e5 (DeepSpeed's default): every parameter of this model stays gathered after a forward
    engine = _engine(rank, world, 0, 100000)
    ema = EMA(engine, list(DECAYS))
    assert ema.sharded
    out["partition_numel"] = torch.tensor(sum(s.numel() for s in ema._avg.sources))
    refs = [_gathered(engine) for _ in DECAYS]
    for step in range(4):
        _step(engine, rank, step)
        ema.update()
        full = _gathered(engine)
        for ref, d in zip(refs, DECAYS):
            for n, v in full.items():
                ref[n].lerp_(v, 1 - d)
    for row in (0, 1):
        out.update({f"ema/{row}/{n}": v for n, v in ema.full_state_dict(row).items()})
        out.update({f"ref/{row}/{n}": v for n, v in refs[row].items()})
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    engine.eval()
    with torch.no_grad():
        out["raw_before"] = engine(x)
        with ema.average_parameters():
            out["swapped"] = engine(x)
        out["raw_after"] = engine(x)
    out["x"] = x
    engine.train()
    # the model's weights are the raw ones again, bit for bit
    out["weights_after_swap"] = torch.tensor(all(torch.equal(a, b) for a, b in zip(
        _gathered(engine).values(), full.values())))
    dcp.save({"ema": ema}, checkpoint_id=ckpt)
    saved = {k: v.clone() for k, v in ema.full_state_dict(0).items()}
    _step(engine, rank, 10)
    ema.update()
    dcp.load({"ema": ema}, checkpoint_id=ckpt)                # back to the saved average, in place
    out["resumed_equal"] = torch.tensor(all(torch.equal(saved[k], v) for k, v in ema.full_state_dict(0).items()))
    out["updates"] = torch.tensor([ema.updates, ema.calls])

    # post-hoc EMA of the partitions: one flat DCP checkpoint per snapshot, full shapes in the metadata
    from fastema.torch import PostHocEMA

    ph = PostHocEMA(engine, (0.05, 0.1), snapshot_every=2, path=ckpt + "-posthoc")
    for step in range(20, 24):
        _step(engine, rank, step)
        ph.update()
        if ph.updates % 2 == 0:
            for row in (0, 1):
                out.update({f"ph/{ph.updates}/{row}/{n}": v for n, v in ph.full_state_dict(row).items()})

    # a parameter the average does not track (exclude=): exported and streamed as the model's own value,
    # gathered on every rank (its own data is a (0,) placeholder, or the gathered copy of a persistent one)
    partial = EMA(engine, 0.9, exclude=["2.weight"])
    _step(engine, rank, 30)
    partial.update()
    out["excluded/ref"] = _gathered(engine)["2.weight"]
    out["excluded/full"] = partial.full_state_dict()["2.weight"]
    out["excluded/stream"] = dict(partial.iter_weights(dtype=torch.bfloat16))["2.weight"]
    out["excluded/meta"] = torch.tensor([m.shape == (16, 5) for m in partial.weights_metadata()
                                         if m.name == "2.weight"])

    # made of the inner module (no engine): gathered persistent parameters are refused, not ignored
    bare = EMA(engine.module, 0.9)
    with torch.no_grad():
        engine(x)
    try:
        bare.swap()
    except RuntimeError as err:
        out["bare_refused"] = torch.tensor("empty_partition_cache" in str(err))
    return out


def test_zero3_partitions_exact_swap_and_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r0, r1 = run_ranks(_zero3, tmp_path / "run", 2, ckpt, timeout=400)
    total = sum(p.numel() for p in _model().parameters())
    assert int(r0["partition_numel"]) < total and int(r1["partition_numel"]) < total
    for r in (r0, r1):
        for k, v in r.items():
            if k.startswith("ema/"):
                assert torch.equal(v, r0["ref/" + k[4:]]), k
        assert torch.equal(r["raw_before"], r["raw_after"])
        assert not torch.equal(r["swapped"], r["raw_before"])
        assert r["weights_after_swap"] and r["resumed_equal"] and r["bare_refused"]
        assert r["updates"].tolist() == [4, 4]
        assert torch.equal(r["excluded/full"], r["excluded/ref"]) and r["excluded/ref"].shape == (16, 5)
        assert torch.equal(r["excluded/stream"], r["excluded/ref"].bfloat16()) and r["excluded/meta"].tolist() == [True]
    plain = _model()
    plain.load_state_dict({n: r0[f"ref/0/{n}"] for n, _ in plain.named_parameters()})
    with torch.no_grad():
        assert torch.allclose(r0["swapped"], plain(r0["x"]), rtol=1e-5, atol=1e-6)

    # the post-hoc snapshots of the partitions, synthesised here (no process group) in the full shapes
    from fastema import posthoc

    snaps = posthoc.read_snapshots(ckpt + "-posthoc")
    assert [(s.kind, s.updates) for s in snaps] == [("dcp", 2), ("dcp", 4)]
    synth = posthoc.synthesize(ckpt + "-posthoc", 0.07, max_error=1.0)
    terms = [(s.updates, k) for s in snaps for k in (0, 1)]
    for n, p in _model().named_parameters():
        by_hand = sum(float(x) * r0[f"ph/{u}/{k}/{n}"].double()
                      for (u, k), x in zip(terms, synth.solution.coefficients))
        assert synth[n].shape == p.shape
        torch.testing.assert_close(synth[n], by_hand.float(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="do not fit this model"):
        posthoc.synthesize(ckpt + "-posthoc", 0.07, max_error=1.0, into=nn.Sequential(
            nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1)))

    # the 1-D sharded checkpoint read offline into a plain model's EMA (no process group)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from fastema.torch import EMA

    dcp_to_torch_save(ckpt, tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=False)["ema"]
    assert state["averaged"]["0.weight"].shape == (2, 40)     # flat: (rows, numel)
    ema = EMA(_model(3), list(DECAYS))
    ema.load_state_dict(state)
    for row in (0, 1):
        for n, v in ema.averaged_state_dict(row).items():
            assert torch.equal(v, r0[f"ref/{row}/{n}"]), (row, n)
