"""TargetNetwork over DeepSpeed ZeRO-3 pairs (on the CPU: DS_ACCELERATOR=cpu, gloo, 2 spawned ranks): a
policy engine and a reference engine made with its stage-3 config as TRL's prepare_deepspeed makes it (no
optimizer, another persistence threshold), averaged shard-local.

- every update: each rank's target partitions (without their padding) are a float32 ``lerp_`` of the
  reference partitions bit for bit, and the gathered target a float64 average to float32 rounding;
- no collective and no gather per update (torch.distributed's functions, c10d ops and DeepSpeed's
  gathers counted), nor at construction, and no full parameter allocated (new storages recorded);
- persistent parameters (gathered after a forward) are released, so the reference's next forward
  reads the average; the padding never matters (a NaN there with ``skip_nonfinite=True``);
- hard_update, state_dict / load_state_dict;
- refusals by name, nothing written: one side ZeRO-3 and the other not, partitions over other ranks, a
  target with hpZ's secondary partitions, an update inside a GatheredParameters block; a rank that
  disagrees raises alone, no rank hangs (nothing is collective at construction or update).

Needs the ``distributed`` extra (deepspeed)."""
import contextlib
import importlib.util

import pytest
import torch
import torch.distributed as dist
from dist import deepspeed_on_cpu, run_ranks
from models import mlp

# found, not imported: deepspeed is imported in the ranks only (with DS_ACCELERATOR=cpu), never in pytest's process
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs deepspeed (pip install 'fastema[distributed]')"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]

TAU = 0.3
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
               "send", "recv", "isend", "irecv", "all_gather_object", "broadcast_object_list")
# weights (5, 8), (16, 5), (1, 16): 40, 80, 16 elements; biases 5, 16, 1. Persistence threshold 16: the biases
# and the last weight stay gathered after a forward; the bias of 5 has one padding element on rank 1, the bias
# of one is all padding there
CFG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 16}}
# the reference's, as TRL's prepare_deepspeed makes it: the policy's config with another persistence threshold
# (10 x hidden size): the (5, 8) weight persistent too. The partitions are the same; which copies stay differs
REF_CFG = {**CFG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 40}}


def _model(seed):
    return mlp(8, 5, 16, 1, seed=seed)


