"""fastema.torchtitan.EMA's update against torchtitan main's EMA (``titan_upstream.MainEMA``, its firing
rule and per-copy ``_foreach_lerp_`` passes on torchtitan 0.3.0's pieces): every config field set, a
20-step run, within one ulp; the config's refusals; the device-side step (a captured graph's) equal to
the host's; and on the fake GPU the device step's launches with no host sync."""
import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

from titan_upstream import MainEMA  # noqa: E402

from fastema.torchtitan import EMA, ema_key, parse_ema_key  # noqa: E402

FIELDS = dict(decays=[0.9, 0.75], half_life_fractions=[0.05, 0.5], start_step=3, step_bias=2,
              update_every_n_steps=2, buffer_patterns=[r"running_mean$"])


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 6).to(dtype)
        self.norm = nn.LayerNorm(6).to(dtype)
        self.frozen = nn.Linear(6, 2).to(dtype).requires_grad_(False)
        self.register_buffer("running_mean", torch.zeros(6, dtype=dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def _train_step(models, step):
    """The same deterministic change of every trainable tensor and the matched buffer of each model."""
    with torch.no_grad():
        for m in models:
            trainable = [p for p in m.parameters() if p.requires_grad]
            for i, p in enumerate(trainable):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 31 + i)).to(p.dtype))
            m.running_mean.add_(torch.rand(6, generator=torch.Generator().manual_seed(step)).to(m.running_mean.dtype))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units of the last place between ``a`` and ``b`` (same float dtype)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    ia = torch.where(ia < 0, -(ia & (2 ** (8 * a.element_size() - 1) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & (2 ** (8 * a.element_size() - 1) - 1)), ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("dtype, offload", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_twenty_steps_with_every_field_set_match_mains_rule_within_one_ulp(dtype, offload):
    """Every field set (offload_to_cpu too: fastema's offloaded shadow, host memory, the fold on a thread)."""
    ours_model, main_model = Net(dtype), Net(dtype)
    ema = EMA.Config(**FIELDS, offload_to_cpu=offload).build(model_parts=[ours_model])
    main = MainEMA([main_model], **FIELDS)
    assert ema.keys == main.keys == ["decay_0p9", "decay_0p75", "half_life_0p05", "half_life_0p5"]
    fired = 0
    for step in range(1, 21):
        _train_step([ours_model, main_model], step)
        before = ema.shadow.view("proj.weight", 2).clone()
        ema.step(step)
        main.step(step)
        fired += not torch.equal(before, ema.shadow.view("proj.weight", 2))
        for row, key in enumerate(ema.keys):
            ref = main.copy(key)
            for t in ema.tracked:
                assert _ulps(ema.shadow.view(t.fqn, row), ref[t.fqn]) <= 1, (step, key, t.fqn)
    assert fired == 8                     # steps 5, 7, ..., 19: (step - 3) % 2 == 0 and step > 3
    assert {t.fqn for t in ema.tracked} == {"proj.weight", "proj.bias", "norm.weight", "norm.bias", "running_mean"}


def test_the_decays_are_mains_at_every_firing():
    ema = EMA.Config(**FIELDS).build(model_parts=[Net()])
    for n in (1, 2, 7, 1000):
        expected = [0.9, 0.75, 2.0 ** (-1.0 / (0.05 * n)), 2.0 ** (-1.0 / (0.5 * n))]
        assert ema.decays_at(n) == expected


def test_a_float32_average_of_bfloat16_weights_keeps_moving_where_mains_copy_freezes():
    """Main keeps a bfloat16 copy of a bfloat16 parameter: near the weights, (1 - decay) times the gap
    rounds away. shadow_dtype="float32" (fastema's opt-in) keeps moving, as float64 arithmetic does."""
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(False)
    ours, theirs = copy.deepcopy(base).requires_grad_(True), copy.deepcopy(base).requires_grad_(True)
    ema = EMA.Config(decays=[0.999], shadow_dtype="float32").build(model_parts=[ours])
    main = MainEMA([theirs], decays=[0.999])
    ref = base.weight.double().clone()
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.add_(torch.full_like(m.weight, 2.0 ** -4))
        for step in range(1, 6):
            ema.step(step)
            main.step(step)
            ref.lerp_(ours.weight.double(), 1 - 0.999)
    main_still = (main.copy("decay_0p999")["weight"] == base.weight).float().mean()
    ours_still = (ema.shadow.view("weight", 0) == base.weight.float()).float().mean()
    assert float(main_still) > 0.7 and float(ours_still) == 0.0     # 74% of main's never moved
    torch.testing.assert_close(ema.shadow.view("weight", 0).double(), ref, rtol=1e-6, atol=1e-7)


def test_the_device_step_fires_as_the_host_step_bit_for_bit():
    """``step(tensor)``: the rule worked out with torch operations (what a captured graph replays)."""
    a, b = Net(), Net()
    host = EMA.Config(**FIELDS).build(model_parts=[a])
    dev = EMA.Config(**FIELDS).build(model_parts=[b])
    counter = torch.zeros((), dtype=torch.int64)
    for step in range(1, 16):
        _train_step([a, b], step)
        counter += 1
        host.step(step)
        dev.step(counter)
        for row in range(len(host.keys)):
            for t in host.tracked:
                assert torch.equal(host.shadow.view(t.fqn, row), dev.shadow.view(t.fqn, row)), (step, row, t.fqn)


def test_keys_are_mains_and_parse_back():
    assert ema_key("decay_", 0.999) == "decay_0p999"
    assert ema_key("half_life_", 1e-05) == "half_life_1em05"
    assert ema_key("decay_", 0) == "decay_0p0"
    for key, parsed in (("decay_0p999", (True, 0.999)), ("half_life_0p05", (False, 0.05)),
                        ("half_life_1em05", (False, 1e-05))):
        assert parse_ema_key(key) == parsed
    for bad in ("ema_0p9", "decay_xyz", 3):
        with pytest.raises(ValueError, match="neither decay_<value> nor half_life_<value>"):
            parse_ema_key(bad)


@pytest.mark.parametrize("fields, match", [
    (dict(), "both empty"),
    (dict(decays=[1.0]), r"decays entry 1.0 must be finite and in \[0, 1\)"),
    (dict(decays=[math.nan]), "decays entry nan"),
    (dict(half_life_fractions=[0.0]), "half_life_fractions entry 0.0 must be finite and greater than 0"),
    (dict(decays=[0.9, 0.9]), r"duplicate copies \['decay_0p9'\]"),
    (dict(decays=[0.9], update_every_n_steps=0), "update_every_n_steps must be an int >= 1, got 0"),
    (dict(decays=[0.9], step_bias=-1), "step_bias must be an int >= 0, got -1"),
    (dict(decays=[0.9], start_step=1.5), "start_step must be an int, got 1.5"),
    (dict(decays=[0.9], buffer_patterns=["("]), "buffer_patterns entry '\\(' is not a regular expression"),
    (dict(decays=[0.9], shadow_dtype="bfloat16"), "shadow_dtype must be one of"),
    (dict(decays=[0.1 * i for i in range(1, 10)]), "asks for 9 copies; fastema keeps at most 8"),
])
def test_a_bad_config_is_refused_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        EMA.Config(**fields)


def test_what_build_and_step_refuse():
    m = Net()
    with pytest.raises(ValueError, match=r"step\(tensor\) .* does not go with EMA.Config.offload_to_cpu=True"):
        EMA.Config(decays=[0.9], offload_to_cpu=True).build(model_parts=[m]).step(torch.ones((), dtype=torch.int64))
    with pytest.raises(ValueError, match="matched buffer 'count' of dtype torch.int64"):
        EMA.Config(decays=[0.9], buffer_patterns=["count"]).build(model_parts=[m])
    with pytest.raises(ValueError, match=r"share the names \['norm.bias'"):
        EMA.Config(decays=[0.9]).build(model_parts=[m, m])
    with pytest.raises(ValueError, match="layouts= names"):
        EMA.Config(decays=[0.9]).build(model_parts=[m], layouts={"nope": (None, ())})
    ema = EMA.Config(decays=[0.9]).build(model_parts=[m])
    for bad in (1.0, True, "3"):
        with pytest.raises(TypeError, match="current_step must be an int"):
            ema.step(bad)
    with pytest.raises(TypeError, match="one-element int64 tensor"):
        ema.step(torch.zeros(2, dtype=torch.int64))
    before = ema.shadow.view("proj.weight", 0).clone()
    ema.step(0)                                        # elapsed 0: no firing
    assert torch.equal(before, ema.shadow.view("proj.weight", 0))


def test_the_device_step_on_the_fake_gpu_launches_once_a_call_with_no_host_sync():
    """Structurally what a captured optimizer step holds: the rule's torch operations and one launch per
    group reading the weights and the skip flag from device memory, no host wait. (The kernels run only
    on a real GPU; a lent GPU's check: the graph captured and replayed, docs/guides/torchtitan.md.)"""
    pytest.importorskip("numba.cuda.dispatcher")
    from testkit.fake_gpu import fake_gpu

    with fake_gpu() as fake:
        m = Net()
        ema = EMA.Config(**FIELDS).build(model_parts=[m])
        assert {g["device"] for g in ema.shadow.groups} == {"cuda:0"}
        counter = torch.zeros((), dtype=torch.int64)
        ema.step(counter)                              # the warm-up call makes the rule's buffers
        before, counts = len(fake.launches), dict(fake.counters)
        for _ in range(3):
            counter += 1
            ema.step(counter)
        launched = [e for e in fake.launches[before:] if e[0] == "launch"]
        assert len(launched) == 3 * len(ema.shadow.groups)
        assert fake.counters["host_syncs"] == counts.get("host_syncs", 0)
        assert fake.counters["device_allocs"] == counts.get("device_allocs", 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="hardware: a CUDA graph captured and replayed")
def test_the_step_inside_a_captured_optimizer_step_replays_mains_rule():
    """The update inside the captured step (torchtitan main's ``Optim(enable_cuda_graph=True)``): the
    parameters' change, the device counter and ``ema.step(counter)`` captured once and replayed; the copies
    then match an eager run stepped with the host's steps (the half-life rows' ``2 ** x`` on the device
    within one ulp)."""
    model = Net().cuda()
    eager = copy.deepcopy(model)
    ema = EMA.Config(**FIELDS).build(model_parts=[model])
    ref = EMA.Config(**FIELDS).build(model_parts=[eager])
    params = [p for p in model.parameters() if p.requires_grad]
    deltas = [torch.randn_like(p) * 0.1 for p in params]
    counter = torch.zeros((), dtype=torch.int64, device="cuda")

    def body():
        with torch.no_grad():
            torch._foreach_add_(params, deltas)
        counter.add_(1)
        ema.step(counter)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):                             # torchtitan's warm-up iterations, eager
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(12):
        graph.replay()
    eager_params = [p for p in eager.parameters() if p.requires_grad]
    for step in range(1, 16):
        with torch.no_grad():
            torch._foreach_add_(eager_params, deltas)
        ref.step(step)
    torch.cuda.synchronize()
    for row in range(len(ema.keys)):
        for t in ema.tracked:
            assert _ulps(ema.shadow.view(t.fqn, row).cpu(), ref.shadow.view(t.fqn, row).cpu()) <= 1, (row, t.fqn)
