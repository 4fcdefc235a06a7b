"""Switching with a checkpoint: each drop-in of ``fastema.torch.compat`` resumes the checkpoint its peer
writes (and the peer resumes the drop-in's), through a file, the way each library saves and loads it;
the switched run then goes on as the run that stays on the peer (bit for bit where the arithmetic is
the same, to float32 rounding where the documented deviations say so). torch_ema's state dicts:
``test_compat.py``; ema-pytorch's post-hoc checkpoint folders: ``test_dropins.py``; Lightning's ``.ckpt``:
``tests/bridges/test_lightning_switch.py``. Tiny models, ~30 updates each: about 1 s for the file."""
import pytest
import torch
from models import mlp, train_sampled
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_multi_avg_fn

from fastema.torch import compat
from testkit.baselines import TimmModelEmaV3Reference


def _nets():
    return mlp(6, 12, 1, norm=nn.BatchNorm1d), mlp(6, 12, 1, norm=nn.BatchNorm1d)


def _loop(nets, steps, each):
    train_sampled(nets, steps, each, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))


def _through_a_file(tmp_path, state):
    torch.save(state, tmp_path / "ckpt.pt")
    return torch.load(tmp_path / "ckpt.pt", weights_only=False)


def _equal(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ timm: CheckpointSaver's files

def _timm_unwrap(model):
    """timm.utils.unwrap_model for these classes: ``model.module`` when it has one (timm is not installed
    here: its ModelEmaV3 arithmetic is testkit's reference, checked bit for bit in test_compat.py)."""
    return model.module if hasattr(model, "module") else model


def _timm_clean(state):
    """timm's clean_state_dict, as load_checkpoint applies it: a ``module.`` prefix stripped."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


@pytest.mark.parametrize("direction", ["timm to fastema", "fastema to timm"])
def test_timm_checkpoint_saver_files_resume_in_either(tmp_path, direction):
    """CheckpointSaver writes ``state_dict_ema = unwrap_model(model_ema).state_dict()`` and timm's
    train.py resumes it with ``load_checkpoint(model_ema.module, path, use_ema=True)``: either side's
    file resumes the other, and the runs go on bit for bit (float32, ``update(model, step)``)."""
    (net_a, net_b), steps = _nets(), 12
    writer = TimmModelEmaV3Reference(net_a, 0.95, use_warmup=True) if direction.startswith("timm") else \
        compat.ModelEmaV3(net_a, 0.95, use_warmup=True)
    _loop([net_a, net_b], steps, lambda i: writer.update(net_a, step=i))
    file = _through_a_file(tmp_path, {"epoch": 0, "arch": "mlp", "version": 2, "state_dict": net_a.state_dict(),
                                      "state_dict_ema": _timm_unwrap(writer).state_dict()})
    reader = compat.ModelEmaV3(net_b, 0.95, use_warmup=True) if direction.startswith("timm") else \
        TimmModelEmaV3Reference(net_b, 0.95, use_warmup=True)
    reader.module.load_state_dict(_timm_clean(file["state_dict_ema"]))     # load_checkpoint(model_ema.module, ...)
    _loop([net_a, net_b], steps, lambda i: (writer.update(net_a, step=steps + i),
                                            reader.update(net_b, step=steps + i)))
    _equal(reader.module.state_dict().values(), writer.module.state_dict().values())


# ------------------------------------------------------------------ torch.optim.swa_utils.AveragedModel

@pytest.mark.parametrize("direction", ["torch to fastema", "fastema to torch"])
def test_averaged_model_state_dicts_resume_with_either_multi_avg_fn(tmp_path, direction):
    """An ``AveragedModel``'s state dict (the average and ``n_averaged``) resumes with the other
    ``multi_avg_fn``, bit for bit the run that keeps its own."""
    fns = [torch_multi_avg_fn(0.9), compat.get_ema_multi_avg_fn(0.9)]
    first, second = fns if direction.startswith("torch") else fns[::-1]
    net_a, net_b = _nets()
    stay = AveragedModel(net_a, multi_avg_fn=first, use_buffers=True)
    _loop([net_a, net_b], 10, lambda i: stay.update_parameters(net_a))
    moved = AveragedModel(net_b, multi_avg_fn=second, use_buffers=True)
    moved.load_state_dict(_through_a_file(tmp_path, stay.state_dict()))
    _loop([net_a, net_b], 10, lambda i: (stay.update_parameters(net_a), moved.update_parameters(net_b)))
    assert int(moved.n_averaged) == 20
    _equal(moved.state_dict().values(), stay.state_dict().values())


# ------------------------------------------------------------------ ema-pytorch: EMA.state_dict()

@pytest.mark.parametrize("direction", ["ema-pytorch to fastema", "fastema to ema-pytorch"])
def test_ema_pytorch_state_dicts_resume_in_either(tmp_path, direction):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    kw = dict(beta=0.99, update_after_step=3, update_every=2, power=3 / 4)
    classes = [ema_pytorch.EMA, compat.EMA]
    first, second = classes if direction.startswith("ema-pytorch") else classes[::-1]
    net_a, net_b = _nets()
    stay = first(net_a, **kw)
    _loop([net_a, net_b], 15, lambda i: stay.update())
    moved = second(net_b, **kw)
    moved.load_state_dict(_through_a_file(tmp_path, stay.state_dict()))
    _loop([net_a, net_b], 15, lambda i: (stay.update(), moved.update()))
    assert int(moved.step) == 30
    _equal(moved.state_dict().values(), stay.state_dict().values())


# ------------------------------------------------------------------ diffusers: accelerate's state_dict, save_pretrained

def _training_utils():
    return pytest.importorskip("diffusers.training_utils")


@pytest.mark.parametrize("direction", ["diffusers to fastema", "fastema to diffusers"])
def test_diffusers_state_dicts_resume_in_either(tmp_path, direction):
    """accelerate saves ``EMAModel.state_dict()`` and loads it back with ``load_state_dict``: either
    side's resumes the other; the runs then agree to float32 rounding (fastema's lerp rounds once,
    diffusers' update twice: the documented deviation)."""
    classes = [_training_utils().EMAModel, compat.EMAModel]
    first, second = classes if direction.startswith("diffusers") else classes[::-1]
    net_a, net_b = _nets()
    stay = first(net_a.parameters(), decay=0.99, use_ema_warmup=True, power=3 / 4)
    _loop([net_a, net_b], 10, lambda i: stay.step(net_a.parameters()))
    moved = second(net_b.parameters(), decay=0.5)
    moved.load_state_dict(_through_a_file(tmp_path, stay.state_dict()))
    assert (moved.decay, moved.optimization_step, moved.use_ema_warmup) == (0.99, 10, True)
    _equal(moved.shadow_params, stay.shadow_params)
    _loop([net_a, net_b], 10, lambda i: (stay.step(net_a.parameters()), moved.step(net_b.parameters())))
    assert moved.optimization_step == 20 and moved.cur_decay_value == stay.cur_decay_value
    for a, b in zip(moved.shadow_params, stay.shadow_params):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:It is deprecated to pass a pretrained model:FutureWarning")
@pytest.mark.parametrize("direction", ["diffusers to fastema", "fastema to diffusers", "fastema to fastema"])
def test_diffusers_save_pretrained_folders_load_in_either(tmp_path, direction):
    """``save_pretrained`` writes the averaged model and the EMA settings in its config;
    ``EMAModel.from_pretrained(path, Model)`` of the other library (or of fastema's own) reads them back."""
    _training_utils()
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class Tiny(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 8):
            super().__init__()
            self.a, self.b = nn.Linear(4, width), nn.Linear(width, 1)

    by_name = {"diffusers": _training_utils().EMAModel, "fastema": compat.EMAModel}
    first, second = (by_name[side] for side in direction.split(" to "))
    torch.manual_seed(0)
    model = Tiny()
    ema = first(model.parameters(), decay=0.9, update_after_step=2, model_cls=Tiny, model_config=model.config)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model.parameters())
    ema.save_pretrained(tmp_path / "ema")
    back = second.from_pretrained(tmp_path / "ema", Tiny)
    assert type(back) is second and (back.optimization_step, back.decay, back.update_after_step) == (5, 0.9, 2)
    _equal(back.shadow_params, ema.shadow_params)


