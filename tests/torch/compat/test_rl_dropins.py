"""The reinforcement-learning drop-ins of ``fastema.torch.compat``: Stable-Baselines3's
``polyak_update`` and TorchRL's ``SoftUpdate`` / ``HardUpdate``, against a float64 reference and
side by side with the packages themselves over real learners (SB3's SAC on Pendulum-v1,
TorchRL's DDPGLoss)."""
import copy
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import mlp
from reference import assert_close_to_reference, no_host_reads
from torch import nn

from fastema import ops
from fastema.torch.compat import polyak_update

ROOT = pathlib.Path(__file__).parents[3]
EPS32 = 2.0 ** -23


@pytest.fixture
def one_thread():
    """SB3's and TorchRL's tiny learners run several times faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(seed=0, dtype=None):
    online = mlp(5, 12, 12, 2, seed=seed, dtype=dtype)
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))            # the online network has moved away
    return online, target


def _within_float32_rounding(got, expected, old, param, ulps=2):
    """``got`` within ``ulps`` float32 ulps of the operands of ``target <- (1 - tau) * old + tau * param``
    (``|old| + |param|``: the two roundings of SB3's and the one of lerp are each within an ulp of those)."""
    tol = ulps * EPS32 * (old.detach().abs() + param.detach().abs()) + 1e-38
    assert torch.all((got.detach() - expected).abs() <= tol), (got.detach() - expected).abs().max()


# ------------------------------------------------------------------------ polyak_update: the arithmetic

@pytest.mark.parametrize("tau", [0.005, 0.3, 0.5, 0.9])
def test_polyak_update_follows_the_float64_reference_over_many_updates(tau):
    online, target = _pair()
    ref = [t.double() for t in target.parameters()]
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        polyak_update(online.parameters(), target.parameters(), tau)
        ref = [(1 - tau) * r + tau * p.detach().double() for r, p in zip(ref, online.parameters())]
        for t, r, p in zip(target.parameters(), ref, online.parameters()):
            # float32 arithmetic, one rounding per update: the error is a few ulps of the operands per update
            scale = 50 * (r.abs() + p.detach().double().abs()).numpy()
            assert_close_to_reference(t.numpy(), r.numpy(), "float32", scale)


def test_polyak_update_bfloat16_targets_round_once():
    dtype = "bfloat16"
    online, target = _pair(dtype=torch.bfloat16)
    before = [t.double() for t in target.parameters()]
    polyak_update(online.parameters(), target.parameters(), 0.25)
    for t, b, p in zip(target.parameters(), before, online.parameters()):
        ref = 0.75 * b + 0.25 * p.detach().double()
        assert_close_to_reference(t.double().numpy(), ref.numpy(), dtype, (b.abs() + p.detach().double().abs()).numpy())


def test_polyak_update_equals_stable_baselines3_to_float32_rounding_and_tau_0_and_1_bit_for_bit():
    utils = pytest.importorskip("stable_baselines3.common.utils")
    for tau in (0.0, 0.005, 0.02, 0.5, 1.0):
        online, target = _pair(seed=4)
        expected, old = copy.deepcopy(target), copy.deepcopy(target)
        utils.polyak_update(online.parameters(), expected.parameters(), tau)
        polyak_update(online.parameters(), target.parameters(), tau)
        for t, e, o, p in zip(target.parameters(), expected.parameters(), old.parameters(), online.parameters()):
            if tau in (0.0, 1.0):
                assert torch.equal(t, e), tau        # nothing to round: the target, or a copy of the parameters
            else:
                _within_float32_rounding(t, e, o, p)


def test_polyak_update_of_slices_writes_them_as_sb3_does():
    """A pair of equally strided slices (target[:, :8]) went to the kernels, which refused it as not
    dense and advised .contiguous(), a copy the update never reaches. SB3 writes the slice: so does
    the drop-in, with SB3's own arithmetic."""
    utils = pytest.importorskip("stable_baselines3.common.utils")
    torch.manual_seed(0)
    src, target = torch.randn(8, 16), torch.randn(8, 16)
    expected = target.clone()
    utils.polyak_update([src[:, :8]], [expected[:, :8]], 0.5)
    polyak_update([src[:, :8]], [target[:, :8]], 0.5)
    assert torch.equal(target, expected) and not torch.equal(target[:, :8], src[:, :8])


def test_tau_1_copies_batch_norm_running_statistics_as_sb3_does():
    """SB3's ``polyak_update(batch_norm_stats, batch_norm_stats_target, 1.0)``, with the statistics
    SB3's ``get_parameters_by_name(model, ["running_"])`` picks (num_batches_tracked, an integer, is not)."""
    utils = pytest.importorskip("stable_baselines3.common.utils")
    net = mlp(3, 8, 1, norm=nn.BatchNorm1d)
    target, expected = copy.deepcopy(net), copy.deepcopy(net)
    net(torch.randn(16, 3))                          # training mode: the running statistics move
    stats = utils.get_parameters_by_name(net, ["running_"])
    assert len(stats) == 2
    utils.polyak_update(stats, utils.get_parameters_by_name(expected, ["running_"]), 1.0)
    polyak_update(stats, utils.get_parameters_by_name(target, ["running_"]), 1.0)
    for name, b in target.named_buffers():
        assert torch.equal(b, dict(expected.named_buffers())[name]), name
    assert torch.equal(target[1].running_mean, net[1].running_mean)
    assert not torch.equal(target[1].running_mean, mlp(3, 8, 1, norm=nn.BatchNorm1d)[1].running_mean)


def test_the_repeated_call_hits_the_cached_layout_and_reads_no_tensor_value():
    online, target = _pair()
    polyak_update(online.parameters(), target.parameters(), 0.1)
    targets, sources = list(target.parameters()), list(online.parameters())
    assert ops.cached_pairs(targets, sources) is not None      # one key of addresses, one launch
    expected = [torch.lerp(t, s, 0.1) for t, s in zip(targets, sources)]
    with no_host_reads():
        polyak_update(online.parameters(), target.parameters(), 0.1)
    for t, e in zip(targets, expected):
        assert torch.equal(t, e)                     # bit for bit torch.lerp_
    with torch.no_grad():
        target[0].weight.data = target[0].weight.data.clone()   # new memory: a miss, checked again
    polyak_update(online.parameters(), target.parameters(), 0.1)
    assert torch.equal(target[0].weight, torch.lerp(expected[0], sources[0], 0.1))


def test_pairs_the_kernels_do_not_take_use_sb3_arithmetic():
    """Complex tensors and a target laid out unlike its parameter: SB3's own two operations."""
    p = torch.randn(4, 4, dtype=torch.complex64)
    t = torch.randn(4, 4, dtype=torch.complex64)
    w = torch.randn(4, 4)
    wt = torch.randn(4, 4).t()                       # another layout: torch pairs by index
    expected = [t * (1 - 0.25) + 0.25 * p, wt * (1 - 0.25) + 0.25 * w]
    polyak_update([p, w], [t, wt], 0.25)
    for got, e in zip([torch.view_as_real(t), wt], [torch.view_as_real(expected[0]), expected[1]]):
        assert torch.all((got - e).abs() <= 4 * EPS32 * (e.abs() + 1)), (got - e).abs().max()


# ------------------------------------------------------------------------ polyak_update: refusals

def test_length_mismatch_is_sb3s_zip_error_and_changes_nothing():
    online, target = _pair()
    before = [t.clone() for t in target.parameters()]
    with pytest.raises(ValueError, match=re.escape("zip() argument 2 is shorter than argument 1")) as ours:
        polyak_update(online.parameters(), list(target.parameters())[:-1], 0.5)
    assert "same order" in str(ours.value)
    with pytest.raises(ValueError, match=re.escape("zip() argument 2 is longer than argument 1")):
        polyak_update(list(online.parameters())[:-1], target.parameters(), 0.5)
    for t, b in zip(target.parameters(), before):
        assert torch.equal(t, b)
    utils = pytest.importorskip("stable_baselines3.common.utils")
    with pytest.raises(ValueError, match=re.escape("zip() argument 2 is shorter than argument 1")):
        utils.polyak_update(online.parameters(), list(target.parameters())[:-1], 0.5)
    assert not torch.equal(next(target.parameters()), before[0])   # SB3 had updated the leading pairs


@pytest.mark.parametrize("tau, error, match", [(1.5, ValueError, r"tau must be in \[0, 1\]"),
                                               (float("nan"), ValueError, r"tau must be in \[0, 1\]"),
                                               (True, TypeError, "tau must be a Python float"),
                                               (torch.tensor(0.1), TypeError, "tau must be a Python float")])
def test_bad_tau_is_refused_and_changes_nothing(tau, error, match):
    online, target = _pair()
    before = [t.clone() for t in target.parameters()]
    with pytest.raises(error, match=match):
        polyak_update(online.parameters(), target.parameters(), tau)
    assert all(torch.equal(t, b) for t, b in zip(target.parameters(), before))


def test_integer_targets_shape_and_device_mismatches_are_refused_before_anything_is_written():
    online, target = _pair()
    before = [t.clone() for t in target.parameters()]
    cases = [([torch.zeros(3, dtype=torch.long)], TypeError, "num_batches_tracked"),
             ([torch.zeros(3, device="meta")], ValueError, "move the target network"),
             ([torch.zeros(4)], ValueError, "same order")]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            polyak_update(list(online.parameters()) + [torch.ones(3)], list(target.parameters()) + extra, 0.5)
        assert all(torch.equal(t, b) for t, b in zip(target.parameters(), before))


# reliability round 4, L2: a non-tensor in the lists (None, a NumPy array) gave Python's own AttributeError
# ('NoneType' object has no attribute 'dtype'); now a TypeError names the position and what is expected
@pytest.mark.parametrize("where", ["params", "target_params"])
@pytest.mark.parametrize("other", [None, np.ones(3, np.float32), [1.0, 2.0, 3.0]])
def test_a_non_tensor_in_the_lists_is_refused_by_position_and_changes_nothing(where, other):
    online, target = _pair()
    before = [t.clone() for t in target.parameters()]
    params, target_params = list(online.parameters()), list(target.parameters())
    (params if where == "params" else target_params)[1] = other
    with pytest.raises(TypeError, match=rf"^{where}\[1\] is a {type(other).__name__}, not a torch.Tensor.*"
                                        rf"Nothing was written"):
        polyak_update(params, target_params, 0.5)
    assert all(torch.equal(t, b) for t, b in zip(target.parameters(), before))
    with pytest.raises(TypeError, match=r"^target_params\[0\] is a ndarray"):
        polyak_update([np.ones(3, np.float32)], [np.zeros(3, np.float32)], 0.5)


# ------------------------------------------------------------------------ SB3: a real SAC learner

def test_sb3_sac_with_fastemas_polyak_update_matches_sb3s_own(monkeypatch, one_thread):
    """The same SAC learner on Pendulum-v1 from the same seeds, once with SB3's ``polyak_update``
    and once with fastema's patched where ``stable_baselines3.sac.sac`` imported it: every call
    agrees with SB3's on the same tensors to float32 rounding, and the target networks of the
    two runs agree to float32 rounding accumulated over the run."""
    pytest.importorskip("gymnasium")
    sac_module = pytest.importorskip("stable_baselines3.sac.sac")
    from stable_baselines3.common.utils import polyak_update as sb3_polyak_update

    calls = []

    def checked(params, target_params, tau):
        params, target_params = list(params), list(target_params)
        old = [t.detach().clone() for t in target_params]
        expected = [t.clone() for t in old]
        sb3_polyak_update(params, expected, tau)     # SB3 on copies of the same targets
        polyak_update(params, target_params, tau)
        for t, e, o, p in zip(target_params, expected, old, params):
            if tau == 1.0:
                assert torch.equal(t, e)
            else:
                _within_float32_rounding(t, e, o, p)
        calls.append(tau)

    def learn():
        model = sac_module.SAC("MlpPolicy", "Pendulum-v1", policy_kwargs={"net_arch": [8, 8]}, learning_starts=20,
                               batch_size=16, buffer_size=200, tau=0.05, seed=0, device="cpu")
        initial = copy.deepcopy(model.critic_target.state_dict())
        model.learn(100)
        return model, initial

    theirs, initial = learn()
    monkeypatch.setattr(sac_module, "polyak_update", checked)
    ours, _ = learn()
    assert calls.count(0.05) == ours._n_updates == theirs._n_updates == 80 and calls.count(1.0) == 80
    mine, sb3 = ours.critic_target.state_dict(), theirs.critic_target.state_dict()
    assert list(mine) == list(sb3)
    for name in mine:
        assert not torch.equal(mine[name], initial[name]), name        # the targets moved
        # the runs diverge by rounding only: the update's own, fed back through the losses
        assert (mine[name] - sb3[name]).abs().max() <= 1e-5, name


# ------------------------------------------------------------------------ TorchRL

def _ddpg(seed=0):
    from torchrl.modules import MLP, Actor, ValueOperator
    from torchrl.objectives import DDPGLoss

    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP(in_features=4, out_features=1, num_cells=[16, 16])

        def forward(self, observation, action):
            return self.net(torch.cat([observation, action], -1))

    torch.manual_seed(seed)
    actor = Actor(MLP(in_features=3, out_features=1, num_cells=[16, 16]), in_keys=["observation"])
    value = ValueOperator(Critic(), in_keys=["observation", "action"])
    loss = DDPGLoss(actor, value, delay_actor=True, delay_value=True)
    return loss, torch.optim.Adam(loss.parameters(), lr=1e-2)


def _batch(g, n=32):
    from tensordict import TensorDict

    done = torch.zeros(n, 1, dtype=torch.bool)
    return TensorDict({"observation": torch.randn(n, 3, generator=g), "action": torch.randn(n, 1, generator=g),
                       ("next", "observation"): torch.randn(n, 3, generator=g),
                       ("next", "reward"): torch.randn(n, 1, generator=g), ("next", "done"): done,
                       ("next", "terminated"): done}, [n])


def _targets(loss):
    return [t.clone() for name in ("target_actor_network_params", "target_value_network_params")
            for t in getattr(loss, name).values(True, True)]


def _train(make_updater, steps):
    loss, opt = _ddpg()
    updater = make_updater(loss)
    initial = _targets(loss)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        out = loss(_batch(g))
        (out["loss_actor"] + out["loss_value"]).backward()
        opt.step()
        opt.zero_grad()
        updater.step()
    return updater, _targets(loss), initial


@pytest.mark.parametrize("kwargs", [{"eps": 0.9}, {"tau": 0.05}, {"eps": torch.tensor(0.9, dtype=torch.float64)},
                                    {"eps": torch.tensor(0.9)}])
def test_torchrl_soft_update_equals_torchrls_bit_for_bit_over_ddpg_training(kwargs, one_thread):
    # (a float64 0-d tensor eps, which TorchRL takes, reached the kernels as a float64 weight: refused)
    objectives = pytest.importorskip("torchrl.objectives")
    from fastema.torch.compat import SoftUpdate

    theirs, expected, initial = _train(lambda loss: objectives.SoftUpdate(loss, **kwargs), 12)
    ours, got, _ = _train(lambda loss: SoftUpdate(loss, **kwargs), 12)
    assert isinstance(ours, objectives.SoftUpdate) and isinstance(ours, objectives.utils.TargetNetUpdater)
    assert ours.eps == theirs.eps
    mine, their = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == their.keys()
    assert all(torch.equal(torch.as_tensor(mine[k]), torch.as_tensor(their[k])) for k in mine)
    assert len(got) == len(expected) == 12
    for g, e, i in zip(got, expected, initial):
        assert torch.equal(g, e) and not torch.equal(g, i)


def test_torchrl_soft_update_equals_torchrls_on_sac_ensemble_targets(one_thread):
    """SACLoss stacks its two Q networks' parameters (leading dimension 2) in one TensorDictParams."""
    objectives = pytest.importorskip("torchrl.objectives")
    from tensordict.nn import NormalParamExtractor, TensorDictModule
    from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator

    from fastema.torch.compat import SoftUpdate

    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP(in_features=4, out_features=1, num_cells=[16])

        def forward(self, observation, action):
            return self.net(torch.cat([observation, action], -1))

    results = []
    for make in (objectives.SoftUpdate, SoftUpdate):
        torch.manual_seed(0)
        net = nn.Sequential(MLP(in_features=3, out_features=2, num_cells=[16]), NormalParamExtractor())
        actor = ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
                                   in_keys=["loc", "scale"], distribution_class=TanhNormal)
        loss = objectives.SACLoss(actor, ValueOperator(Critic(), in_keys=["observation", "action"]),
                                  num_qvalue_nets=2, target_entropy=-1.0)
        opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
        updater = make(loss, tau=0.1)
        initial = [t.clone() for t in loss.target_qvalue_network_params.values(True, True)]
        torch.manual_seed(5)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            out = loss(_batch(g, 16))
            sum(v for k, v in out.items() if k.startswith("loss_")).backward()
            opt.step()
            opt.zero_grad()
            updater.step()
        results.append([t.clone() for t in loss.target_qvalue_network_params.values(True, True)])
    assert [t.shape[0] for t in results[1]] == [2, 2, 2, 2]
    for got, expected, i in zip(results[1], results[0], initial):
        assert torch.equal(got, expected) and not torch.equal(got, i)


