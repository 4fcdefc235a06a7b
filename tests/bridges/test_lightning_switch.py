"""Switching a Lightning run from Lightning's weight averaging to fastema, and resuming its ``.ckpt``.

Lightning's ``WeightAveraging`` callbacks (``EMAWeightAveraging``, ``WeightAveraging``) write the average
as the checkpoint's ``state_dict`` and the raw weights under ``current_model_state``. ``WeightEMA``
resuming such a checkpoint (``fit(ckpt_path=...)``) must train on from the raw weights and continue
the average with its counters. What "equal" means here: the resumed run's raw weights are the run
that stays on Lightning's, bit for bit (same optimizer state, data, steps); its average is Lightning's
average at the checkpoint, continued by fastema's schedule with the update count, the calls and the
last update's step carried, equal to a float64 computation by hand from the same weights (float32
rounding per update); where fastema's decays are Lightning's (a constant decay, after its first
update), equal to the run that stays on Lightning (float32 rounding: Lightning's ``avg_fn`` rounds
twice per update, fastema's lerp once), bit for bit against ``WeightAveraging(multi_avg_fn=...)``
(the same lerp). Real ``Trainer.fit`` runs on the CPU: a 4-8-1 model, 10 batches an epoch; the
file's ~30 fits take ~3 s.
"""
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.callbacks import (  # noqa: E402
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_multi_avg_fn  # noqa: E402

from fastema.lightning import WeightEMA  # noqa: E402
from fastema.schedules import BEMA, HalfLife, PowerWarmup  # noqa: E402
from fastema.torch.compat import get_ema_multi_avg_fn  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
COUNTER = "net.2.num_batches_tracked"
STATS = ("net.2.running_mean", "net.2.running_var")         # what WeightEMA copies with buffers="copy"


class Net(pl.LightningModule):
    def __init__(self, extra=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 1))
        if extra:                                     # a parameter the checkpoint lacks, loaded non-strictly
            self.scale = nn.Parameter(torch.ones(1))
            self.strict_loading = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.sin(x).sum(1, keepdim=True)),
                                       batch_size=8)