# ------------------------------------------------------------------ settings out of range, refused at load

OUT_OF_RANGE = {
    "torch_ema decay NaN": ("torch_ema", dict(decay=float("nan")), r"Decay must be between 0 and 1.*nan.*"
                            r"state_dict\['decay'\]: nothing was loaded"),
    "torch_ema num_updates -3": ("torch_ema", dict(num_updates=-3), r"state_dict\['num_updates'\] is -3.*nothing"),
    "diffusers min_decay 2.0": ("diffusers", dict(min_decay=2.0, optimization_step=5),
                                r"state dict's min_decay must be .*2\.0.*nothing"),
    "diffusers inv_gamma 0": ("diffusers", dict(use_ema_warmup=True, inv_gamma=0, optimization_step=5),
                              r"state dict's inv_gamma must be .*> 0, got 0; nothing was loaded"),
}


def _upstream_then_ours(peer):
    if peer == "torch_ema":
        module = pytest.importorskip("torch_ema")
        return module.ExponentialMovingAverage, compat.ExponentialMovingAverage, "update"
    return _training_utils().EMAModel, compat.EMAModel, "step"


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_peer_settings_out_of_range_are_refused_at_load_by_name_with_nothing_changed(case):
    """L3 (issue 85): a torch_ema or diffusers state dict whose settings are out of range loaded (as the
    originals load it: they check types only) and failed at a later step (fastema's update refuses a decay
    out of [0, 1]). The original's first steps on it fail or write an average no decay in [0, 1] gives:
    NaN, or an extrapolation; the drop-in refuses it at load, by name, and keeps what it had."""
    peer, change, match = OUT_OF_RANGE[case]
    upstream, dropin, step = _upstream_then_ours(peer)
    net = mlp(3, 4, 1)
    theirs = upstream(net.parameters(), decay=0.9)
    bad = {**theirs.state_dict(), **change}
    theirs.load_state_dict(bad)                       # the original takes it ...
    with torch.no_grad():
        net[0].weight.add_(1.0)
    old = [t.clone() for t in theirs.shadow_params]
    try:                                              # ... and its first step fails or leaves the segment
        getattr(theirs, step)(net.parameters())       # between the average and the weights (NaN, extrapolated)
        assert not all(((n >= torch.minimum(o, p) - 1e-6) & (n <= torch.maximum(o, p) + 1e-6)).all()
                       for n, o, p in zip(theirs.shadow_params, old, net.parameters()))
    except ZeroDivisionError:
        pass
    ours = dropin(net.parameters(), decay=0.9)
    getattr(ours, step)(net.parameters())
    before = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ours.load_state_dict({**ours.state_dict(), **change})
    after = ours.state_dict()
    for key, value in before.items():
        if isinstance(value, list):
            _equal(value, after[key])
        else:
            assert value == after[key], key