def test_torchrl_hard_update_copies_every_interval_as_torchrls(one_thread):
    objectives = pytest.importorskip("torchrl.objectives")
    from fastema.torch.compat import HardUpdate

    for steps in (3, 4, 9):                          # before, at and after copies (interval 3: copies at calls 4, 8)
        theirs, expected, initial = _train(lambda loss: objectives.HardUpdate(loss, value_network_update_interval=3),
                                           steps)
        ours, got, _ = _train(lambda loss: HardUpdate(loss, value_network_update_interval=3), steps)
        assert isinstance(ours, objectives.HardUpdate) and ours.state_dict() == theirs.state_dict()
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        assert all(torch.equal(g, i) for g, i in zip(got, initial)) == (steps < 4)


def test_torchrl_updater_keeps_torchrls_checks():
    objectives = pytest.importorskip("torchrl.objectives")
    from fastema.torch.compat import SoftUpdate

    loss, _ = _ddpg()
    with pytest.raises(ValueError, match="One and only one"):
        SoftUpdate(loss, eps=0.9, tau=0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        SoftUpdate(loss, eps=1.5)
    updater = SoftUpdate(loss, tau=0.1)
    updater.initialized = False
    with pytest.raises(Exception, match=r"must be initialized"):
        updater.step()
    assert isinstance(updater, objectives.SoftUpdate)


def test_importing_fastema_torch_compat_imports_neither_sb3_nor_torchrl():
    code = ("import sys, fastema.torch.compat as c; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'stable_baselines3', 'torchrl', 'tensordict'}));"
            "c.polyak_update; print(sorted({m.split('.')[0] for m in sys.modules} & {'stable_baselines3', 'torchrl'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["[]", "[]"], out.stdout + out.stderr[-2000:]


# ------------------------------------------------------------------------ the guide

def test_the_migrating_guide_rl_example_runs(capsys, one_thread):
    pytest.importorskip("stable_baselines3")
    pytest.importorskip("torchrl")
    text = (ROOT / "docs" / "guides" / "migrating.md").read_text()
    block = re.search(r"## Stable-Baselines3 and TorchRL target networks.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "guides/migrating.md", "exec"), {})
    out = capsys.readouterr().out
    numbers = [float(x) for x in re.findall(r"gap (\d+\.\d+(?:e-?\d+)?)", out)]
    assert len(numbers) == 2 and numbers[1] < numbers[0], out       # the target followed the critic
    assert "TorchRL SoftUpdate: True" in out, out
    np.testing.assert_array_less(numbers, 10.0)


def test_polyak_update_of_a_target_torch_refuses_to_write_is_refused_at_every_call():
    # an inference tensor target (made under torch.inference_mode()): the first call was refused (lerp_'s
    # rule), but its checked layout was kept, and the next identical calls took it and wrote the target
    from fastema.torch.compat import polyak_update

    with torch.inference_mode():
        target = torch.zeros(5)
    param = torch.ones(5)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="inference tensor"):
            polyak_update([param], [target], 0.5)
        assert torch.equal(target, torch.zeros(5))


def test_polyak_update_refusals_name_sb3s_arguments_at_the_callers_positions():
    # they named fastema's own lists (shadows[i] / sources[i]), at positions among the pairs the
    # kernels take: a complex pair first made the aliased pair 1 "shadows[0]"
    c, a, b = torch.zeros(2, dtype=torch.complex64), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"^target_params\[1\] and params\[1\] share memory"):
        polyak_update([c, a], [c.clone(), a], 0.5)
    with pytest.raises(ValueError, match=r"^target_params\[2\] is target_params\[1\] again but with another "
                                         r"source \(params\[2\] is not params\[1\]\)"):
        polyak_update([c, b, b.clone()], [c.clone(), a, a], 0.5)
    assert torch.equal(a, torch.zeros(3))
    with torch.inference_mode():                   # taken in inference mode, then refused by the hit's recheck
        target = torch.zeros(3)
        polyak_update([b, b.clone()], [b.clone(), target], 0.5)
    with pytest.raises(RuntimeError, match=r"^target_params\[1\] is an inference tensor"):
        polyak_update([b, b.clone()], [b.clone(), target], 0.5)
