"""fastema.torch.WindowAverage: the mean of the model's last ``window`` weights (or all of them)
against a float64 reference and torch's AveragedModel, swaps, checkpoints, bad construction."""
import models
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from fastema.torch import WindowAverage


def make():
    return models.mlp(6, 16, 1, norm=nn.BatchNorm1d, act=nn.Tanh)


def train(model, averages, steps=30):
    """models.train with ``averages``; returns the optimizer and the float64 weights after each step."""
    snaps = []
    opt = models.train(model, steps, *averages,
                       record=lambda i: snaps.append({n: p.detach().double().clone()
                                                      for n, p in model.named_parameters()}))
    return opt, snaps


@pytest.mark.parametrize("every", [1, 3])
def test_window_average_matches_float64_reference(every):
    model = make()
    first = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    avg = WindowAverage(model, 4, every=every)
    _, snaps = train(model, [avg])
    taken = [first] + [s for i, s in enumerate(snaps) if i % every == 0]
    state = avg.state_dict()["averaged"]
    for n in first:
        ref = torch.stack([t[n] for t in taken[-4:]]).mean(0)
        torch.testing.assert_close(state[n][0].double(), ref, rtol=1e-6, atol=1e-7)
    assert avg.count == 4 and avg.snapshots == len(taken)


def test_cumulative_mode_equals_averaged_model_swa():
    model = make()
    ours = WindowAverage(model, None)
    swa = AveragedModel(model)                                      # torch's running mean
    swa.update_parameters(model)                                    # counts the current weights first
    train(model, [ours, _Updater(swa, model)])
    for (n, p), q in zip(model.named_parameters(), swa.module.parameters()):
        torch.testing.assert_close(ours.state_dict()["averaged"][n][0], q.detach(), rtol=1e-6, atol=1e-7)


class _Updater:
    def __init__(self, swa, model):
        self.swa, self.model = swa, model

    def update(self):
        self.swa.update_parameters(self.model)


def test_swap_is_exact_and_shared_with_ema():
    model = make().bfloat16()
    avg = WindowAverage(model, 3, ring_dtype="bfloat16")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    avg.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    mean = {k: v.clone() for k, v in avg.state_dict()["averaged"].items()}
    with avg.average_parameters():
        for n, p in model.named_parameters():
            nearest = mean[n][0].to(p.dtype).float()
            assert ((p.float() - mean[n][0]).abs() <= (nearest - mean[n][0]).abs()).all()
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, mean[k]) for k, v in avg.state_dict()["averaged"].items())


def test_checkpoint_resume_is_bit_identical():
    model = make()
    avg = WindowAverage(model, 5)
    train(model, [avg], steps=8)
    ck = {k: (v if not isinstance(v, dict) else {n: t.clone() for n, t in v.items()})
          for k, v in avg.state_dict().items()}
    model_b = make()
    model_b.load_state_dict(model.state_dict())
    resumed = WindowAverage(model_b, 5)
    resumed.load_state_dict(ck)
    g = torch.Generator().manual_seed(7)
    for _ in range(9):
        delta = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        for m, a in ((model, avg), (model_b, resumed)):
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.add_(delta[n])
            a.update()
    for n, v in avg.state_dict()["averaged"].items():
        assert torch.equal(v, resumed.state_dict()["averaged"][n]), n
    with pytest.raises(ValueError, match="window/ring_dtype"):
        WindowAverage(make(), 4).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="not a fastema.torch.WindowAverage"):
        WindowAverage(make(), 5).load_state_dict({"format": "fastema.torch.EMA", "version": 1})


@pytest.mark.parametrize("kwargs,match", [(dict(window=0), "window must be"), (dict(window=2, every=0), "every"),
                                          (dict(window=2, every=True), "^every must be an int >= 1, got True"),
                                          (dict(window=True), "window must be an int >= 1 or None"),
                                          (dict(window=2, ring_dtype="float16"), "ring_dtype")])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowAverage(make(), **kwargs)


def test_numpy_ints_are_taken_as_ema_takes_them():
    import numpy as np

    avg = WindowAverage(make(), np.int64(3), every=np.int64(2))       # (refused before)
    assert (avg.window, avg.every) == (3, 2) and type(avg.window) is int
