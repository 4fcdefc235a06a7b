"""``attach()`` never silently loses the average on an optimizer that bypasses torch's state-dict
hooks (issue 79 item 1): a ``torch.optim.Optimizer`` subclass whose ``state_dict()`` /
``load_state_dict()`` make their own form without running the base's (torchtitan's
``OptimizersContainer``: DCP's getter of each optimizer it holds, flat and FQN-keyed) never runs
the hooks ``attach()`` registers. On the base it attached, saved checkpoints without the average
and started it over at resume without a word; now it is refused at ``attach()`` by name, with what
to use instead (``fastema.torchtitan.EMA`` for torchtitan), and nothing is attached. An override
that calls the base's (``super().state_dict()``, torch's ``ZeroRedundancyOptimizer``) still
attaches and carries the average."""
import functools

import pytest
import torch
from support.attach import averaged, same, save_load
from torch import nn

from fastema.torch import ATTACH_KEY, EMA
from fastema.torch._state.attach_checks import bypasses

sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")


class Container(torch.optim.Optimizer):
    """torchtitan's ``OptimizersContainer`` as its source has it (``components/optimizer.py``):
    one optimizer per model part, ``Optimizer.__init__`` run for its hooks, ``step`` stepping
    each, and its own flat, FQN-keyed state dicts through DCP's getter and setter."""

    def __init__(self, model_parts, optimizer_cls, optimizer_kwargs):
        all_params = []
        self.optimizers, self.model_parts = [], model_parts
        for model in model_parts:
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizers.append(optimizer_cls(params, **optimizer_kwargs))
            all_params.extend(params)
        torch.optim.Optimizer.__init__(self, all_params, optimizer_kwargs)

    def step(self, *args, **kwargs):
        for optimizer in self.optimizers:
            optimizer.step(*args, **kwargs)

    def zero_grad(self, *args, **kwargs):
        for optimizer in self.optimizers:
            optimizer.zero_grad(*args, **kwargs)

    def state_dict(self):
        func = functools.partial(sd.get_optimizer_state_dict,
                                 options=sd.StateDictOptions(flatten_optimizer_state_dict=True))
        return {k: v for d in map(func, self.model_parts, self.optimizers) for k, v in d.items()}

    def load_state_dict(self, state_dict):
        func = functools.partial(sd.set_optimizer_state_dict, optim_state_dict=state_dict,
                                 options=sd.StateDictOptions(flatten_optimizer_state_dict=True))
        list(map(func, self.model_parts, self.optimizers))


class Cached(Container):
    """torchtitan's ``FTOptimizersContainer``: ``load_state_dict`` calls ``super()``'s, which is
    the container's own (no hooks run either way)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)


class Extended(torch.optim.AdamW):
    """A subclass that adds an entry and calls the base's: the hooks run."""

    def state_dict(self):
        out = super().state_dict()
        out["mine"] = 1
        return out

    def load_state_dict(self, state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k != "mine"}
        torch.optim.Optimizer.load_state_dict(self, state_dict)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("cls", [Container, Cached])
def test_an_optimizer_whose_state_dicts_bypass_torchs_is_refused_by_name(cls):
    model = _net()
    opt = cls([model], torch.optim.AdamW, {"lr": 1e-2})
    hooks = (len(opt._optimizer_step_post_hooks), len(opt._optimizer_state_dict_post_hooks))
    ema = EMA(model, 0.9)
    with pytest.raises(TypeError, match=rf"attach\(\) does not take this {cls.__name__}: its "
                                        r"state_dict\(\).*load_state_dict\(\).*would never run.*"
                                        r"Nothing was attached.*fastema\.torchtitan\.EMA"):
        ema.attach(opt)
    assert ema.attached is None
    assert (len(opt._optimizer_step_post_hooks),
            len(opt._optimizer_state_dict_post_hooks)) == hooks
    assert bypasses(cls) == {"state_dict": cls, "load_state_dict": Container}
    ema.update()                                   # by hand, as the refusal says: still works
    assert ema.updates == 1


