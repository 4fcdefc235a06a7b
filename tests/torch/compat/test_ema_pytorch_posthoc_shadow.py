"""``compat.PostHocEMA``'s profiles on one shadow (issue 86 item 4): where its ``KarrasEMA`` agree,
one ``FlatShadow`` of K rows updated in one pass, each ``ema_models[k]``'s averages views of row
``k`` with storages of their own; bit for bit the K separate ``KarrasEMA`` it stands for, over real
training loops; each profile on its own again where they disagree or one is reached into, and on
one shadow again once they agree."""
import copy
import io

import pytest
import torch
from models import mlp, train_sampled
from torch import nn

from fastema.torch import compat

ema_pytorch = pytest.importorskip("ema_pytorch")

SIGMAS = (0.05, 0.1, 0.2)
AVERAGED = ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
            "3.weight", "3.bias")


def _net():
    return mlp(6, 12, 1, norm=nn.BatchNorm1d)


def _made(tmp_path, every=1, ref_kw=None, **kw):
    """A ``compat.PostHocEMA`` of one net and, of an identical net, the K ``compat.KarrasEMA`` it
    stands for (each profile on its own: ``ref_kw``, else ``kw``)."""
    ours, ref = _net(), _net()
    ph = compat.PostHocEMA(ours, sigma_rels=SIGMAS, update_every=every, checkpoint_every_num_steps="manual",
                           checkpoint_folder=str(tmp_path / "ph"), **kw)
    refs = [compat.KarrasEMA(ref, gamma=g, update_every=every, **(kw if ref_kw is None else ref_kw))
            for g in ph.gammas]
    return ph, refs, ours, ref


def _loop(ph, refs, ours, ref, steps, seed=1):
    train_sampled([ours, ref], steps, lambda i: (ph.update(), [r.update() for r in refs]),
                  optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), seed=seed)


def _same(ph, refs):
    for e, r in zip(ph.ema_models, refs):
        a, b = e.state_dict(), r.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _one_shadow(ph, averaged=AVERAGED) -> bool:
    """Whether the profiles are rows of one shadow now: the decision's kind, and each averaged
    tensor's K averages K rows of one buffer (equal steps apart), each with a storage of its own."""
    shared = type(ph._shared).__name__ == "Shared"
    if shared:
        for name in averaged:
            ts = [e.ema_model.get_parameter(name) if "running" not in name else e.ema_model.get_buffer(name)
                  for e in ph.ema_models]
            gap = ts[1].data_ptr() - ts[0].data_ptr()
            assert gap and all(t.data_ptr() - ts[0].data_ptr() == k * gap for k, t in enumerate(ts)), name
            assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in ts), name
    return shared


@pytest.mark.parametrize("every, kw", [
    (1, {}),
    (3, dict(param_or_buffer_names_no_ema={"1.running_mean"}, ignore_names={"3.bias"})),
])
def test_agreeing_profiles_are_rows_of_one_shadow_bit_for_bit(tmp_path, every, kw):
    ph, refs, ours, ref = _made(tmp_path, every, **kw)
    _loop(ph, refs, ours, ref, 31)
    assert _one_shadow(ph, [n for n in AVERAGED if n not in ("1.running_mean", "3.bias") or not kw])
    _same(ph, refs)
    assert [int(e.step) for e in ph.ema_models] == [31] * len(SIGMAS)
    x = torch.randn(4, 6)
    for e, r in zip(ph.ema_models, refs):                    # the modules are the averages
        assert torch.equal(e.eval()(x), r.eval()(x))


def _reach(change, e, refs_e, both):
    """Make ``change`` to profile ``e`` of the PostHocEMA and to its twin ``refs_e``."""
    for x in (e, refs_e):
        if change == "update_every":
            x.update_every = 3
        elif change == "frozen":
            x.frozen = True
        elif change == "own update":
            x.update()
        elif change == "step":
            x.step.fill_(40)
        elif change == "float64":
            x.ema_model.double()
        elif change == "replaced":
            w = x.ema_model[0].weight
            w.data = w.data.clone()
    if change == "name added":
        both.add("0.bias")                       # the one set every profile shares, in place


@pytest.mark.parametrize("change, alone", [
    ("update_every", True), ("frozen", True), ("own update", True), ("step", True), ("float64", True),
    ("replaced", False), ("name added", False),
])
def test_a_profile_reached_into_updates_as_the_karras_emas_do(tmp_path, change, alone):
    """A profile changed (its cadence, frozen, its own update() or step, its copy in float64, an
    average replaced, a name added to the profiles' shared set): the next update decides again,
    each profile on its own (``alone``) or on a new shadow, bit for bit the separate KarrasEMA
    changed alike; put back, the profiles share one shadow again. ``update_every=2``, changed
    before a call that only counts: the change is seen at the next due update."""
    ph, refs, ours, ref = _made(tmp_path, 2, ref_kw=dict(ignore_names=set()), ignore_names=set())
    _loop(ph, refs, ours, ref, 11)
    assert _one_shadow(ph)
    _reach(change, ph.ema_models[1], refs[1], ph.ema_models[0].ignore_names)
    if change == "name added":
        for r in refs:
            r.ignore_names.add("0.bias")
    _loop(ph, refs, ours, ref, 10, seed=2)
    assert _one_shadow(ph, AVERAGED[:1] + AVERAGED[2:]) is not alone
    _same(ph, refs)
    if change in ("update_every", "frozen"):
        for x in (ph.ema_models[1], refs[1]):
            x.update_every, x.frozen = 2, False
        _loop(ph, refs, ours, ref, 5, seed=3)
        assert _one_shadow(ph)
        _same(ph, refs)