class Steps(pl.Callback):
    """The model's state after every optimizer step, by global step (float64 copies)."""

    def __init__(self):
        self.after, self.before = {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.before:          # an optimizer step (not an accumulating batch)
            self.after[trainer.global_step] = {n: t.detach().double().clone()
                                               for n, t in pl_module.state_dict().items()}


def fit(root, callbacks, epochs, ckpt=None, model=None, **kw):
    steps = Steps()
    model = model or Net()
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer = pl.Trainer(callbacks=[*callbacks, steps], max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kw)
    trainer.fit(model, loader(), ckpt_path=ckpt)
    return trainer, model, steps.after


def first_run(tmp_path, callback, epochs=1, **kw):
    """``epochs`` with ``callback``, saving ``last.ckpt`` at the end of each: (its path, the steps' states)."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _, _, after = fit(tmp_path / "first", [callback, saver], epochs, **kw)
    return tmp_path / "ck" / "last.ckpt", after


def lightnings(callback):
    return {n: t.double() for n, t in callback._average_model.module.state_dict().items()}


def fastemas(callback):
    return {n: t.double() for n, t in callback.ema.averaged_state_dict().items()}


def by_hand(start, after, decays, copied=(COUNTER,)):
    """The average from ``start`` (the checkpoint's, float64) over the states ``after[step]`` with
    ``decays[step]``; ``copied`` tensors are the model's (fastema copies integer buffers, and with
    ``buffers="copy"`` every buffer)."""
    avg = {n: t.double() for n, t in start.items()}
    for step, d in decays.items():
        for n, w in after[step].items():
            avg[n] = w.clone() if n in copied else d * avg[n] + (1 - d) * w
    return avg


def close(got, want, skip=(), **tol):
    for n in want:
        if n not in skip:
            torch.testing.assert_close(got[n], want[n], **(tol or dict(rtol=1e-6, atol=1e-7)), msg=n)


def test_switching_from_ema_weight_averaging_trains_on_from_the_raw_weights_and_the_average(tmp_path):
    """H4: resumed in WeightEMA, the run went on from the average as if it were the raw weights
    (the issue measured 0.38 relative off) and counted 10 updates instead of 20."""
    ckpt, _ = first_run(tmp_path, EMAWeightAveraging(decay=0.9))
    saved = torch.load(ckpt, weights_only=False)
    stay_cb, ours = EMAWeightAveraging(decay=0.9), WeightEMA(decay=0.9, buffers="average")
    _, _, stay = fit(tmp_path / "stay", [stay_cb], 2, ckpt)
    _, _, moved = fit(tmp_path / "moved", [ours], 2, ckpt)
    assert sorted(moved) == sorted(stay) == list(range(11, 21))
    for step in stay:                                   # the same raw weights, bit for bit, at every step
        assert all(torch.equal(moved[step][n], stay[step][n]) for n in stay[step]), step
    assert (ours.ema.updates, ours.ema.calls) == (20, 20)
    ref = by_hand(saved["state_dict"], moved, {s: 0.9 for s in range(11, 21)})
    close(fastemas(ours), ref)
    close(fastemas(ours), lightnings(stay_cb), skip=(COUNTER,), rtol=0, atol=2e-6)   # avg_fn: two roundings


@pytest.mark.parametrize("switch", ["WeightEMA", "multi_avg_fn"])
def test_switching_from_multi_avg_fn_weight_averaging_is_bit_for_bit(tmp_path, switch):
    """``WeightAveraging(multi_avg_fn=torch's get_ema_multi_avg_fn(d))`` lerps as fastema does: the run
    switched to ``WeightEMA(d)``, or to fastema's ``multi_avg_fn`` (the drop-in reading its peer's
    checkpoint, through Lightning's own loader), equals the run that stays on torch's, bit for bit."""
    ckpt, _ = first_run(tmp_path, WeightAveraging(multi_avg_fn=torch_multi_avg_fn(0.8)))
    stay = WeightAveraging(multi_avg_fn=torch_multi_avg_fn(0.8))
    moved = WeightEMA(0.8, buffers="average") if switch == "WeightEMA" else \
        WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.8))
    fit(tmp_path / "stay", [stay], 2, ckpt)
    fit(tmp_path / "moved", [moved], 2, ckpt)
    got, want = (fastemas(moved) if switch == "WeightEMA" else lightnings(moved)), lightnings(stay)
    assert all(torch.equal(got[n], want[n]) for n in want if n != COUNTER)
    made = moved.ema.updates if switch == "WeightEMA" else int(moved._average_model.n_averaged)
    assert made == int(stay._average_model.n_averaged) == 20


@pytest.mark.parametrize("case", ["warmup", "half-life every 3, accumulating", "swa"])
def test_switching_carries_the_counters_into_fastemas_own_schedule(tmp_path, case):
    """Another schedule than Lightning's goes on from Lightning's counters: PowerWarmup at update 11
    (not 1: a restart copies the weights), HalfLife from the step of the last update with
    ``update_every=3`` in Lightning's phase (under gradient accumulation), and Lightning's SWA
    average continued as the mean of every step's weights (PowerWarmup(1, power=1): 1 - 1/n)."""
    if case == "warmup":
        peer, ours, epochs, kw = EMAWeightAveraging(decay=0.99), WeightEMA(PowerWarmup(0.999)), 1, {}
        decays = {s: PowerWarmup(0.999)(s) for s in range(11, 21)}            # update n = global step
    elif case == "swa":
        peer, ours, epochs, kw = WeightAveraging(), WeightEMA(PowerWarmup(1.0, power=1.0), buffers="average"), 1, {}
    else:
        peer = EMAWeightAveraging(decay=0.9, update_every_n_steps=3)
        ours, epochs, kw = WeightEMA(HalfLife(4), update_every=3, buffers="average"), 2, dict(accumulate_grad_batches=2)
        decays = {13: 2 ** (-3 / 4), 16: 2 ** (-3 / 4), 19: 2 ** (-3 / 4)}   # Lightning's last update: step 10
    ckpt, before = first_run(tmp_path, peer, epochs, **kw)
    saved = torch.load(ckpt, weights_only=False)
    _, _, moved = fit(tmp_path / "moved", [ours], 2 * epochs, ckpt, **kw)
    assert sorted(moved) == list(range(11, 21))
    if case == "swa":                                   # closed form: the mean of the 20 steps' weights
        ref = {n: sum(w[n] for w in [*before.values(), *moved.values()]) / 20 for n in moved[20]}
        ref[COUNTER] = moved[20][COUNTER]
    else:
        ref = by_hand(saved["state_dict"], moved, decays, (COUNTER, *STATS) if case == "warmup" else (COUNTER,))
    close(fastemas(ours), ref)
    made = int(saved["averaging_state"]["n_averaged"])
    assert (made, ours.ema.updates) == ((4, 7) if case.startswith("half") else (10, 20))
    assert ours.ema.calls == 20


def test_a_checkpoint_with_more_updates_than_steps_is_taken(tmp_path):
    """EMAWeightAveraging updating from epoch 0 updates at every step and at every epoch end: its
    n_averaged (11 over 10 steps) outnumbers the global step. Taken, each update counted as a call
    (fastema refuses a state of more updates than calls: not one made from Lightning's)."""
    ckpt, _ = first_run(tmp_path, EMAWeightAveraging(decay=0.9, update_starting_at_epoch=0))
    saved = torch.load(ckpt, weights_only=False)
    made, steps = int(saved["averaging_state"]["n_averaged"]), saved["global_step"]
    assert made > steps
    ours = WeightEMA(decay=0.9)
    fit(tmp_path / "moved", [ours], 2, ckpt)
    assert ours.ema.updates == made + 10 and ours.ema.calls >= ours.ema.updates


def test_a_checkpoint_saved_before_lightnings_first_update_starts_the_average_at_the_raw_weights(tmp_path):
    """H3 (issue 85): EMAWeightAveraging(update_starting_at_step=10) saved at step 10 holds n_averaged 0
    and, as its 'state_dict', AveragedModel's untouched copy of the weights at step 0. Lightning's own
    callback resumed from it copies the weights at its first update (step 11): its average never holds
    step 0's weights. WeightEMA(0.9) took them as its average (every update then mixed them in); it
    now starts at the raw weights, as a fresh WeightEMA does: the average is the raw weights at step
    10 folded with 0.9 over steps 11-20, float64 by hand."""
    ckpt, before = first_run(tmp_path, EMAWeightAveraging(decay=0.9, update_starting_at_step=10))
    saved = torch.load(ckpt, weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == 0
    stay_cb, ours = EMAWeightAveraging(decay=0.9, update_starting_at_step=10), WeightEMA(0.9, buffers="average")
    _, _, stay = fit(tmp_path / "stay", [stay_cb], 2, ckpt)
    _, _, moved = fit(tmp_path / "moved", [ours], 2, ckpt)
    assert all(torch.equal(moved[20][n], stay[20][n]) for n in stay[20])       # the same raw weights
    lightning = by_hand(moved[11], moved, {s: 0.9 for s in range(12, 21)})    # its first update copies
    close(lightnings(stay_cb), lightning, skip=(COUNTER,), rtol=0, atol=2e-6)
    assert (ours.ema.updates, ours.ema.calls) == (10, 20)
    close(fastemas(ours), by_hand(before[10], moved, {s: 0.9 for s in range(11, 21)}))


def test_a_checkpoint_with_both_averages_resumes_the_raw_weights_and_fastemas_own(tmp_path):
    """Both callbacks on, then WeightEMA alone: the model gets the raw weights (the checkpoint's
    ``state_dict`` is Lightning's average) and WeightEMA its own state, bit for bit the run that
    keeps both."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(tmp_path / "first", [EMAWeightAveraging(decay=0.9), WeightEMA(0.7), saver], 1)
    ckpt = tmp_path / "ck" / "last.ckpt"
    both, alone = WeightEMA(0.7), WeightEMA(0.7)
    _, _, kept = fit(tmp_path / "both", [EMAWeightAveraging(decay=0.9), both], 2, ckpt)
    _, _, moved = fit(tmp_path / "alone", [alone], 2, ckpt)
    for step in kept:
        assert all(torch.equal(moved[step][n], kept[step][n]) for n in kept[step]), step
    assert all(torch.equal(a, b) for a, b in zip(fastemas(alone).values(), fastemas(both).values()))


def test_resuming_its_own_checkpoint_under_gradient_accumulation_counts_each_optimizer_step_once(tmp_path):
    """The first batch of a resumed fit under ``accumulate_grad_batches=2`` was taken for an optimizer
    step (the step count was read before Lightning restored it): 11 updates where the full run made 10."""
    ckpt, _ = first_run(tmp_path, WeightEMA(0.8), accumulate_grad_batches=2)
    resumed, whole = WeightEMA(0.8), WeightEMA(0.8)
    fit(tmp_path / "resumed", [resumed], 2, ckpt, accumulate_grad_batches=2)
    fit(tmp_path / "whole", [whole], 2, accumulate_grad_batches=2)
    assert resumed.ema.updates == whole.ema.updates == 10
    assert all(torch.equal(a, b) for a, b in zip(fastemas(resumed).values(), fastemas(whole).values()))


def _edit(path, change):
    saved = torch.load(path, weights_only=False)
    change(saved)
    torch.save(saved, path.with_name("edited.ckpt"))
    return path.with_name("edited.ckpt")


def _two_averagers(saved):
    saved["callbacks"]["MyAveraging"] = {"latest_update_step": 3}


REFUSED = {
    "half the layout": (lambda s: s.pop("current_model_state"), {}, r"holds 'averaging_state' but not "
                        r"'current_model_state'.*cannot be told apart"),
    "no raw weights": (lambda s: [s.pop(k) for k in ("current_model_state", "averaging_state")], {},
                       r"state of \['EMAWeightAveraging'\].*not 'current_model_state'.*outside fit"),
    "two averaging callbacks": (_two_averagers, {}, r"\['EMAWeightAveraging', 'MyAveraging'\] weight-averaging"),
    "bema": (None, dict(decay=BEMA()), r"'bema' schedule.*needs the weights at its first update"),
    "another model": (None, dict(model="extra"), r"does not match this model: 'scale' is not in its state_dict"),
}


@pytest.mark.parametrize("case", [*REFUSED, "saved after fit", "unknown averaging callback"])
def test_a_peer_checkpoint_weight_ema_cannot_read_is_refused_by_name_and_never_trained_on(tmp_path, case):
    """Each refusal names what the checkpoint holds and says what to do; the fit stops before its first
    optimizer step and the average is not touched."""
    if case == "unknown averaging callback":             # Lightning's SWA keeps its average in its callback state
        saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
        fit(tmp_path / "first", [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1), saver], 1)
        ckpt, kw, match = tmp_path / "ck" / "last.ckpt", {}, (
            r"callbacks\['StochasticWeightAveraging'\]\['average_model_state'\] holds a copy of the model's weights")
    elif case == "saved after fit":                       # the model holds the average once fit ends
        trainer, _, _ = fit(tmp_path / "first", [EMAWeightAveraging(decay=0.9)], 1)
        ckpt, kw, match = tmp_path / "after.ckpt", {}, r"'current_model_state' equals its average after 10 updates"
        trainer.save_checkpoint(ckpt)
    else:
        change, kw, match = REFUSED[case]
        ckpt, _ = first_run(tmp_path, EMAWeightAveraging(decay=0.9))
        if change is not None:
            ckpt = _edit(ckpt, change)
    model = Net(extra=kw.pop("model", None) == "extra")
    ours = WeightEMA(**kw)
    steps = Steps()
    trainer = pl.Trainer(callbacks=[ours, steps], max_epochs=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=match) as err:
        trainer.fit(model, loader(), ckpt_path=ckpt)
    assert "WeightEMA cannot resume this checkpoint" in str(err.value) and "without ckpt_path" in str(err.value)
    assert "Nothing was loaded into the average" in str(err.value)
    assert steps.after == {} and (ours.ema is None or ours.ema.updates == 0)
