"""Checkpoints written before the layout issue's restructure (version 1, by the code at b74f866,
tests/torch/data/checkpoints-v1.pt) still load, bit for bit, and training goes on from them.
Version 2 (the sharded issue) only adds keys."""
import pathlib

import torch

import fastema.torch

DATA = pathlib.Path(__file__).parents[1] / "data" / "checkpoints-v1.pt"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_version_1_checkpoints_load_bit_for_bit():
    saved = torch.load(DATA, weights_only=True)
    model = _model()
    model.load_state_dict(saved["model"])
    ema = fastema.torch.EMA(model, [0.9, 0.5], update_every=2)
    ema.load_state_dict(saved["ema"])
    assert (ema.calls, ema.updates) == (5, 3)
    assert _equal(ema.averaged_state_dict(), saved["ema_avg"])
    assert _equal(ema.averaged_state_dict(row=1), saved["ema_avg_row1"])
    win = fastema.torch.WindowAverage(model, 3)
    win.load_state_dict(saved["window"])
    assert _equal(win.averaged_state_dict(), saved["window_avg"])
    # and the next update continues from the loaded state, as a fresh float64 reference says
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.double() for k, v in ema.averaged_state_dict().items()}
    ema.update()                                        # call 6 of update_every=2: skipped
    ema.update()                                        # call 7: updates with decay 0.9
    weights = dict(model.named_parameters())
    for name, avg in ema.averaged_state_dict().items():
        if name in weights:
            ref = 0.9 * before[name] + 0.1 * weights[name].detach().double()
            torch.testing.assert_close(avg.double(), ref, rtol=1e-6, atol=1e-6)
    now = ema.state_dict()                              # version 2 is a superset of version 1
    assert (saved["ema"]["version"], now["version"]) == (1, 2)
    assert set(saved["ema"]) <= set(now) and now["layout"] == "replicated"
