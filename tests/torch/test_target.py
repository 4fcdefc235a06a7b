"""fastema.torch.TargetNetwork: target networks and momentum teachers averaged in the target's own
tensors: float64 references over N updates (constant tau, warm-ups, update_every), a SAC/TD3-style
learner loop (side by side with SB3's polyak_update), DQN hard updates, following and refusing
changed networks, checkpoints, no copy of the weights, the guide's examples."""
import copy
import gc
import math
import pathlib
import re
import types
import weakref

import models
import numpy as np
import pytest
import torch
from torch import nn

from fastema import schedules as S
from fastema.torch import TargetNetwork

GUIDE = pathlib.Path(__file__).parents[2] / "docs" / "guides" / "targets.md"


def mlp(dtype=None, seed=0):
    return models.mlp(5, 16, 16, 1, dtype=dtype, seed=seed)


def pair(dtype=None):
    online = mlp(dtype)
    return online, copy.deepcopy(online).requires_grad_(False)


def perturb(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)


def assert_tracks(target, ref64, n):
    """The float32 chain within ``n`` steps' float32 rounding of the float64 reference."""
    for name, t in target.named_parameters():
        r = ref64[name]
        tol = (n + 1) * 2.0 ** -23 * (r.abs() + 1) * 4
        assert ((t.double() - r).abs() <= tol).all(), name


# ------------------------------------------------------------------------------ references

@pytest.mark.parametrize("kw", [dict(tau=0.05), dict(momentum=S.NumUpdates(0.9)),
                                dict(momentum=S.PowerWarmup(0.95, update_after_step=2, power=0.75)),
                                dict(tau=0.2, update_every=3), dict(tau=0.2, update_every=3, compensate=True)])
def test_matches_float64_reference_and_foreach_lerp(kw):
    online, target = pair()
    tn = TargetNetwork(online, target, **kw)
    sched = tn.plan.schedules[0]
    every, comp = kw.get("update_every", 1), kw.get("compensate", False)
    ref = {n: p.detach().double().clone() for n, p in target.named_parameters()}
    lerp = copy.deepcopy(target)                          # torch's own float32 lerp, step by step
    gen = torch.Generator().manual_seed(1)
    updates = 0
    for call in range(20):
        perturb(online, gen)
        tn.update()
        if call % every:
            continue
        updates += 1
        d = sched(updates)
        d = d ** every if comp else d
        tau = 1.0 - d
        for n, p in online.named_parameters():
            ref[n] += tau * (p.detach().double() - ref[n])
        torch._foreach_lerp_(list(lerp.parameters()), [p.detach() for p in online.parameters()], tau)
    assert (tn.updates, tn.calls) == (updates, 20)
    assert_tracks(target, ref, updates)
    for (n, a), b in zip(target.named_parameters(), lerp.parameters()):
        assert torch.equal(a, b), n                       # float32 target: torch.lerp_ bit for bit
    assert all(not p.requires_grad for p in target.parameters())


