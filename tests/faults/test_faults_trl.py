"""The fault suite of fastema.trl.RefSyncCallback (TRL's reference / teacher sync): a rank that
disagrees when training begins, and TRL's sync semantics mid-training.

- when training begins, on 2 gloo ranks (plain models: each rank its own replica, as under DDP), a
  rank that refuses (a bad trainer argument, a reference whose names differ from its policy's, no
  model) or whose rate, period or options differ: every rank raises at once (the rank that refused
  its own error, the others its reason), no network is kept, the reference is untouched; then the
  same callbacks with good arguments train, syncing at the right steps (the ZeRO-3 cases, partitions
  over other ranks and a sync that raises on one rank, are in test_faults_zero3_targets.py);
- mid-training, side by side with TRL's own ``SyncRefModelCallback``: the arguments are read as TRL
  reads them, at every step (a rate or period changed in ``args`` in place takes effect at the next
  sync); the hard update (``ref_model_mixup_alpha=1``, TR-DPO's hard variant) and the frozen one (0)
  are TRL's bit for bit.

Issue 64, item 7.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.distributed as dist
from dist import Counted, run_ranks
from support import faults
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("trl")

_COLLECTIVE_S = 30.0       # every collective's timeout in these worlds: a hang is an error, fast
_BOUND_S = 10.0            # a refusal reaches every rank within this (far below that timeout)
RATE = 0.6                 # TRL's default ref_model_mixup_alpha


def _pair(seed=0):
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return policy, ref


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _state(step):
    from transformers import TrainerState

    return TrainerState(global_step=step)


def _extra(ref):
    """A reference with a parameter its policy lacks (a model mismatch on one rank)."""
    ref.register_parameter("extra", nn.Parameter(torch.zeros(3)))
    return ref


def _train_begin(rank, world):
    """Each case: rank 1's callback or arguments differ; ``on_train_begin`` on both ranks."""
    from fastema.torch import TargetNetwork
    from fastema.trl import RefSyncCallback

    TargetNetwork(*_pair()).update()      # the first network and kernels: not in the timings

    ns = types.SimpleNamespace
    args = ns(ref_model_mixup_alpha=RATE, ref_model_sync_steps=2)
    bad = ns(ref_model_mixup_alpha=1.5, ref_model_sync_steps=2)
    no_rate, no_period = ns(ref_model_sync_steps=2), ns(ref_model_mixup_alpha=RATE)
    one = rank == 1
    cases = {   # name: (the callback of a reference, the trainer's arguments, what the error says)
        "update_rate differs": (lambda r: RefSyncCallback(r, update_rate=0.25 if one else 0.5),
                                no_rate, "update_rate"),
        "sync_steps differs": (lambda r: RefSyncCallback(r, sync_steps=3 if one else 2), no_period,
                               "sync_steps"),
        "exclude differs": (lambda r: RefSyncCallback(r, exclude=("2.*",) if one else ()), args,
                            "names"),
        "bad trainer argument": (RefSyncCallback, bad if one else args, "ref_model_mixup_alpha"),
        "reference mismatch": (lambda r: RefSyncCallback(_extra(r) if one else r), args, "'extra'"),
        "no model": (RefSyncCallback, args, "without the model"),
    }
    out = {}
    for name, (make, a, says) in cases.items():
        policy, ref = _pair()
        callback = make(ref)
        before = _params(ref)
        model = None if name == "no model" and one else policy

        def begin(callback=callback, a=a, model=model):
            callback.on_train_begin(a, _state(0), None, model=model)

        with Counted() as c:
            kind, msg, s = faults.outcome(begin)
        out[name] = (kind, says in msg, s, callback.network is None, faults.same(before, _params(ref)),
                     len(c.calls))

    # the retry: the same callbacks with good arguments train; the syncs mid-training at steps 2, 4
    policy, ref = _pair()
    callback = RefSyncCallback(ref)
    out["retry"] = faults.outcome(lambda: callback.on_train_begin(args, _state(0), None, model=policy))[0]
    synced, right = [], True
    for step in range(1, 5):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.1 * step)
        before = _params(ref)
        with Counted() as c:
            callback.on_step_end(args, _state(step), None, model=policy)
        right &= not c.calls
        now = _params(ref)
        if not faults.same(before, now):
            synced.append(step)
            right &= all(torch.equal(now[n], torch.lerp(before[n], p, RATE))
                         for n, p in _params(policy).items())
    out["retry/syncs"] = (synced, right, callback.syncs)
    return {"cases": out}