@contextlib.contextmanager
def counted():
    """``{"collectives": [...], "gathers": [...], "allocs": [bytes, ...]}`` while entered: torch.distributed's
    collectives (the module functions and c10d ops), DeepSpeed's ZeRO-3 gathers, every new storage."""
    import torch.distributed.distributed_c10d as c10d
    from deepspeed.runtime.zero import partition_parameters as pp
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict = {"collectives": [], "gathers": [], "allocs": []}
    saved = []

    def patch(obj, name, key):
        fn = getattr(obj, name, None)
        if fn is None:
            return
        saved.append((obj, name, fn))

        def wrapper(*a, _fn=fn, **k):
            seen[key].append(name)
            return _fn(*a, **k)
        setattr(obj, name, wrapper)

    for mod in (dist, c10d):
        for name in COLLECTIVES:
            patch(mod, name, "collectives")
    for name in ("_all_gather", "_allgather_params_coalesced", "_allgather_params_sequential"):
        patch(pp.Init, name, "gathers")
    patch(pp.GatheredParameters, "__enter__", "gathers")

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
                seen["collectives"].append(str(func))
            ins = {t.untyped_storage().data_ptr() for t in _flat((args, kwargs))}
            seen["allocs"] += [t.untyped_storage().nbytes() for t in _flat(out)
                               if t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() not in ins]
            return out

    try:
        with Ops():
            yield seen
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def _flat(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat(o)


def _valid(p):
    """This rank's partition of a ZeRO-3 parameter without its padding (a view)."""
    size = p.ds_tensor.numel()
    return p.ds_tensor[:max(0, min(size, p.ds_numel - dist.get_rank() * size))]


def _parts(module):
    return {n: _valid(p).clone() for n, p in module.named_parameters()}


def _bits(module):
    """Every partition whole, padding included, as integers: what "nothing was written" compares."""
    return [p.ds_tensor.view(torch.int32).clone() for p in module.parameters()]


def _gathered(module):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):     # read only
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def _step(engine, rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    loss = (engine(torch.randn(4, 8, generator=g)) - 1).square().mean()
    engine.backward(loss)
    engine.step()


def _refused(fn, *types):
    try:
        fn()
    except types as err:
        return str(err)
    return ""


def _pairs(rank, world):
    deepspeed = deepspeed_on_cpu(rank, world)
    from fastema.torch import TargetNetwork

    out = {}
    policy = _model(0)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.SGD(policy.parameters(), lr=0.1),
                                      config=CFG)
    ref, *_ = deepspeed.initialize(model=_model(1), config=REF_CFG)          # TRL's prepare_deepspeed(ref)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for _ in range(2):
            ref(x)                              # traced, then the persistent parameters stay gathered
    persistent = [n for n, p in ref.module.named_parameters() if p.ds_persist]
    out["persistent_held"] = torch.tensor([p.ds_status.name == "AVAILABLE" for p in ref.module.parameters()
                                           if p.ds_persist])
    with counted() as made:
        tn = TargetNetwork(engine, ref, tau=TAU)
    out["made/collectives"] = torch.tensor(len(made["collectives"]) + len(made["gathers"]))
    expect = _parts(ref.module)                                              # float32 lerp_ of the partitions
    exact = {n: v.double() for n, v in _gathered(ref.module).items()}      # float64 of the full tensors
    calls, gathers, allocs, bitwise = [], [], [], True
    for step in range(4):
        _step(engine, rank, step)
        with torch.no_grad():
            ref(x)
        online = _parts(engine.module)
        for n in expect:
            expect[n].lerp_(online[n], TAU)
        for n, v in _gathered(engine.module).items():
            exact[n] += TAU * (v.double() - exact[n])
        with counted() as c:
            tn.update()
        calls += c["collectives"]
        gathers += c["gathers"]
        allocs += c["allocs"]
        bitwise &= all(torch.equal(v, expect[n]) for n, v in _parts(ref.module).items())
    out["update/collectives"] = torch.tensor(len(calls))
    out["update/gathers"] = torch.tensor(len(gathers))
    out["update/alloc_bytes"] = torch.tensor(max(allocs, default=0))
    out["bitwise"] = torch.tensor(bitwise)
    out["released"] = torch.tensor([ref.module.get_parameter(n).ds_status.name == "NOT_AVAILABLE"
                                    for n in persistent])
    full = _gathered(ref.module)
    streamed = dict(tn.iter_weights())                  # the target streamed out: gathered, on every rank
    out["streamed"] = torch.tensor(list(streamed) == list(full) and
                                   all(torch.equal(streamed[n], v) for n, v in full.items()))
    out["worst_vs_float64"] = torch.tensor(max(float((full[n].double() - v).abs().max()) for n, v in exact.items()))
    plain = _model(2)
    plain.load_state_dict(full)
    with torch.no_grad():
        out["forward_equal"] = torch.tensor(torch.allclose(ref(x), plain(x), rtol=1e-6, atol=1e-7))

    # the padding never matters: a NaN in the online's padding with skip_nonfinite=True skips nothing
    guarded = TargetNetwork(engine, ref, tau=TAU, skip_nonfinite=True)
    for p in engine.module.parameters():
        p.ds_tensor[_valid(p).numel():] = float("nan")
    before = _parts(ref.module)
    guarded.update()
    out["padding_ignored"] = torch.tensor(
        all(torch.equal(v, torch.lerp(before[n], _valid(engine.module.get_parameter(n)), TAU))
            for n, v in _parts(ref.module).items()) and int(guarded.skipped["cpu"]) == 0)

    # hard_update: the partitions copied, the gathered copies released; the state round trip
    with torch.no_grad():
        ref(x)
    tn.hard_update()
    out["hard"] = torch.tensor(all(torch.equal(_valid(p), _valid(q)) for p, q in
                                   zip(ref.module.parameters(), engine.module.parameters())))
    with torch.no_grad():
        out["hard_forward"] = torch.tensor(torch.equal(ref(x), engine(x)))
    again = TargetNetwork(engine.module, ref.module, tau=TAU)
    again.load_state_dict(tn.state_dict())
    out["state"] = torch.tensor([again.updates, again.calls, tn.updates])

    out.update(_refusals(rank, world, deepspeed, engine, ref, TargetNetwork))
    return out