def test_float32_target_of_bfloat16_online():
    online = mlp(torch.bfloat16)
    target = mlp().requires_grad_(False)
    target.load_state_dict({k: v.float() for k, v in online.state_dict().items()})
    tn = TargetNetwork(online, target, tau=0.01)
    ref = {n: p.detach().double().clone() for n, p in target.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        perturb(online, gen)
        tn.update()
        for n, p in online.named_parameters():
            ref[n] += 0.01 * (p.detach().double() - ref[n])
    assert target[0].weight.dtype == torch.float32
    assert_tracks(target, ref, 30)                        # tau * online is far below bfloat16's resolution


def test_device_step_on_the_cpu_equals_the_host_plan():
    a_on, a_tg = pair()
    b_on, b_tg = pair()
    kw = dict(momentum=S.PowerWarmup(0.9, update_after_step=1), update_every=2)
    host, dev = TargetNetwork(a_on, a_tg, **kw), TargetNetwork(b_on, b_tg, device_step=True, **kw)
    assert dev.device_step and not host.device_step
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(9):
        perturb(a_on, gen_a)
        perturb(b_on, gen_b)
        host.update()
        dev.update()
    for a, b in zip(a_tg.state_dict().values(), b_tg.state_dict().values()):
        assert torch.equal(a, b)
    assert dev.state_dict()["plan"] == host.state_dict()["plan"]
    from fastema._launch.cpu import launch as C

    g = dev._side.avg.groups[0]
    runs = [run for op, run in g.prepared() if op == "plan_lerp"]   # (the construction's warm-up's too)
    live = g.launch_of(dev._core.device_plan.carrier(g.device, 0, False))
    assert any(run is live for run in runs)                  # the plan step rode in the lerp launch, kept
    assert isinstance(live, C.CpuLaunch) and live._kernel_of(False).py_func.__qualname__.startswith("plan_lerp")


def test_momentum_schedule_object():
    Cosine = getattr(S, "Cosine", None)
    if Cosine is None:
        pytest.skip("fastema.schedules.Cosine is not in this tree yet")
    online, target = pair()
    sched = Cosine(0.9, 1.0, 10)
    tn = TargetNetwork(online, target, momentum=sched)
    ref = {n: p.detach().double().clone() for n, p in target.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    for n_upd in range(1, 13):
        perturb(online, gen)
        tn.update()
        t = n_upd - 1                                     # DINO's cosine, closed form: 0.9 at the first update
        tau = 1.0 - (1.0 if t >= 10 else 1.0 + 0.5 * (0.9 - 1.0) * (1 + math.cos(math.pi * t / 10)))
        for n, p in online.named_parameters():
            ref[n] += tau * (p.detach().double() - ref[n])
    assert_tracks(target, ref, 12)
    assert tn.momentum == 1.0                             # held at the end from total_steps on


# ------------------------------------------------------------------------------ learner loops

def test_td3_style_learner_loop_against_float64_and_sb3():
    """A critic trained with Adam on TD targets computed from its target network each step."""
    polyak = pytest.importorskip("stable_baselines3.common.utils").polyak_update
    torch.manual_seed(0)
    critic = models.mlp(4 + 1, 32, 32, 1, seed=5)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    sb3_critic, sb3_target = copy.deepcopy(critic), copy.deepcopy(critic_target)
    tau, gamma = 0.02, 0.99
    soft = TargetNetwork(critic, critic_target, tau=tau)
    ref = {n: p.detach().double().clone() for n, p in critic_target.named_parameters()}
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (critic, sb3_critic)]
    gen = torch.Generator().manual_seed(6)
    for step in range(25):
        s, a, r, s2 = (torch.randn(16, k, generator=gen) for k in (4, 1, 1, 4))
        a2 = torch.tanh(s2[:, :1])
        for net, tgt, opt in ((critic, critic_target, opts[0]), (sb3_critic, sb3_target, opts[1])):
            with torch.no_grad():
                y = r + gamma * tgt(torch.cat([s2, a2], 1))
            loss = nn.functional.mse_loss(net(torch.cat([s, a], 1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        soft.update()
        polyak(sb3_critic.parameters(), sb3_target.parameters(), tau)
        for n, p in critic.named_parameters():
            ref[n] += tau * (p.detach().double() - ref[n])
    assert_tracks(critic_target, ref, 25)
    # SB3 rounds twice a step (mul_, add_) and its critic learns from its own target: the two runs
    # stay within float32 rounding of each other over the loop
    for a, b in zip(critic_target.parameters(), sb3_target.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dqn_hard_updates():
    q = models.mlp(4, 16, 2, norm=nn.BatchNorm1d, seed=7)
    q_target = copy.deepcopy(q).requires_grad_(False)
    sync = TargetNetwork(q, q_target, tau=1.0)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(8)
    for step in range(1, 13):
        s, r = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
        before = {k: v.clone() for k, v in q_target.state_dict().items()}
        with torch.no_grad():
            y = r + 0.9 * q_target(s).max(1, keepdim=True).values
        loss = nn.functional.mse_loss(q(s).max(1, keepdim=True).values, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 4 == 0:
            sync.hard_update()
            for (k, a), b in zip(q_target.state_dict().items(), q.state_dict().values()):
                assert torch.equal(a, b), k               # parameters, running statistics, counters
        else:
            for k, v in q_target.state_dict().items():
                if k.endswith("num_batches_tracked") or "running" in k:
                    continue                              # q_target(s) in train mode moved its statistics
                assert torch.equal(v, before[k]), k
    assert sync.updates == 0


def test_buffers_copy_average_ignore():
    gen = torch.Generator().manual_seed(9)
    for buffers in ("copy", "average", "ignore"):
        online = models.mlp(4, 8, 2, norm=nn.BatchNorm1d, seed=10)
        target = copy.deepcopy(online).requires_grad_(False)
        tn = TargetNetwork(online, target, tau=0.5, buffers=buffers)
        start = target[1].running_mean.clone()
        online(torch.randn(8, 4, generator=gen))           # the online statistics move
        tn.update()
        got, src = target[1].running_mean, online[1].running_mean
        want = {"copy": src, "average": start.lerp(src, 0.5), "ignore": start}[buffers]
        assert torch.equal(got, want), buffers
        counters = (target[1].num_batches_tracked.item(), online[1].num_batches_tracked.item())
        assert counters == ((0, 1) if buffers == "ignore" else (1, 1)), buffers


class _AliasedWeight(nn.Module):
    """A buffer that is the weight itself (kept by copy.deepcopy)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("alias", self.lin.weight)


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_a_buffer_aliasing_an_averaged_weight_is_averaged_once_not_copied_over_it(buffers):
    """With buffers="copy" the aliasing buffer was copied from the online network over the average
    after every lerp: the target equalled the online network."""
    gen = torch.Generator().manual_seed(3)
    online = _AliasedWeight()
    target = copy.deepcopy(online)
    assert target.alias.data_ptr() == target.lin.weight.data_ptr()
    tn = TargetNetwork(online, target, tau=0.1, buffers=buffers)
    assert tn.names["copied"] == [] and tn.names["averaged"] == ["lin.weight", "lin.bias", "alias"]
    ref = target.lin.weight.detach().double().clone()
    for _ in range(3):
        with torch.no_grad():
            online.lin.weight.add_(torch.randn(3, 3, generator=gen) * 0.1)
        tn.update()
        ref = 0.9 * ref + 0.1 * online.lin.weight.detach().double()
    assert torch.allclose(target.lin.weight.double(), ref, rtol=0, atol=1e-6)
    assert not torch.equal(target.lin.weight, online.lin.weight)


def test_a_copied_buffer_over_averaged_memory_is_refused_by_name():
    online = _AliasedWeight()
    target = copy.deepcopy(online)
    online.alias = torch.zeros(3)
    target.alias = target.lin.weight.detach()[1]            # part of the target's weight, not the online's
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"the target's 'alias' \(a buffer copied.*shares memory with the "
                                         r"target's 'lin.weight'.*exclude= the buffer"):
        TargetNetwork(online, target)
    target.register_buffer("alias", target.lin.weight)      # the target's alias, not the online's
    online.alias = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"the target's 'alias' shares memory with its 'lin.weight' but the "
                                         r"online network's 'alias' is not its 'lin.weight'"):
        TargetNetwork(online, target, buffers="average")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items() if k != "alias")


def test_the_streams_leave_out_extra_state_that_is_not_a_tensor():
    """get_extra_state() returning a dict: iter_weights() and weights_metadata() raised AttributeError
    ('dict' object has no attribute 'dtype'); they are tensors only and leave it out."""
    class WithExtraState(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def get_extra_state(self):
            return {"scale": 2.0}

        def set_extra_state(self, state):
            pass

    online = WithExtraState()
    target = copy.deepcopy(online)
    tn = TargetNetwork(online, target, tau=0.5)
    with torch.no_grad():
        online.lin.weight.add_(1.0)
    tn.update()
    streamed = dict(tn.iter_weights())
    assert list(streamed) == ["lin.weight", "lin.bias"] == [w.name for w in tn.weights_metadata()]
    assert torch.equal(streamed["lin.weight"], target.lin.weight) and "_extra_state" in target.state_dict()


@pytest.mark.parametrize("device_step", [False, True])      # True: the GPU default's device plan
def test_skip_nonfinite_keeps_the_target(device_step):
    online, target = pair()
    tn = TargetNetwork(online, target, tau=0.5, skip_nonfinite=True, device_step=device_step)
    before = copy.deepcopy(target.state_dict())
    with torch.no_grad():
        online[0].weight[0, 0] = float("nan")
    tn.update()
    assert tn.skipped["cpu"].item() == 1 and tn.updates == 1     # counted, nothing written
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        online[0].weight[0, 0] = 0.0
    tn.update()
    assert tn.skipped["cpu"].item() == 0
    assert torch.equal(target[0].weight, before["0.weight"].lerp(online[0].weight, 0.5))


@pytest.mark.parametrize("device_step", [False, True])
def test_update_reads_no_tensor_value_on_the_host(device_step):
    from reference import no_host_reads

    online = models.mlp(4, 8, 2, norm=nn.BatchNorm1d, seed=14)
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, momentum=S.NumUpdates(0.9), update_every=2, skip_nonfinite=True,
                       device_step=device_step)
    online(torch.randn(8, 4))
    with no_host_reads():
        for _ in range(3):
            tn.update()                                   # scan, lerp, buffer copies, integer copies behind flags
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    assert torch.equal(target[1].num_batches_tracked, online[1].num_batches_tracked)
    assert tn.state_dict()["plan"]["updates"] == 2


# ------------------------------------------------------------------------------ checkpoints

def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    kw = dict(momentum=S.PowerWarmup(0.9, update_after_step=2), update_every=2)

    def run(online, target, tn, steps, gen):
        for _ in range(steps):
            perturb(online, gen)
            tn.update()

    online, target = pair()
    tn = TargetNetwork(online, target, **kw)
    gen = torch.Generator().manual_seed(11)
    run(online, target, tn, 7, gen)
    torch.save({"online": online.state_dict(), "target": target.state_dict(), "tn": tn.state_dict(),
                "gen": gen.get_state()}, tmp_path / "ckpt.pt")
    run(online, target, tn, 8, gen)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    online2, target2 = mlp(seed=99), mlp(seed=98).requires_grad_(False)
    online2.load_state_dict(saved["online"])
    target2.load_state_dict(saved["target"])
    tn2 = TargetNetwork(online2, target2, **kw)
    tn2.load_state_dict(saved["tn"])
    gen2 = torch.Generator()
    gen2.set_state(saved["gen"])
    run(online2, target2, tn2, 8, gen2)
    for a, b in zip(target.state_dict().values(), target2.state_dict().values()):
        assert torch.equal(a, b)
    assert tn2.state_dict() == tn.state_dict()


def test_load_refusals_change_nothing():
    online, target = pair()
    tn = TargetNetwork(online, target, tau=0.1)
    tn.update()
    good = tn.state_dict()
    other = TargetNetwork(*pair(), tau=0.1, exclude=["2.*"]).state_dict()
    bad = [("not a dict", TypeError), ({**good, "format": "fastema.torch.EMA"}, ValueError),
           ({**good, "version": 99}, ValueError), (other, ValueError),
           ({**good, "plan": {**good["plan"], "updates": -1}}, ValueError),
           ({**good, "plan": {**good["plan"], "schedules": []}}, ValueError)]
    for state, err in bad:
        with pytest.raises(err):
            tn.load_state_dict(state)
        assert tn.state_dict() == good


# ------------------------------------------------------------------------------ changes and refusals

def test_construction_refusals_name_the_tensor():
    online, target = pair()
    with pytest.raises(ValueError, match="itself"):
        TargetNetwork(online, online)
    with pytest.raises(ValueError, match="tau or momentum"):
        TargetNetwork(online, target, tau=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="tau must be"):
        TargetNetwork(online, target, tau=1.5)
    wider = models.mlp(5, 16, 17, 1)
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(17, 16\) in the target"):
        TargetNetwork(online, wider)
    deeper = models.mlp(5, 16, 16, 16, 1)
    with pytest.raises(ValueError, match=r"the target has \['6.weight', '6.bias'\], which the online network lacks;"):
        TargetNetwork(online, deeper)
    shared = copy.deepcopy(online)
    shared[0].weight = online[0].weight
    with pytest.raises(ValueError, match="'0.weight' shares memory"):
        TargetNetwork(online, shared)
    lazy = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    with pytest.raises(ValueError, match="the target's parameter '0.weight' is an uninitialized parameter"):
        TargetNetwork(online, lazy)
    with pytest.raises(ValueError, match="rounding"):
        TargetNetwork(online, target, rounding="stochastic")        # float32 targets round to nearest
    assert TargetNetwork(online, copy.deepcopy(online), exclude=["2.*"]).names["averaged"] == [
        "0.weight", "0.bias", "4.weight", "4.bias"]


def test_exclude_names_a_tied_tensor_by_any_of_its_names():
    """exclude=["2.weight"] of a weight tied as 0.weight (lm_head / wte) averaged it all the same:
    named_parameters() gives a tie's first name only. Any of its names selects it now, as in EMA."""
    def tied():
        m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        m[2].weight = m[0].weight
        return m

    online = tied()
    for pattern in ("0.weight", "2.weight"):
        tn = TargetNetwork(online, copy.deepcopy(online), exclude=[pattern])
        assert tn.names["averaged"] == ["0.bias", "2.bias"], pattern


def test_a_zero3_parameter_outside_a_distributed_run_is_refused_by_name():
    """What DeepSpeed ZeRO-3 leaves on a module (an empty tensor, the partition in ``ds_tensor``) with no process
    group: refused by name before anything is read (tests/torch/sharding/test_zero3_pairs.py pairs real ones)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is up in this process")
    online, target = pair()
    p = nn.Parameter(torch.empty(0), requires_grad=False)
    p.ds_id, p.ds_shape, p.ds_numel, p.ds_tensor = 0, (16, 5), 80, torch.zeros(40)
    target[0].weight = p
    before = [t.clone() for t in target.parameters()]
    with pytest.raises(TypeError, match=r"target's parameter '0.weight' is a DeepSpeed ZeRO-3 partitioned parameter "
                                        r"\(full shape \(16, 5\)\), but torch.distributed is not initialized"):
        TargetNetwork(online, target)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))


def test_wrapped_online_matches_by_normalised_name():
    class Compiled(nn.Module):                                       # torch.compile's wrapper, as it nests
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    online, target = pair()
    assert next(iter(Compiled(online).state_dict())).startswith("_orig_mod.")
    tn = TargetNetwork(Compiled(online), target, tau=0.5)
    perturb(online, torch.Generator().manual_seed(12))
    want = target[0].weight.lerp(online[0].weight, 0.5)
    tn.update()
    assert torch.equal(target[0].weight, want)


@pytest.fixture(params=["hooks", "no hooks"])
def hooks(request):
    """With torch's registration hooks (the default) and without them (every module checked per step)."""
    from fastema.torch import registration_hooks

    registration_hooks(request.param == "hooks")
    yield request.param
    registration_hooks(True)


def test_follows_moved_and_replaced_tensors(hooks):
    online, target = pair()
    tn = TargetNetwork(online, target, tau=0.5)
    online[0].weight.data = torch.randn(16, 5)                       # storage moved
    target[2].weight = nn.Parameter(target[2].weight.detach().clone(), requires_grad=False)   # replaced
    w0, w2 = target[0].weight.lerp(online[0].weight, 0.5), target[2].weight.lerp(online[2].weight, 0.5)
    tn.update()
    assert torch.equal(target[0].weight, w0) and torch.equal(target[2].weight, w2)


@pytest.mark.parametrize("change", ["bigger layer", "deleted layer", "added parameter", "dtype", "reshaped"])
def test_changed_networks_are_refused_and_nothing_is_written(change, hooks):
    online, target = pair()
    tn = TargetNetwork(online, target, tau=0.5)
    tn.update()
    if change == "bigger layer":
        online[2] = nn.Linear(16, 16, bias=False)
    elif change == "deleted layer":
        del target[4]
    elif change == "added parameter":
        target[0].extra = nn.Parameter(torch.zeros(3))
    elif change == "dtype":
        target[2].double()
    else:
        online[0].weight.data = online[0].weight.data.reshape(5, 16)
    before = copy.deepcopy(target.state_dict())
    state = tn.state_dict()
    with pytest.raises(ValueError, match="TargetNetwork"):
        tn.update()
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert tn.state_dict() == state


@pytest.mark.parametrize("write", ["parameter dict", "deleted module", "parameter dict deletion"])
def test_writes_no_hook_sees_are_followed_or_refused(write, hooks):
    """Writes that call no registration hook: a tensor put into ``_parameters`` directly (what
    ``module._apply`` does under ``torch.__future__.set_overwrite_module_params_on_conversion``),
    ``del model[k]`` and ``del module._parameters[k]``: followed or refused, never the old memory."""
    online, target = pair()
    tn = TargetNetwork(online, target, tau=0.5)
    tn.update()
    if write == "parameter dict":
        fresh = nn.Parameter(target[2].weight.detach().clone() + 1, requires_grad=False)
        target[2]._parameters["weight"] = fresh
        want = fresh.detach().lerp(online[2].weight, 0.5)
        tn.update()
        assert target[2].weight is fresh and torch.equal(fresh, want)
        return
    if write == "deleted module":
        del target._modules["4"]
    else:
        del target[2]._parameters["bias"]
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="TargetNetwork"):
        tn.update()
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_holds_no_copy_of_the_weights():
    online, target = models.mlp(64, 128, 128, 8, seed=13), None
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.1, skip_nonfinite=True)
    tn.update()
    weights = sum(p.numel() * p.element_size() for p in target.parameters())
    assert tn.nbytes < 1024 < weights / 50                           # tables of addresses and a flag
    # and nothing reachable from it but the networks' own tensors is larger than a few bytes
    own = {id(t) for m in (online, target) for t in list(m.parameters()) + list(m.buffers())}
    seen, stack, found = {id(online), id(target)}, [tn], []
    while stack:
        obj = stack.pop()
        for ref in gc.get_referents(obj):
            kind = type(ref)                                         # (type(): a dead weak proxy is not touched)
            if id(ref) in seen or kind in weakref.ProxyTypes or issubclass(kind, (
                    type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)) \
                    or kind.__module__.startswith(("numba", "llvmlite")):    # compiled kernels, not data
                continue
            seen.add(id(ref))
            if isinstance(ref, torch.Tensor):
                if id(ref) not in own:
                    found.append(ref.numel() * ref.element_size())
            elif isinstance(ref, np.ndarray):
                found.append(ref.nbytes)
            elif not isinstance(ref, nn.Module):
                stack.append(ref)
    assert sum(found) < 1024, sorted(found)[-5:]


# ------------------------------------------------------------------------------ the guide

@pytest.mark.parametrize("block", [0, 1])
def test_guide_examples_run(capsys, block):
    code = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)[block]
    exec(compile(code, "guides/targets.md", "exec"), {})
    assert "TargetNetwork(tau=0.005" in capsys.readouterr().out or block == 1


# ------------------------------------------------------------------------------ torch.compile

def test_update_inside_a_compiled_learner_step_is_the_lerp_of_each_step():
    """A learner step compiled with torch.compile, TargetNetwork.update() inside it (one custom
    operator): after every call the target is the lerp of its value before towards the online
    network (bit for bit), with the tau of that step of a Cosine momentum, which advances at every
    call without recompiling (dynamo traced the step once)."""
    import torch._dynamo

    online, target = pair()
    schedule = S.Cosine(0.5, 0.9, total_steps=4)
    tn = TargetNetwork(online, target, momentum=schedule)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)

    def step(x):
        with torch.no_grad():
            y = target(x)
        loss = (online(x) - y - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tn.update()
        return loss

    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(step)
    gen = torch.Generator().manual_seed(5)
    graphs = []
    for n in range(1, 7):
        before = [t.detach().clone() for t in target.parameters()]
        compiled(torch.randn(8, 5, generator=gen))
        graphs.append(counts["stats"]["unique_graphs"])
        tau = 1.0 - schedule(n)
        for (name, t), b, p in zip(target.named_parameters(), before, online.parameters()):
            assert torch.equal(t, b.lerp(p.detach(), tau)), (n, name)
            assert not torch.equal(t, b), (n, name)
    assert tn.updates == 6 and tn.momentum == 0.9
    assert graphs[1] == graphs[-1] > 0, graphs                               # traced once: no recompile
    with pytest.raises(ValueError, match="step must be an int"):
        torch.compile(lambda: tn.update(step=torch.tensor(3)))()
    assert tn.updates == 6                                                   # refused: nothing counted


def test_turning_the_guard_on_after_updates_rebinds_the_launches():
    """The bound launches depend on the guard (with ``skip_nonfinite`` the plan step cannot ride in
    the lerp launch): switching it on between updates rebinds them, and the device-planned target
    still equals the host-planned one, a diverged step skipped by both."""
    a_on, a_tg = pair()
    b_on, b_tg = pair()
    kw = dict(momentum=S.PowerWarmup(0.9), update_every=2)
    host, dev = TargetNetwork(a_on, a_tg, **kw), TargetNetwork(b_on, b_tg, device_step=True, **kw)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(8):
        if step == 3:
            host.skip_nonfinite = dev.skip_nonfinite = True
        perturb(a_on, gen_a)
        perturb(b_on, gen_b)
        if step == 6:
            with torch.no_grad():
                next(a_on.parameters()).view(-1)[0] = float("inf")
                next(b_on.parameters()).view(-1)[0] = float("inf")
        host.update()
        dev.update()
    for a, b in zip(a_tg.state_dict().values(), b_tg.state_dict().values()):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()
    assert dev.state_dict()["plan"] == host.state_dict()["plan"]


# ------------------------------------------------------------------------------ reliability round 4

class _TwoVectors(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4))
        self.b = nn.Parameter(torch.zeros(8))


def test_a_target_inside_another_online_tensor_is_refused_and_the_online_network_never_written(hooks):
    """H2: the shared-memory guard compared start addresses only, so a target tensor that is an offset view
    into *another* online tensor passed it and update() wrote the online network. Now every target tensor's
    bytes are checked against every online tensor's, at construction and after any change is followed."""
    online, target = _TwoVectors(), _TwoVectors()
    with torch.no_grad():
        online.a.fill_(1.0)
        online.b.copy_(torch.arange(8.0))
    want = online.b.detach().clone()
    target.a = nn.Parameter(online.b.detach()[4:])                       # inside online.b, 16 bytes in
    with pytest.raises(ValueError, match=r"the target's 'a' shares memory with the online network's 'b'.*"
                                         r"Nothing was written"):
        TargetNetwork(online, target, tau=0.5)
    assert torch.equal(online.b, want)

    target = _TwoVectors()                                               # fine at construction, aliased after
    tn = TargetNetwork(online, target, tau=0.5)
    for alias in ("replaced", "storage moved"):
        if alias == "replaced":
            target.a = nn.Parameter(online.b.detach()[2:6])
        else:
            target.a = nn.Parameter(torch.zeros(4))
            tn.update()                                                  # followed: a tensor of its own
            target.a.data = online.b.detach()[1:5]
        before = online.b.detach().clone()
        with pytest.raises(ValueError, match=r"the target's 'a' shares memory with the online network's 'b'"):
            tn.update()
        assert torch.equal(online.b, before), alias
    assert torch.equal(online.b, want)


@pytest.mark.parametrize("change", ["layer added to both", "layer added to the online network",
                                    "parameter on a module holding no tracked tensor",
                                    "buffer on the online network's top module"])
def test_added_layers_and_tensors_are_refused_by_name_not_silently_left_out(change, hooks):
    """M1: a layer appended to both networks (or to the online one only), or a tensor registered on a
    module that holds no tracked tensor, was accepted and never averaged. Now the names are looked up
    again and the change refused by name with nothing written (as fastema.torch.EMA refuses additions)."""
    online = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.5)
    tn.update()
    if change == "layer added to both":
        online.append(nn.Linear(3, 2))
        target.append(copy.deepcopy(online[3]))
        name = "3.weight"
    elif change == "layer added to the online network":
        online.append(nn.Linear(3, 2))
        name = "3.weight"
    elif change == "parameter on a module holding no tracked tensor":
        online[1].register_parameter("scale", nn.Parameter(torch.ones(3)))
        target[1].register_parameter("scale", nn.Parameter(torch.ones(3)))
        name = "1.scale"
    else:
        online.register_buffer("extra", torch.zeros(3))
        name = "extra"
    before = copy.deepcopy(target.state_dict())
    state = tn.state_dict()
    for _ in range(2):                                                    # refused again, not once
        with pytest.raises(ValueError, match=re.escape(repr(name))) as err:
            tn.update()
        assert "[]" not in str(err.value), "the message lists only what changed"
    for k, v in before.items():
        assert torch.equal(target.state_dict()[k], v), k
    assert tn.state_dict() == state


def test_an_added_layer_that_matches_exclude_is_fine(hooks):
    online = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.5, exclude=["3.*"])
    online.append(nn.Linear(3, 2))
    target.append(nn.Linear(3, 2))
    kept = target[3].weight.detach().clone()
    want = target[0].weight.lerp(online[0].weight, 0.5)
    tn.update()
    assert torch.equal(target[0].weight, want) and torch.equal(target[3].weight, kept)