def test_a_rank_that_disagrees_when_training_begins_makes_every_rank_refuse(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    ranks = run_ranks(_train_begin, tmp_path, 2, timeout=120, pg_timeout=_COLLECTIVE_S)
    refused = {"bad trainer argument": "ValueError", "reference mismatch": "ValueError",
               "no model": "RuntimeError"}
    for r in (0, 1):
        cases = ranks[r]["cases"]
        assert cases.pop("retry") == "ok", r
        assert cases.pop("retry/syncs") == ([2, 4], True, 2), r
        for name, (kind, says, s, dropped, untouched, collectives) in cases.items():
            want = refused.get(name, "Disagreement") if r == 1 else "Disagreement"
            assert kind == want, (r, name, kind)
            assert says and s < _BOUND_S and dropped and untouched, (r, name, cases[name])
            assert collectives <= 2, (r, name, collectives)   # the agreement's exchanges, once


# ------------------------------------------------------------------------------------ mid-training

@pytest.fixture
def plain_trl(monkeypatch):
    """TRL's callbacks outside a trainer: accelerate's state says no DeepSpeed (its plain sync)."""
    import trl.trainer.callbacks as trl_callbacks

    monkeypatch.setattr(trl_callbacks, "AcceleratorState",
                        lambda: types.SimpleNamespace(deepspeed_plugin=None))


def _side_by_side(changes: dict, steps: int = 8, rate: float = RATE, period: int = 2):
    """TRL's SyncRefModelCallback and RefSyncCallback on copies of one reference, through ``steps``
    optimizer steps of one policy, the trainer's ``args`` changed in place before the steps
    ``changes`` names. Returns the steps at which each reference changed, the largest difference
    between them, our reference and the policy."""
    from trl.trainer.callbacks import SyncRefModelCallback

    from fastema.trl import RefSyncCallback

    policy, ref = _pair()
    theirs, ours = copy.deepcopy(ref), copy.deepcopy(ref)
    args = types.SimpleNamespace(ref_model_mixup_alpha=rate, ref_model_sync_steps=period)
    trl, callback = SyncRefModelCallback(theirs, None), RefSyncCallback(ours)
    callback.on_train_begin(args, _state(0), None, model=policy)
    changed: dict = {"trl": [], "ours": []}
    worst = 0.0
    for step in range(1, steps + 1):
        for k, v in changes.get(step, {}).items():
            setattr(args, k, v)
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(0.9).add_(0.05 * step)
        before = (_params(theirs), _params(ours))
        trl.on_step_end(args, _state(step), None, model=policy)
        callback.on_step_end(args, _state(step), None, model=policy)
        for who, m, b in (("trl", theirs, before[0]), ("ours", ours, before[1])):
            if not faults.same(b, _params(m)):
                changed[who].append(step)
        t, o = _params(theirs), _params(ours)
        worst = max(worst, max(float((t[n] - o[n]).abs().max()) for n in t))
    return changed, worst, ours, policy


def test_a_rate_or_period_changed_in_args_mid_training_is_read_as_trl_reads_it(plain_trl):
    """TRL's callbacks read ``args.ref_model_mixup_alpha`` and ``args.ref_model_sync_steps`` at
    every step, so a trainer that anneals them in place changes its syncs; RefSyncCallback reads
    them again when they change: the same steps, the same references (to float32 rounding)."""
    changes = {3: {"ref_model_mixup_alpha": 0.1}, 5: {"ref_model_sync_steps": 3}}
    changed, worst, _, _ = _side_by_side(changes)
    assert changed["trl"] == [2, 4, 6], changed              # every 3 steps from step 5: 6 only
    assert changed["ours"] == changed["trl"], changed
    assert worst < 1e-6, worst


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_hard_and_frozen_syncs_are_trls_bit_for_bit(rate, plain_trl):
    """``ref_model_mixup_alpha=1`` (TR-DPO's hard update: the reference becomes the policy at every
    sync) and 0 (the reference frozen): RefSyncCallback's reference is TRL's bit for bit at every
    step; at 1 it is the policy exactly after each sync, at 0 it never changes. A NaN in the
    reference stays NaN at rate 1, as in TRL's arithmetic; ``network.hard_update()`` is the copy
    that replaces it."""
    changed, worst, ours, policy = _side_by_side({}, steps=4, rate=rate)
    assert worst == 0.0
    if rate == 1.0:
        assert changed["ours"] == [2, 4]
        assert faults.same(_params(ours), _params(policy))
    else:
        assert changed["ours"] == []
    from trl.trainer.callbacks import SyncRefModelCallback

    from fastema.trl import RefSyncCallback

    policy, ref = _pair()
    with torch.no_grad():
        ref[0].weight[0, 0] = float("nan")
    theirs = copy.deepcopy(ref)
    callback = RefSyncCallback(ref, update_rate=1.0, sync_steps=1)
    callback.on_step_end(None, _state(1), None, model=policy)
    SyncRefModelCallback._sync_target_model(policy, theirs, 1.0)
    assert torch.equal(ref[0].weight.view(torch.int32), theirs[0].weight.view(torch.int32))
    assert bool(ref[0].weight[0, 0].isnan())
    callback.network.hard_update()
    assert faults.same(_params(ref), _params(policy))