def _refusals(rank, world, deepspeed, engine, ref, TargetNetwork):
    out = {}
    bits = _bits(ref.module)
    plain = _model(0)
    out["refused/online_plain"] = torch.tensor("ZeRO-3 partitioned in the target but not in the online" in
                                               _refused(lambda: TargetNetwork(plain, ref), ValueError))
    out["refused/target_plain"] = torch.tensor("ZeRO-3 partitioned in the online network but not in the target" in
                                               _refused(lambda: TargetNetwork(engine, plain), ValueError))
    # partitioned over this rank alone (a group of one: each rank holds every element): other partitions
    alone = [dist.new_group([r]) for r in range(world)][rank]
    with deepspeed.zero.Init(data_parallel_group=alone, config_dict_or_path=CFG):
        solo = _model(1)
    out["refused/other_ranks"] = torch.tensor("partitioned differently" in
                                              _refused(lambda: TargetNetwork(engine, solo), ValueError))
    # a secondary partition (ZeRO++ hpZ: what the target's forward would gather from) on one target parameter
    first = next(ref.module.parameters())
    first.ds_secondary_tensor = first.ds_tensor.clone()
    out["refused/hpz"] = torch.tensor("secondary ZeRO-3 partition (ZeRO++ hpZ" in
                                      _refused(lambda: TargetNetwork(engine, ref), TypeError))
    first.ds_secondary_tensor = None
    # an update inside a GatheredParameters block of the target: refused, nothing written (the block writes
    # nothing back: modifier_rank=None)
    tn = TargetNetwork(engine, ref, tau=TAU)
    with deepspeed.zero.GatheredParameters(list(ref.module.parameters())):
        out["refused/in_use"] = torch.tensor("in use" in _refused(tn.update, RuntimeError))
    out["refused/unchanged"] = torch.tensor(all(torch.equal(a, b) for a, b in zip(bits, _bits(ref.module))))
    # a rank that disagrees (rank 1 pairs a plain copy): it alone raises; rank 0 makes and updates its own
    # with no collective, so neither waits on the other
    with counted() as c:
        if rank == 1:
            msg = _refused(lambda: TargetNetwork(engine, plain), ValueError)
        else:
            TargetNetwork(engine, ref, tau=TAU).update()
            msg = ""
    out["disagree"] = torch.tensor([rank == 0 or "not in the target" in msg, len(c["collectives"])])
    dist.barrier()                                                           # both ranks got here
    return out


def test_zero3_target_network_is_shard_local(tmp_path):
    ranks = run_ranks(_pairs, tmp_path, 2, timeout=300)
    for r in ranks:
        assert bool(r["persistent_held"].all()) and len(r["persistent_held"]) == 5
        assert int(r["made/collectives"]) == 0
        assert int(r["update/collectives"]) == 0 and int(r["update/gathers"]) == 0
        assert int(r["update/alloc_bytes"]) == 0, int(r["update/alloc_bytes"])     # no storage made at all
        assert bool(r["bitwise"])
        assert bool(r["released"].all())
        assert float(r["worst_vs_float64"]) < 1e-6, float(r["worst_vs_float64"])     # weights ~0.3: a few ulps
        assert bool(r["forward_equal"]) and bool(r["padding_ignored"])
        assert bool(r["hard"]) and bool(r["hard_forward"]) and bool(r["streamed"])
        assert r["state"].tolist() == [4, 4, 4]
        for k in ("online_plain", "target_plain", "other_ranks", "hpz", "in_use", "unchanged"):
            assert bool(r[f"refused/{k}"]), k
        assert r["disagree"].tolist() == [1, 0]