def test_an_override_that_runs_the_bases_carries_the_average():
    model = _net()
    opt = Extended(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.9).attach(opt)
    for _ in range(2):
        model(torch.ones(3, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = save_load(opt.state_dict())
    assert ATTACH_KEY in state and state["mine"] == 1
    model2 = _net(1)
    opt2 = Extended(model2.parameters(), lr=1e-2)
    ema2 = EMA(model2, 0.9).attach(opt2)
    opt2.load_state_dict(state)
    assert ema2.updates == 2 and same(averaged(ema2), averaged(ema))


def test_torchs_own_overrides_reach_the_base():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    optimizers = [c for c in vars(torch.optim).values()
                  if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]
    assert all(bypasses(c) == {} for c in [*optimizers, ZeroRedundancyOptimizer])


def _titan_container(model):
    """torchtitan's ``OptimizersContainer`` built as its Trainer builds it (0.3.0: from
    ``default_adamw``'s config; earlier releases: from the optimizer class and its kwargs)."""
    pytest.importorskip("torchtitan")
    from torchtitan.components import optimizer as titan

    if hasattr(titan, "default_adamw"):
        config = titan.default_adamw(lr=1e-2)
        config.implementation = "for-loop"           # "fused" is CUDA's
        return titan.OptimizersContainer(config, model_parts=[model])
    return titan.OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-2})


def test_torchtitans_container_is_refused_naming_fastema_torchtitan():
    model = _net()
    container = _titan_container(model)
    assert set(bypasses(type(container))) == {"state_dict", "load_state_dict"}
    ema = EMA(model, 0.9)
    with pytest.raises(TypeError, match=r"OptimizersContainer.*would never run.*Nothing was "
                                        r"attached; use fastema\.torchtitan\.EMA"):
        ema.attach(container)
    assert ema.attached is None


class Filtered(torch.optim.AdamW):
    """An override that runs the base's but keeps only ``state`` and ``param_groups`` of it
    (``../shared/design/reliability.md`` N04): the hooks run, and their entry is dropped."""

    def state_dict(self):
        sd = super().state_dict()
        return {"state": sd["state"], "param_groups": sd["param_groups"]}


def _hooks(opt):
    return [len(getattr(opt, f"_optimizer_{k}")) for k in (
        "step_pre_hooks", "step_post_hooks", "state_dict_pre_hooks", "state_dict_post_hooks",
        "load_state_dict_pre_hooks", "load_state_dict_post_hooks")]