def test_a_model_tensor_moved_is_followed_by_the_same_shadow(tmp_path):
    """``param.data = new`` on the model (same dtype, shape, layout, device): the shadow reads the
    new storage from the next update on, no new shadow made, bit for bit the KarrasEMA."""
    ph, refs, ours, ref = _made(tmp_path)
    _loop(ph, refs, ours, ref, 5)
    before = ph._shared
    for net in (ours, ref):
        w = net[3].weight
        w.data = w.data.clone()
    _loop(ph, refs, ours, ref, 5, seed=2)
    assert _one_shadow(ph) and ph._shared is before
    _same(ph, refs)


def test_one_ema_model_module_for_every_profile_is_updated_as_ema_pytorch_does(tmp_path):
    """``ema_model=`` a module: every profile averages that one module (ema-pytorch's way), each
    on its own, bit for bit ema-pytorch's."""
    theirs_net, ours_net = _net(), _net()
    kw = dict(sigma_rels=(0.05, 0.15), update_every=1, checkpoint_every_num_steps="manual")
    theirs = ema_pytorch.PostHocEMA(theirs_net, ema_model=_net(), checkpoint_folder=str(tmp_path / "t"), **kw)
    ours = compat.PostHocEMA(ours_net, ema_model=_net(), checkpoint_folder=str(tmp_path / "o"), **kw)
    train_sampled([theirs_net, ours_net], 12, lambda i: (theirs.update(), ours.update()),
                  optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    assert not _one_shadow(ours)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_one_shadow_saves_loads_moves_and_copies_as_separate_profiles(tmp_path):
    """Each ``ema_model`` saved alone holds its own tensors only (as many bytes as a separate
    KarrasEMA's; safetensors takes it); ``state_dict()`` loads into a new PostHocEMA that goes on
    bit for bit; ``to(float64)`` leaves each profile on its own, as the KarrasEMA moved alike; a
    pickled or deep-copied PostHocEMA loads and updates on, apart from the original."""
    ph, refs, ours, ref = _made(tmp_path)
    _loop(ph, refs, ours, ref, 6)
    assert _one_shadow(ph)
    sizes = []
    for m in (ph.ema_models[1].ema_model, refs[1].ema_model):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        sizes.append(len(buf.getvalue()))
    assert sizes[0] == sizes[1]
    safetensors = pytest.importorskip("safetensors.torch")
    again = safetensors.load(safetensors.save(dict(ph.ema_models[2].ema_model.state_dict())))
    assert all(torch.equal(v, refs[2].ema_model.state_dict()[k]) for k, v in again.items())

    resumed = compat.PostHocEMA(copy.deepcopy(ours), sigma_rels=SIGMAS, update_every=1,
                                checkpoint_every_num_steps="manual", checkpoint_folder=str(tmp_path / "r"))
    resumed.load_state_dict(ph.state_dict())
    whole = torch.load(io.BytesIO(_saved(ph)), weights_only=False)
    twin = copy.deepcopy(ph)
    before = copy.deepcopy(ph.state_dict())
    for other in (resumed, whole, twin):
        with torch.no_grad():
            for p in other.model.parameters():
                p.add_(1.0)
        other.update()
        other.update()
        assert _one_shadow(other)
    assert all(torch.equal(a, b) for a, b in zip(ph.state_dict().values(), before.values()))
    for a, b, c in zip(resumed.state_dict().values(), whole.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)

    ph.to(torch.float64)
    for r in refs:
        r.to(torch.float64)
    _loop(ph, refs, ours, ref, 4)
    assert not _one_shadow(ph)
    _same(ph, refs)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("make", ["posthoc", "karras", "ema"])
def test_a_tracked_tensor_removed_from_the_model_is_refused_before_anything_changes(tmp_path, make):
    # The per-profile update (where the profiles no longer agree) paired the model's and the EMA copy's
    # tracked tensors by position over parameters and buffers together: with '0.bias' removed, the
    # BatchNorm's running_mean (100) was averaged into the copy's '1.bias' (99.93, ema-pytorch: 0)
    net = _net()
    if make == "posthoc":
        avg = compat.PostHocEMA(net, sigma_rels=SIGMAS, update_every=1, checkpoint_every_num_steps="manual",
                                checkpoint_folder=str(tmp_path / "ph"))
        copies = [e.ema_model for e in avg.ema_models]
    elif make == "karras":
        avg = compat.KarrasEMA(net, gamma=6.94, update_every=1)
        copies = [avg.ema_model]
    else:
        avg = compat.EMA(net, beta=0.9, update_after_step=0, update_every=1)
        avg.update()
        copies = [avg.ema_model]
    avg.update()
    before = [{k: v.clone() for k, v in c.state_dict().items()} for c in copies]
    steps = [int(s) for c in (avg.ema_models if make == "posthoc" else [avg]) for s in [c.step]]
    net[0].bias = None
    with torch.no_grad():
        net[1].running_mean.fill_(100.0)
    with pytest.raises(RuntimeError, match=r"\['0.bias'\] in one of them only"):
        avg.update()
    for c, b in zip(copies, before):
        assert all(torch.equal(v, b[k]) for k, v in c.state_dict().items())
    assert steps == [int(s) for c in (avg.ema_models if make == "posthoc" else [avg]) for s in [c.step]]
