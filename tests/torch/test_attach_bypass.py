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