@pytest.mark.parametrize("part", ["shadow_params", "collected_params"])
@pytest.mark.parametrize("bad", ["complex64", "int64", "meta"])
def test_torch_ema_tensors_no_average_could_hold_are_refused_at_load_with_nothing_changed(part, bad):
    """torch_ema's drop-in checked the shapes only: a meta tensor last in the list failed the copy
    halfway through (the shadows before it loaded, torch's NotImplementedError), and a complex one
    was taken with its imaginary part dropped (an integer one rounded)."""
    net = mlp(3, 4, 1)
    ours = compat.ExponentialMovingAverage(net.parameters(), decay=0.9)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ours.update()
    ours.store()
    state = ours.state_dict()
    tensors = [torch.zeros_like(t) for t in state["shadow_params"]]
    last = tensors[-1]
    tensors[-1] = (torch.empty(last.shape, device="meta") if bad == "meta" else
                   (last + 1j).to(torch.complex64) if bad == "complex64" else last.to(torch.int64))
    before = [t.clone() for t in ours.shadow_params]
    with pytest.raises(ValueError, match=rf"{part}\[{len(tensors) - 1}\] .*(meta tensor|dtype torch\.{bad}).*"
                                         r"nothing was loaded"):
        ours.load_state_dict({**state, part: tensors, "num_updates": 7})
    _equal(before, ours.shadow_params)
    assert ours.num_updates != 7