def _stepped(opt, model, n=2):
    for _ in range(n):
        model(torch.ones(3, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_an_override_that_drops_the_average_is_refused_by_name_the_optimizer_left_as_it_was():
    """Issue 85 M3: attach() took it; every save dropped the average without a word and the
    resume started it over. Refused at attach() after one state_dict() with a stand-in where the
    average goes: the average's own state_dict() is never read (nothing of it copied), and the
    optimizer keeps its hooks, its state (the very tensors, values and step counts) and groups."""
    from support.calls import watching

    model = _net()
    opt = Filtered(model.parameters(), lr=1e-2)
    _stepped(opt, model)
    state = {p: dict(st) for p, st in opt.state.items()}
    values = {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    groups, hooks = [dict(g) for g in opt.param_groups], _hooks(opt)
    ema = EMA(model, 0.9)
    read = []
    with watching(type(ema).state_dict, on_call=read.append), pytest.raises(
            TypeError, match=r"attach\(\) does not take this Filtered: its state_dict\(\) \(in "
                             r"test_attach_bypass\.Filtered\) runs torch\.optim\.Optimizer's but "
                             r"drops the top-level 'fastema' entry that carries the attached EMA "
                             r"\(it returns keys \['param_groups', 'state'\]\).*would hold no "
                             r"average.*Nothing was attached; return every entry of "
                             r"super\(\)\.state_dict\(\)"):
        ema.attach(opt)
    assert read == [] and ema.attached is None and _hooks(opt) == hooks
    assert opt.param_groups == groups and opt.state.keys() == state.keys()
    for p, st in opt.state.items():
        assert st.keys() == state[p].keys() and all(st[k] is v for k, v in state[p].items())
        assert all(torch.equal(st[k], v) for k, v in values[p].items())
    _stepped(opt, model, 1)                      # the optimizer goes on as it was
    assert all(int(st["step"]) == 3 for st in opt.state.values())


def test_an_override_set_on_the_instance_is_checked_too():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    plain = opt.state_dict
    opt.state_dict = lambda: {k: v for k, v in plain().items() if k != ATTACH_KEY}
    with pytest.raises(TypeError, match=r"its state_dict\(\) \(the instance's\) runs .* drops "
                                        r"the top-level 'fastema' entry"):
        EMA(model, 0.9).attach(opt)
    opt.state_dict = plain                       # the bound method again: no override left
    ema = EMA(model, 0.9).attach(opt)
    _stepped(opt, model)
    assert ema.updates == 2 and ATTACH_KEY in opt.state_dict()


def test_an_override_that_fails_at_attach_is_named_with_its_error():
    class Unready(torch.optim.SGD):
        def state_dict(self):            # ZeroRedundancyOptimizer's shape
            if not getattr(self, "consolidated", False):
                raise RuntimeError("Optimizer state has not been consolidated on this rank")
            return super().state_dict()

    model = _net()
    opt = Unready(model.parameters(), lr=1e-2)
    hooks = _hooks(opt)
    ema = EMA(model, 0.9)
    with pytest.raises(RuntimeError, match=r"attach\(\) calls this Unready's state_dict\(\) .*once.*"
                                           r"raised RuntimeError: Optimizer state has not been "
                                           r"consolidated.*Nothing was attached"):
        ema.attach(opt)
    assert ema.attached is None and _hooks(opt) == hooks
    opt.consolidated = True
    assert ema.attach(opt).attached is not None


def test_torchs_own_override_is_not_called_at_attach():
    """``ZeroRedundancyOptimizer.state_dict()`` raises until a collective
    ``consolidate_state_dict()``: attach() trusts torch's own overrides (they return the dict the
    hooks made) and never calls it; a subclass keeping every entry still attaches and saves."""
    from fastema.torch._state.attach_checks import overrides

    assert overrides(torch.optim.AdamW([torch.zeros(1, requires_grad=True)])) == []
    assert overrides(Extended([torch.zeros(1, requires_grad=True)])) == [Extended]
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class Zero(ZeroRedundancyOptimizer):
        pass

    assert [k for k in Zero.__mro__ if "state_dict" in vars(k)][:1] == [ZeroRedundancyOptimizer]
    assert overrides(object.__new__(Zero)) == []


class Stripped(torch.optim.AdamW):
    """An override that keeps every key but strips fastema's from each parameter's entry."""

    def state_dict(self):
        sd = super().state_dict()
        return {**sd, "state": {k: {kk: vv for kk, vv in v.items() if kk != ATTACH_KEY}
                                for k, v in sd["state"].items()}}


def test_a_sharded_average_is_checked_where_it_rides_the_per_parameter_entries():
    """FSDP2 (one gloo rank, in this process): the average rides the per-parameter entries, which
    ``Filtered`` keeps (attached, carried); ``Stripped`` drops them (refused by name)."""
    import datetime
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                           timeout=datetime.timedelta(seconds=60))
    try:
        model = fully_shard(_net())
        ema = EMA(model, 0.9).attach(Filtered(model.parameters(), lr=1e-2))
        assert ema.sharded
        _stepped(ema.attached, model)
        state = ema.attached.state_dict()["state"]
        assert sum(ATTACH_KEY in v for v in state.values()) == len(state) == 4
        ema.detach()
        with pytest.raises(TypeError, match=r"this Stripped: .* drops the per-parameter 'state' "
                                            r"entries that carry the attached EMA"):
            EMA(model, 0.9).attach(Stripped(model.parameters(), lr=1e-2))
    finally:
        dist.destroy_process_group()
