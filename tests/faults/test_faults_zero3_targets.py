"""The fault suite of a target network over DeepSpeed ZeRO-3 engines (fastema.torch.TargetNetwork,
and fastema.trl.RefSyncCallback driving it as TRL's reference sync) when one rank breaks: 2 spawned
gloo ranks, DeepSpeed on its CPU accelerator, every collective timing out after 30 s (a hang fails).

An update is rank-local (each rank lerps its own partitions: no gather, no collective), so a rank
that raises inside it raises alone and the other ranks' updates go on. What must hold:

- the rank that raises wrote nothing and counted nothing (its partitions bit for bit, ``calls`` as
  before), with no collective, within a bound;
- the next collective read (``iter_weights()``) refuses on every rank, naming the ranks' counts (a
  failed or skipped ``update()``, a ``hard_update()`` made on one rank only), and reads nothing;
- the retry (the failed rank's update made again) levels the counts and the gathered copies
  DeepSpeed keeps: the reference's forward works on every rank, and the target streamed is the
  float32 lerp of the gathered reference towards the gathered policy, bit for bit;
- ``skip_nonfinite=True`` looks at each rank's own partitions (documented: a NaN in one rank's
  partition skips that rank's fold alone);
- RefSyncCallback: a rank whose reference is partitioned otherwise refuses when training begins, on
  every rank, with its reason (before the first step's gathers, where the others would wait); a
  sync that raises on one rank counts nothing there, and its retry works; a skipped sync is refused
  by the next stream.

Every case shares one pair of engines (building them is most of the cost). Issue 64, item 7.
"""
from __future__ import annotations

import importlib.util
import types

import pytest
import torch
import torch.distributed as dist
from dist import Counted, deepspeed_on_cpu, run_ranks
from models import mlp
from support import faults

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs deepspeed (pip install 'fastema[distributed]')"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs gloo")]

_COLLECTIVE_S = 30.0       # every collective's timeout in these worlds: a hang is an error, fast
_BOUND_S = 10.0            # a refusal reaches every rank within this (far below that timeout)
TAU = 0.3
# weights (5, 8), (16, 5), (1, 16), biases 5, 16, 1 (test_zero3_pairs.py's model). The policy's
# persistence threshold 16; the reference's 40, as TRL's prepare_deepspeed raises it: the biases
# and the first and last weights stay gathered after the reference's forward
CFG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
       "zero_allow_untested_optimizer": True,
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 16}}
REF_CFG = {**CFG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 40}}


def _valid(p):
    """This rank's partition of a ZeRO-3 parameter without its padding (a view)."""
    size = p.ds_tensor.numel()
    return p.ds_tensor[:max(0, min(size, p.ds_numel - dist.get_rank() * size))]


def _bits(module) -> list:
    """Every partition whole, padding included, as integers: what "nothing was written" compares."""
    return [p.ds_tensor.view(torch.int32).clone() for p in module.parameters()]


