"""Where ema-pytorch 0.8.3 asserts, ``fastema.torch.compat``'s ema-pytorch classes raise an
``AssertionError`` too (reliability C1): the same inputs, side by side with ema_pytorch itself,
raise ``AssertionError`` in both, so code that catches ema-pytorch's keeps catching ours. Ours is
also the ``ValueError`` / ``TypeError`` / ``RuntimeError`` fastema raises for the same refusal,
and says the fix."""
import copy

import pytest
import torch
from torch import nn

from fastema.torch import compat
from fastema.torch.compat import ema_pytorch as ours_module

ema_pytorch = pytest.importorskip("ema_pytorch")


class Block(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.net = nn.Linear(dim, dim)

    def forward(self, x, ema_output=None):
        return self.net(x)


class Net(nn.Module):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.a, self.b = Block(), Block()
        self.plain = nn.Linear(4, 4)              # its forward takes no ema_output

    def forward(self, x):
        return self.b(self.a(x))


def _both_assert(call, ours_too=ValueError, match=None):
    """``call(library)`` raises AssertionError with ema_pytorch and with fastema's compat; ours is
    also ``ours_too`` and says ``match``. Returns our error."""
    with pytest.raises(AssertionError):
        call(ema_pytorch)
    with pytest.raises(AssertionError, match=match) as err:
        call(compat)
    assert isinstance(err.value, ours_too)
    return err.value


def _wrapper(lib, **kw):
    return lib.EMAModuleWrapper(Net(), ema_module_kwargs={"a": "b"}, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(only_online=True, only_ema=True), "only_online=True and only_ema=True together"),
    (dict(only_online=True, ema_args=(torch.ones(2, 4),)), "ema_args / ema_kwargs .* drop them"),
    (dict(only_ema=True, ema_args=torch.ones(2, 4)), "ema_args / ema_kwargs .* drop them"),
    (dict(only_online=True, ema_kwargs={}), "ema_args / ema_kwargs .* drop them"),
    (dict(only_ema=True, ema_kwargs={"x": torch.ones(2, 4)}), "ema_args / ema_kwargs .* drop them"),
])
@pytest.mark.parametrize("through", ["forward", "forward_online"])
def test_forward_online_asserts_as_ema_pytorch(kw, match, through):
    """reliability C1: ``forward_online`` raised a plain ValueError where ema-pytorch asserts."""
    x = torch.ones(2, 4)

    def call(lib):
        wrapper = _wrapper(lib)
        return getattr(wrapper, through)(x, **kw)

    err = _both_assert(call, ValueError, match)
    assert isinstance(err, ours_module.AssertionValueError)


def test_every_other_ema_pytorch_assert_is_an_assertion_error_here_too(tmp_path):
    net = Net()
    x = torch.ones(2, 4)
    cases = [
        # EMA: a lazy EMA given its copy; names_no_ema neither a set nor a list; not an optimizer
        (lambda lib: lib.EMA(net, ema_model=copy.deepcopy(net), lazy_init_ema=True), ValueError,
         "lazy_init_ema=True .* pass no ema_model="),
        (lambda lib: lib.EMA(net, param_or_buffer_names_no_ema="a.net.weight"), TypeError,
         "must be a set or a list of names, got str"),
        (lambda lib: lib.EMA(net).add_to_optimizer_post_step_hook(object()), TypeError,
         "takes a torch.optim.Optimizer"),
        # KarrasEMA: exactly one of sigma_rel= and gamma=
        (lambda lib: lib.KarrasEMA(net), ValueError, "exactly one of sigma_rel= and gamma="),
        (lambda lib: lib.KarrasEMA(net, sigma_rel=0.05, gamma=6.9), ValueError, "exactly one of sigma_rel="),
        # PostHocEMA: exactly one of sigma_rels= / gammas=, at least two, all different
        (lambda lib: lib.PostHocEMA(net, checkpoint_folder=str(tmp_path / "a")), ValueError,
         "exactly one of sigma_rels= and gammas="),
        (lambda lib: lib.PostHocEMA(net, sigma_rels=(0.05,), gammas=(6.9,), checkpoint_folder=str(tmp_path / "b")),
         ValueError, "exactly one of sigma_rels="),
        (lambda lib: lib.PostHocEMA(net, gammas=(6.9,), checkpoint_folder=str(tmp_path / "c")), ValueError,
         "at least 2 profiles"),
        (lambda lib: lib.PostHocEMA(net, gammas=(6.9, 6.9), checkpoint_folder=str(tmp_path / "d")), ValueError,
         "must differ"),
        # EMAModuleWrapper: routes of another form; a receiver without the keyword; a lazy routed forward
        (lambda lib: lib.EMAModuleWrapper(net, ema_module_kwargs=5), TypeError, "ema_module_kwargs must be a dict"),
        (lambda lib: lib.EMAModuleWrapper(net, ema_module_kwargs={"plain": "b"}), ValueError,
         "no forward keyword argument 'ema_output'"),
        (lambda lib: lib.EMAModuleWrapper(Net(), ema_module_kwargs={"a": "b"}, lazy_init_ema=True)(x),
         RuntimeError, "not made yet .*call update\\(\\) once first"),
    ]
    for call, ours_too, match in cases:
        _both_assert(call, ours_too, match)


def test_synthesis_asserts_as_ema_pytorch(tmp_path):
    """``synthesize_ema_model``: exactly one of gamma= / sigma_rel=, a step within the checkpoints."""
    made = {}
    for lib in (ema_pytorch, compat):
        folder = tmp_path / lib.__name__
        ph = lib.PostHocEMA(Net(), sigma_rels=(0.05, 0.28), update_every=1, checkpoint_every_num_steps=2,
                            checkpoint_folder=str(folder))
        for _ in range(4):
            ph.update()
        made[lib] = ph
    _both_assert(lambda lib: made[lib].synthesize_ema_model(), ValueError, "exactly one of gamma= and sigma_rel=")
    _both_assert(lambda lib: made[lib].synthesize_ema_model(gamma=5.0, sigma_rel=0.1), ValueError,
                 "exactly one of gamma=")
    _both_assert(lambda lib: made[lib].synthesize_ema_model(sigma_rel=0.1, step=5), ValueError,
                 "less than the max timestep 4")


def test_the_errors_are_catchable_either_way_and_pickle():
    import pickle

    for cls, other in ((ours_module.AssertionValueError, ValueError), (ours_module.AssertionTypeError, TypeError),
                       (ours_module.AssertionRuntimeError, RuntimeError)):
        assert issubclass(cls, AssertionError) and issubclass(cls, other)
        assert cls.__module__ == "fastema.torch.compat.ema_pytorch"
        back = pickle.loads(pickle.dumps(cls("why")))
        assert type(back) is cls and str(back) == "why"
    wrapper = _wrapper(compat)
    for caught in (AssertionError, ValueError):
        try:
            wrapper(torch.ones(2, 4), only_online=True, only_ema=True)
        except caught:
            pass