@pytest.mark.parametrize("write", ["update", "hard_update"])
def test_writes_bump_autograd_versions_so_a_stale_backward_raises_as_with_torch_lerp(write):
    """M8: the kernels wrote the target without bumping autograd's version counters, so a backward through
    a graph that saved the old target weights ran silently with the new ones. torch's own soft update
    (``_foreach_lerp_`` under no_grad) makes that backward raise; so does fastema's now."""
    online, target = pair()
    tn = TargetNetwork(online, target, tau=0.5)
    reference = copy.deepcopy(target)
    x = torch.randn(3, 5, requires_grad=True)
    for net, write_it in ((reference, lambda: torch._foreach_lerp_(list(reference.parameters()),
                                                                   [p.detach() for p in online.parameters()], 0.5)),
                          (target, getattr(tn, write))):
        y = net(x).sum()
        with torch.no_grad():
            write_it()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    y = target(x).sum()                                                  # a graph made after the write is fine
    y.backward()


_BEMA_STATES = {"bema": S.BEMA().state(), "power_function": S.PowerFunction(7.0).state(),
                "half_life": S.HalfLife(50.0).state()}


@pytest.mark.parametrize("kind", sorted(_BEMA_STATES))
@pytest.mark.parametrize("device_step", [False, True])
def test_load_refuses_schedules_the_constructor_refuses_and_changes_nothing(kind, device_step):
    """L1: load_state_dict took BEMA, power-function and half-life schedules, which TargetNetwork(...)
    refuses. M4: with the device plan, a schedule it cannot run was refused only after the host plan had
    loaded it (the host and the device then disagreed). Now both are refused first, nothing changed."""
    online, target = pair()
    tn = TargetNetwork(online, target, tau=0.1, device_step=device_step)
    for _ in range(2):
        tn.update()
    good, host = tn.state_dict(), tn.plan.state()
    bad = {**good, "plan": {**good["plan"], "schedules": [_BEMA_STATES[kind]], "updates": 77, "calls": 77}}
    with pytest.raises(ValueError, match=f"{kind}.*Nothing was loaded"):
        tn.load_state_dict(bad)
    assert tn.plan.state() == host and tn.state_dict() == good
    debiased = {**good, "plan": {**good["plan"], "debias": True}}
    with pytest.raises(ValueError, match="debias.*Nothing was loaded"):
        tn.load_state_dict(debiased)
    assert tn.plan.state() == host and tn.state_dict() == good