def _full(module) -> dict:
    """Every parameter's whole value (a read-only gather: a collective every rank joins)."""
    import deepspeed

    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def _step(engine, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    engine.backward((engine(torch.randn(4, 8, generator=g)) - 1).square().mean())
    engine.step()


def _forward(ref, x) -> None:
    with torch.no_grad():
        ref(x)


def _held(ref) -> int:
    """The reference's parameters held gathered now (persistent ones, after a forward)."""
    return sum(p.ds_status.name == "AVAILABLE" for p in ref.module.parameters())


def _stream(tn, row: int = 0) -> dict:
    return dict(tn.iter_weights(row))


def _refused(tn) -> tuple[str, bool, float]:
    """A stream of the target: ``(error type, it names rank 1's update() count, seconds)``."""
    kind, msg, s = faults.outcome(lambda: _stream(tn))
    return kind, "update() calls" in msg and "rank 1" in msg, s


class _Changed:
    """Rank 1's reference with its first weight replaced by a plain parameter (a model changed on
    one rank), and put back."""

    def __init__(self, ref):
        self.ref, self.orig = ref, ref.module[0].weight

    def fail(self):
        self.ref.module[0].weight = torch.nn.Parameter(torch.zeros(5, 8))

    def undo(self):
        self.ref.module[0].weight = self.orig


def _one_rank_fails(rank, case, update, engine, ref, x, step, tn):
    """One optimizer step and the reference's forward (its persistent parameters gathered), then
    ``update()`` on rank 0 and, on rank 1, ``case.call()`` between ``case.fail()`` and
    ``case.undo()`` (it raises an error whose message holds ``case.says``); then a stream of the
    target (refused on every rank: the counts differ), ``update()`` again on rank 1 (the retry), the
    reference's forward on every rank and the stream (the lerp of the gathered reference towards the
    gathered policy, bit for bit)."""
    _step(engine, rank, step)
    before, online = _full(ref.module), _full(engine.module)
    _forward(ref, x)
    held, bits, calls = _held(ref), _bits(ref.module), tn.calls
    if rank == 1:
        case.fail()
    with Counted() as c:
        kind, msg, s = faults.outcome(case.call if rank == 1 else update)
    if rank == 1:
        case.undo()
    record = {"kind": kind, "says": case.says in msg if rank == 1 else True, "s": s,
              "collectives": len(c.calls), "counted": tn.calls - calls,
              "written": not faults.same(bits, _bits(ref.module)), "held": held}
    record["stream"] = _refused(tn)
    record["retry"] = faults.outcome(update)[0] if rank == 1 else "ok"
    record["forward"] = faults.outcome(lambda: _forward(ref, x))[:2]
    got = _stream(tn)
    want = {n: torch.lerp(v, online[n], TAU) for n, v in before.items()}
    record["right"] = list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    return record


def _target_cases(rank, engine, ref, x):
    from fastema.torch import TargetNetwork

    TargetNetwork(mlp(2, 2), mlp(2, 2)).update()   # the first kernels loaded: not in the timings
    out = {}
    tn = TargetNetwork(engine, ref, tau=TAU)
    changed = _Changed(ref)

    def inject():
        def fails(*a, **k):
            raise RuntimeError("injected: the kernels' launch failed")
        tn._side.avg.update_checked = fails      # the averaged pairs' launch, after every check

    def uninject():
        del tn._side.avg.update_checked

    cases = {
        "model changed": types.SimpleNamespace(fail=changed.fail, undo=changed.undo, call=tn.update,
                                               says="Nothing was written"),
        "bad argument": types.SimpleNamespace(fail=lambda: None, undo=lambda: None,
                                              call=lambda: tn.update(step=-1), says="step"),
        "injected failure": types.SimpleNamespace(fail=inject, undo=uninject, call=tn.update,
                                                  says="injected"),
    }
    for k, (name, case) in enumerate(cases.items()):
        out[name] = _one_rank_fails(rank, case, tn.update, engine, ref, x, k, tn)

    # a skipped update on rank 1: every rank refuses the stream, naming the counts; then it reads
    _step(engine, rank, 10)
    if rank == 0:
        tn.update()
    out["skipped update"] = _refused(tn)
    if rank == 1:
        tn.update()
    out["skipped update/caught up"] = faults.outcome(lambda: _stream(tn))[0]

    # a hard_update() on rank 0 only (half the partitions copied): every rank refuses the stream;
    # once rank 1 copies too, the stream is the policy, bit for bit
    _step(engine, rank, 11)
    if rank == 0:
        tn.hard_update()
    kind, msg, s = faults.outcome(lambda: _stream(tn))
    out["hard_update on one rank"] = (kind, "hard_update()" in msg, s)
    if rank == 1:
        tn.hard_update()
    online, got = _full(engine.module), _stream(tn)
    out["hard_update on one rank/caught up"] = all(torch.equal(got[n], v)
                                                   for n, v in online.items())

    # a stream argument refused on rank 1: its own error there, its reason on rank 0; a retry reads
    kind, msg, s = faults.outcome(lambda: _stream(tn, 1 if rank == 1 else 0))
    out["stream argument"] = (kind, "row must be 0" in msg, s)
    out["stream argument/retry"] = faults.outcome(lambda: _stream(tn))[0]

    # skip_nonfinite=True: a NaN in rank 0's partition of the policy skips rank 0's fold alone
    _step(engine, rank, 12)
    guarded = TargetNetwork(engine, ref, tau=TAU, skip_nonfinite=True)
    first = next(engine.module.parameters())
    bits, saved = _bits(ref.module), first.ds_tensor.clone()
    if rank == 0:
        _valid(first)[0] = float("nan")
    guarded.update()
    first.ds_tensor.copy_(saved)
    out["skip_nonfinite"] = (int(guarded.skipped["cpu"]), not faults.same(bits, _bits(ref.module)),
                             guarded.calls)
    return out


def _trl_cases(rank, world, deepspeed, engine, ref, x):
    """RefSyncCallback over the engines: partitions over other ranks on rank 1 when training
    begins, a sync that raises on rank 1 mid-training, a sync skipped on rank 1."""
    from transformers import TrainerState

    from fastema.trl import RefSyncCallback

    out = {}
    args = types.SimpleNamespace(ref_model_mixup_alpha=TAU, ref_model_sync_steps=2)
    # rank 1's reference partitioned over itself alone (a group of one: every element on each rank)
    alone = [dist.new_group([r]) for r in range(world)][rank]
    with deepspeed.zero.Init(data_parallel_group=alone, config_dict_or_path=CFG):
        solo = mlp(8, 5, 16, 1, seed=1)

    def begin(callback):
        return faults.outcome(lambda: callback.on_train_begin(args, TrainerState(global_step=0), None,
                                                        model=engine))

    callback = RefSyncCallback(solo if rank == 1 else ref)
    kind, msg, s = begin(callback)
    out["train begin: other partitions"] = (kind, "partitioned differently" in msg, s,
                                            callback.network is None)
    callback = RefSyncCallback(ref)                       # the retry, with rank 1's own reference
    out["train begin: retry"] = begin(callback)[0]
    tn = callback.network

    # mid-training: the sync at step 2 raises on rank 1 (its reference changed): nothing counted
    # there, no collective; the retry of that step's sync levels the counts
    changed = _Changed(ref)

    def sync(step=2):
        callback.on_step_end(args, TrainerState(global_step=step), None, model=engine)

    case = types.SimpleNamespace(fail=changed.fail, undo=changed.undo, call=sync,
                                 says="Nothing was written")
    record = _one_rank_fails(rank, case, sync, engine, ref, x, 20, tn)
    record["syncs"] = callback.syncs
    out["sync raises on one rank"] = record

    # a sync skipped on rank 1 (its on_step_end not called at step 4): every rank refuses the stream
    _step(engine, rank, 21)
    if rank == 0:
        sync(4)
    out["sync skipped on one rank"] = _refused(tn)
    if rank == 1:
        sync(4)
    out["sync skipped on one rank/caught up"] = faults.outcome(lambda: _stream(tn))[0]
    return out


def _zero3_faults(rank, world):
    deepspeed = deepspeed_on_cpu(rank, world)
    policy = mlp(8, 5, 16, 1, seed=0)
    engine, *_ = deepspeed.initialize(model=policy, config=CFG,
                                      optimizer=torch.optim.SGD(policy.parameters(), lr=0.1))
    # the reference as TRL's prepare_deepspeed makes it: no optimizer, a higher threshold
    ref, *_ = deepspeed.initialize(model=mlp(8, 5, 16, 1, seed=1), config=REF_CFG)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    _forward(ref, x)                      # traced; after the next forwards, persistent ones stay
    out = {"target": _target_cases(rank, engine, ref, x)}
    if importlib.util.find_spec("trl") is not None:
        out["trl"] = _trl_cases(rank, world, deepspeed, engine, ref, x)
    return {"cases": out}


def _check_one_rank_fails(r, record, name, want):
    """``want``: rank 1's error type. Rank 1 raised it, wrote and counted nothing, with no
    collective; rank 0 updated alone; the stream refused on both, naming the counts; after the
    retry the forward worked on both and the target was right."""
    if r == 1:
        assert record["kind"] == want and record["says"], (name, record)
        assert not record["written"] and record["counted"] == 0, (name, record)
    else:
        assert record["kind"] == "ok" and record["written"], (name, record)
        assert record["counted"] == 1, (name, record)
    assert record["collectives"] == 0 and record["s"] < _BOUND_S, (name, record)
    assert record["held"] > 0, (name, record)          # DeepSpeed's gathered copies were held
    kind, names_counts, s = record["stream"]
    assert kind == "Disagreement" and names_counts and s < _BOUND_S, (name, record["stream"])
    assert record["retry"] == "ok" and record["forward"] == ("ok", ""), (name, record)
    assert record["right"], (name, record)


def test_a_zero3_target_with_a_rank_that_fails_refuses_on_every_rank_and_retries(tmp_path):
    ranks = run_ranks(_zero3_faults, tmp_path, 2, timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        cases = ranks[r]["cases"]
        target = cases["target"]
        for name, want in (("model changed", "ValueError"), ("bad argument", "ValueError"),
                           ("injected failure", "RuntimeError")):
            _check_one_rank_fails(r, target[name], name, want)
        for name in ("skipped update", "hard_update on one rank"):
            kind, said, s = target[name]
            assert kind == "Disagreement" and said and s < _BOUND_S, (r, name, target[name])
        assert target["skipped update/caught up"] == "ok"
        assert target["hard_update on one rank/caught up"]
        kind, said, s = target["stream argument"]
        assert kind == ("IndexError" if r == 1 else "Disagreement") and said and s < _BOUND_S, r
        assert target["stream argument/retry"] == "ok"
        assert target["skip_nonfinite"] == ((1, False, 1) if r == 0 else (0, True, 1)), r
        if "trl" not in cases:
            continue
        trl = cases["trl"]
        kind, said, s, dropped = trl["train begin: other partitions"]
        assert kind == ("ValueError" if r == 1 else "Disagreement"), (r, kind)
        assert said and s < _BOUND_S and dropped, (r, trl["train begin: other partitions"])
        assert trl["train begin: retry"] == "ok"
        record = trl["sync raises on one rank"]
        _check_one_rank_fails(r, record, "sync raises on one rank", "ValueError")
        assert record["syncs"] == 1, record      # the failed sync not counted; the retry counted
        kind, said, s = trl["sync skipped on one rank"]
        assert kind == "Disagreement" and said and s < _BOUND_S, (r, kind)
        assert trl["sync skipped on one rank/caught up"] == "ok"