@pytest.mark.parametrize("change", ["transposed", "freed"])
def test_refusals_after_construction_name_the_parameter_not_a_launch_position(change, hooks):
    """L6: the refusals made while following a change named launch positions ("shadows[0] and sources[0]
    are laid out differently", "the storage of sources[2] was freed"); now they name the parameter."""
    online = models.mlp(5, 16, 16, 1)
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.5)
    if change == "transposed":
        online[2].weight.data = online[2].weight.data.t().contiguous().t()   # same shape, other layout
        match = r"the target's '2.weight' and the online network's '2.weight' are laid out differently"
    else:
        online[2].bias.untyped_storage().resize_(0)
        match = r"the storage of the online network's '2.bias' was freed"
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match) as err:
        tn.update()
    assert "shadows[" not in str(err.value) and "sources[" not in str(err.value)
    assert "Nothing was written" in str(err.value)
    for k, v in before.items():
        assert torch.equal(target.state_dict()[k], v), k


@pytest.mark.parametrize("kw, words", [
    (dict(tau=0.5, shadow_dtype="bfloat16"), r"shadow_dtype=.*target.to\(torch.bfloat16\)"),
    (dict(tau=0.5, offload="cpu"), "offload=.*target.to\\('cpu'\\)"),
    (dict(tau=0.5, debias=True), "debias=.*starts as a copy of the online network"),
    (dict(momentum=S.PowerFunction.of(0.1)), r"momentum=PowerFunction\(\.\.\.\):.*PostHocEMA"),
    (dict(momentum=[S.PowerFunction.of(0.05), S.PowerFunction.of(0.1)]), r"momentum=PowerFunction\(\.\.\.\)"),
    (dict(momentum=S.HalfLife(10.0)), r"momentum=HalfLife\(\.\.\.\):.*momentum per update"),
    (dict(momentum=S.BEMA()), r"momentum=BEMA\(\.\.\.\):.*three rows"),
])
def test_what_an_ema_keeps_in_a_shadow_of_its_own_is_refused_by_name(kw, words):
    """TargetNetwork takes EMAOptions (the contract suite runs it with every option): what only means
    something for a shadow fastema owns (an option, or a schedule over training time as momentum=) is
    refused by name, with the way out, before anything is read."""
    online, target = pair()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=f"TargetNetwork does not take {words}"):
        TargetNetwork(online, target, **kw)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['decay'\]; it takes tau or momentum"):
        TargetNetwork(online, target, decay=0.5)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bema'\]"):          # a schedule, given as momentum=
        TargetNetwork(online, target, tau=0.5, bema=True)
    TargetNetwork(online, target, tau=0.5, debias=False, offload=None)   # "off" is no refusal
    for k, v in before.items():
        assert torch.equal(target.state_dict()[k], v)


def test_a_refused_hard_update_copies_and_counts_nothing():
    # hard_update() counted its copy before the networks' check refused it: a stream begun before
    # it then refused as if the target had changed (and under sharding a rank that was refused and
    # retried counted two copies against the others' one: every rank's iter_weights() disagreed)
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    stream = tn.iter_weights()
    next(stream)
    online.append(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="networks changed"):
        tn.hard_update()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert len(list(stream)) == 3                       # the stream goes on: nothing changed
    del online[2]
    tn.hard_update()
    with pytest.raises(RuntimeError, match="changed while it was streamed"):
        stream = tn.iter_weights()
        next(stream)
        tn.hard_update()
        list(stream)
