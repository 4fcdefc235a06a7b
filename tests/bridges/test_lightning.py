"""fastema.lightning with real ``Trainer.fit`` runs on the CPU: EMA, swap for evaluation, resume, logs."""
import csv
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")
pd = pytest.importorskip("pandas")

from reference import no_host_reads  # noqa: E402

from fastema.lightning import MovingAverageLogs, WeightEMA  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.BatchNorm1d(16), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_mae", (self.net(x) - y).abs().mean().detach(), on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n=64, seed=0, bs=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x).sum(1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs, shuffle=False)


def trainer(tmp_path, callbacks, **kw):
    opts = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=tmp_path)
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def weights(module):
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


class Probe(pl.Callback):
    def __init__(self):
        self.start, self.steps, self.validated, self.after_val, self.losses = None, [], [], [], []

    def on_fit_start(self, trainer, pl_module):
        self.start = weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, weights(pl_module)))
        self.losses.append(float(outputs["loss"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validated.append(weights(pl_module))

    def on_validation_end(self, trainer, pl_module):
        self.after_val.append(weights(pl_module))


def test_ema_follows_optimizer_steps_and_is_used_for_validation(tmp_path):
    probe = Probe()
    cb = WeightEMA(decay=0.8)
    model = Regressor()
    # accumulate 2 batches per optimizer step: the EMA updates 4 times per epoch, not 8
    trainer(tmp_path, [cb, probe], accumulate_grad_batches=2).fit(model, loader(), loader(32, seed=1))
    assert cb.ema.updates == 8
    ema, seen, after = dict(probe.start), 0, {}
    for step, w in probe.steps:
        if step != seen:                           # the weights right after optimizer step `step`
            seen = step
            ema = {n: 0.8 * ema[n] + 0.2 * w[n] for n in ema}
            after[step] = ema
    assert sorted(after) == list(range(1, 9))
    for validated, step in zip(probe.validated, (4, 8)):         # validation ran with the EMA
        for n in validated:
            torch.testing.assert_close(validated[n], after[step][n], rtol=1e-5, atol=1e-6)
    # after each validation the raw weights are back, bit for bit
    for i, epoch_end_step in enumerate((7, 15)):
        raw = probe.steps[epoch_end_step][1]
        for n in raw:
            assert torch.equal(probe.after_val[i][n], raw[n])
    # trainer.test uses the EMA too, and leaves the raw weights in place
    before = weights(model)
    with_ema = trainer(tmp_path, [cb]).test(model, loader(32, seed=1), verbose=False)[0]["test_loss"]
    plain = trainer(tmp_path, []).test(model, loader(32, seed=1), verbose=False)[0]["test_loss"]
    assert with_ema != plain
    with cb.ema.average_parameters():
        again = trainer(tmp_path, []).test(model, loader(32, seed=1), verbose=False)[0]["test_loss"]
    assert again == pytest.approx(with_ema, rel=1e-6)
    assert all(torch.equal(before[n], w) for n, w in weights(model).items())


def test_a_second_weight_ema_is_refused_when_the_trainer_is_made_and_two_decays_go_in_one(tmp_path):
    """As lightning.md says: Lightning refuses a second WeightEMA when the Trainer is made (one
    state key: a resume could not tell them apart, and their validation swaps would cross); the
    decays go in one callback, each a row of its average, the first evaluated."""
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `WeightEMA`"):
        trainer(tmp_path, [WeightEMA(decay=0.9), WeightEMA(decay=0.99)])
    cb = WeightEMA(decay=[0.9, 0.99])
    model = Regressor()
    trainer(tmp_path, [cb], max_epochs=1).fit(model, loader())
    assert cb.ema.decay == [0.9, 0.99]
    rows = [cb.ema.averaged_state_dict(row) for row in (0, 1)]
    assert not torch.equal(rows[0]["net.0.weight"], rows[1]["net.0.weight"])


def test_power_function_profile_through_the_callback(tmp_path):
    """WeightEMA(decay=PowerFunction.of(sigma_rel)): the EMA follows the optimizer steps with the exact
    power-function weights; a constant decay beside the profile (another kind of schedule) is refused
    when the callback is made, and so is the old spelling sigma_rel= (an unknown option)."""
    from fastema.schedules import PowerFunction, sigma_rel_to_gamma

    with pytest.raises(ValueError, match="decay= takes one kind of schedule for every average"):
        WeightEMA(decay=[0.9, PowerFunction.of(0.1)])
    with pytest.raises(TypeError, match=r"unknown EMA option\(s\) \['sigma_rel'\]"):
        WeightEMA(decay=0.9, sigma_rel=0.1)
    probe = Probe()
    cb = WeightEMA(decay=PowerFunction.of(0.1))
    trainer(tmp_path, [cb, probe]).fit(Regressor(), loader(), loader(32, seed=1))
    steps = {}
    for step, w in probe.steps:
        steps[step] = w                                   # the weights after optimizer step `step`
    g = sigma_rel_to_gamma(0.1)
    last = max(steps)
    ref = {n: sum(((t / last) ** (g + 1) - ((t - 1) / last) ** (g + 1)) * steps[t][n].double() for t in steps)
           for n in steps[last]}
    got = cb.ema.averaged_state_dict()
    for n, v in ref.items():
        torch.testing.assert_close(got[n].double(), v, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_is_exact_and_holds_raw_weights(tmp_path):
    full = WeightEMA(decay=0.9)
    model = Regressor()
    trainer(tmp_path / "full", [full], max_epochs=4).fit(model, loader(), loader(32, seed=1))
    final_raw, final_ema = weights(model), full.ema.averaged_state_dict()

    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1,
                                           save_top_k=-1)
    first = WeightEMA(decay=0.9)
    model = Regressor()
    trainer(tmp_path / "a", [first, ckpt_cb], max_epochs=2, enable_checkpointing=True).fit(
        model, loader(), loader(32, seed=1))
    raw_at_2 = weights(model)
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    # written in on_validation_end: the model part holds the raw weights, the callback the EMA
    for n, w in raw_at_2.items():
        assert torch.equal(ckpt["state_dict"][n].double(), w)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "WeightEMA" in k]
    assert state["format"] == "fastema.torch.EMA" and state["calls"] == 16

    resumed = WeightEMA(decay=0.9)
    model = Regressor()
    trainer(tmp_path / "b", [resumed], max_epochs=4).fit(model, loader(), loader(32, seed=1),
                                                         ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert resumed.ema.updates == full.ema.updates == 32
    for n, w in weights(model).items():
        assert torch.equal(w, final_raw[n])
    for n, v in resumed.ema.averaged_state_dict().items():
        assert torch.equal(v, final_ema[n]), n


class SyncCheckedLogs(MovingAverageLogs):
    def on_train_batch_end(self, *args, **kwargs):
        with no_host_reads():
            super().on_train_batch_end(*args, **kwargs)


def read_csv_metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoothed_logs_match_pandas_and_never_sync(tmp_path):
    probe = Probe()
    logs = SyncCheckedLogs(ema=0.7, sma=4, metrics=("loss", "train_mae"))
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer(tmp_path, [probe, logs], logger=logger, log_every_n_steps=1).fit(Regressor(), loader())
    rows = [r for r in read_csv_metrics(logger.log_dir + "/metrics.csv") if r.get("loss_ema")]
    assert len(rows) == 16                                  # every step, across both epochs
    series = pd.Series(probe.losses)
    np.testing.assert_allclose([float(r["loss_ema"]) for r in rows], series.ewm(alpha=0.3).mean(), rtol=1e-6)
    np.testing.assert_allclose([float(r["loss_sma"]) for r in rows], series.rolling(4, min_periods=1).mean(),
                               rtol=1e-6)
    assert all(r["train_mae_ema"] for r in rows)

    # at a coarser logging interval the logger writes every 5th step only
    logger = pl.loggers.CSVLogger(tmp_path, name="coarse")
    trainer(tmp_path, [MovingAverageLogs(metrics=("loss",))], logger=logger, log_every_n_steps=5).fit(
        Regressor(), loader())
    steps = [int(r["step"]) for r in read_csv_metrics(logger.log_dir + "/metrics.csv") if r.get("loss_ema")]
    assert steps == [4, 9, 14]


@pytest.mark.parametrize("other, said", [
    (dict(decay=0.99), "saved with decays"),
    (dict(decay=0.9, update_every=2), "update_every=1 where this callback's is 2")])
def test_a_resume_with_other_options_is_refused_not_taken_from_the_checkpoint(tmp_path, other, said):
    """WeightEMA(decay=0.99) resumed from a checkpoint of decay 0.9 went on at 0.9 without a word (the
    EMA's load takes the decays and cadence from the state). Refused, as the Keras callback refuses it."""
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path, [WeightEMA(decay=0.9), ckpt_cb], enable_checkpointing=True, max_epochs=1).fit(
        Regressor(), loader())
    cb, model = WeightEMA(**other), Regressor()
    with pytest.raises(ValueError, match=f"{said}.*give WeightEMA the options it was saved with"):
        trainer(tmp_path, [cb], max_epochs=2).fit(model, loader(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    with pytest.raises(ValueError, match=said):              # kept: a fit again refuses again (it started over)
        trainer(tmp_path, [cb], max_epochs=2).fit(model, loader())
    evaluating = WeightEMA(**other)                          # an evaluation of the saved average uses none of them
    trainer(tmp_path, [evaluating]).test(Regressor(), loader(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert evaluating.ema.updates == 8


def test_smoothed_logs_resume_from_checkpoint(tmp_path):
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = MovingAverageLogs(ema=0.5, sma=3)
    trainer(tmp_path, [first, ckpt_cb], enable_checkpointing=True, max_epochs=1).fit(Regressor(), loader())
    count = first.tracker.count
    second = MovingAverageLogs(ema=0.5, sma=3)
    trainer(tmp_path, [second], max_epochs=2).fit(Regressor(), loader(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert count == 8 and second.tracker.count == 16
    whole = MovingAverageLogs(ema=0.5, sma=3)
    trainer(tmp_path, [whole], max_epochs=2).fit(Regressor(), loader())
    assert second.tracker.read() == pytest.approx(whole.tracker.read(), rel=1e-12)


class Sometimes(Regressor):
    """Logs ``acc`` (its global step) at every second step only, skips batch 2 of each epoch
    (``training_step`` returns None), and keeps what it returned."""

    def __init__(self):
        super().__init__()
        self.returned, self.accs = [], []

    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            return None
        logged = self.global_step % 2 == 0
        self.accs.append(float(self.global_step) + batch_idx if logged else None)
        if logged:
            self.log("acc", torch.tensor(self.accs[-1]))
        loss = super().training_step(batch, batch_idx)
        self.returned.append(float(loss))
        return loss


class Reads(MovingAverageLogs):
    def on_train_batch_end(self, *args, **kwargs):
        super().on_train_batch_end(*args, **kwargs)
        self.read_at = getattr(self, "read_at", []) + [(self.tracker.count, self.tracker.read())]


def test_skipped_batches_metrics_logged_now_and_then_and_accumulated_losses_are_averaged_as_they_came():
    """A batch skipped by returning None (Lightning's documented skip) crashed the fit with a
    KeyError; a metric logged every second step was taken again at the steps between (counted
    twice); under accumulate_grad_batches=4 the loss averaged was Lightning's loss / 4. Now: a
    skipped batch leaves the averages, a metric counts where it was logged (weight 0 between),
    and the loss is the one training_step returned."""
    model = Sometimes()
    logs = Reads(ema=0.5, sma=8, metrics=("loss", "acc"))
    trainer(None, [logs], max_epochs=2, accumulate_grad_batches=4).fit(model, loader())
    assert logs.tracker.count == len(model.returned) == 14                 # 2 of 16 batches skipped
    last = logs.read_at[-1][1]
    losses = pd.Series(model.returned)
    assert last["loss_ema"] == pytest.approx(losses.ewm(alpha=0.5).mean().iloc[-1], rel=1e-6)
    assert last["loss_sma"] == pytest.approx(losses.iloc[-8:].mean(), rel=1e-6)
    logged = [a for a in model.accs if a is not None]
    assert last["acc_ema"] == pytest.approx(pd.Series(logged).ewm(alpha=0.5).mean().iloc[-1], rel=1e-6)
    window = [a for a in model.accs[-8:] if a is not None]   # those logged in the last 8 steps
    assert 0 < len(window) < 8 and last["acc_sma"] == pytest.approx(np.mean(window), rel=1e-6)


class Manual(Regressor):
    """Manual optimization, the loss logged (not returned), and ``acc`` logged on step and epoch at
    every third batch from the second on."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.losses, self.accs = [], []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.losses.append(float(loss))
        self.log("loss", loss.detach())
        if batch_idx % 3 == 1:
            self.accs.append(float(self.global_step) + 0.5)
            self.log("acc", torch.tensor(self.accs[-1]), on_step=True, on_epoch=True)


def test_manual_optimization_and_a_metric_logged_late_on_step_and_epoch_are_averaged_as_logged():
    """Under manual optimization every step was taken for a skipped one (nothing averaged, no word);
    a metric first logged at the second step stopped the fit at the first; and the epoch's mean of a
    metric logged on step and epoch, under its plain name, was taken for a new value."""
    model = Manual()
    logs = Reads(ema=0.5, sma=None, metrics=("loss", "acc"))
    trainer(None, [logs], max_epochs=2).fit(model, loader())
    assert logs.tracker.count == len(model.losses) == 16
    last = logs.read_at[-1][1]
    assert last["loss_ema"] == pytest.approx(pd.Series(model.losses).ewm(alpha=0.5).mean().iloc[-1], rel=1e-6)
    assert last["acc_ema"] == pytest.approx(pd.Series(model.accs).ewm(alpha=0.5).mean().iloc[-1], rel=1e-6)


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match="no training metric 'accuracy'.*self.log"):
        trainer(None, [MovingAverageLogs(metrics=("accuracy",))], max_epochs=1).fit(Regressor(), loader())


@pytest.fixture
def one_thread():
    """A tiny model trains faster on one thread, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Averages(pl.Callback):
    """The average after every training batch, as ``read()`` gives it (listed after the averaging callback)."""

    def __init__(self, read):
        self.read, self.seen, self.model = read, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({n: t.detach().double().clone() for n, t in self.read().items()})
        self.model.append({n: t.detach().double().clone() for n, t in pl_module.state_dict().items()})


@pytest.mark.parametrize("d", [0.5, 0.9])
def test_weight_ema_set_as_the_guide_says_reproduces_lightnings_ema_weight_averaging(tmp_path, d, one_thread):
    """The settings docs/guides/lightning.md gives, read from the guide (WeightEMA(decay=PowerWarmup(d,
    min_decay=d), buffers="average")), give EMAWeightAveraging(decay=d)'s average after every optimizer step
    (its first update copies the weights; the integer BatchNorm counter aside, which fastema copies); after
    fit Lightning's model holds the average and fastema's the raw weights, until ema.copy_to().
    WeightAveraging with fastema's multi_avg_fn gives EMAWeightAveraging's average too, integer buffers
    included."""
    from pytorch_lightning.callbacks import EMAWeightAveraging, WeightAveraging

    from fastema.schedules import PowerWarmup
    from fastema.torch.compat import get_ema_multi_avg_fn

    guide = (pathlib.Path(__file__).parents[2] / "docs" / "guides" / "lightning.md").read_text()
    settings = re.search(r"(WeightEMA\(decay=[^\n#]*\)) +# = EMAWeightAveraging\(decay=d\)", guide).group(1)
    assert "callback.ema.copy_to()" in guide
    callbacks = {"lightning": EMAWeightAveraging(decay=d),
                 "fastema": eval(settings, {"WeightEMA": WeightEMA, "PowerWarmup": PowerWarmup, "d": d}),
                 "multi_avg_fn": WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(d))}
    reads = {"lightning": lambda: callbacks["lightning"]._average_model.module.state_dict(),
             "fastema": lambda: callbacks["fastema"].ema.averaged_state_dict(),
             "multi_avg_fn": lambda: callbacks["multi_avg_fn"]._average_model.module.state_dict()}
    models, seen = {}, {}
    for name, cb in callbacks.items():
        probe = Averages(reads[name])
        models[name] = Regressor()                     # the same weights (seeded), data and optimizer steps
        trainer(tmp_path, [cb, probe], max_epochs=1).fit(models[name], loader())
        seen[name] = probe.seen
    assert len(seen["lightning"]) == len(seen["fastema"]) == len(seen["multi_avg_fn"]) == 8
    counter = "net.2.num_batches_tracked"
    for step, (theirs, ours, multi) in enumerate(zip(seen["lightning"], seen["fastema"], seen["multi_avg_fn"]), 1):
        assert sorted(theirs) == sorted(ours) == sorted(multi)
        for n in theirs:
            torch.testing.assert_close(multi[n], theirs[n], rtol=0, atol=1e-6)
            if n != counter:
                torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=1e-5)
        assert ours[counter] == 2 * step                # copied (two forwards a step), where Lightning averages it
    assert seen["lightning"][-1][counter] < 16
    # after fit: Lightning copied its average into the model; fastema put the raw weights back
    last = seen["lightning"][-1]
    for n, t in models["lightning"].state_dict().items():
        assert torch.equal(t.double(), last[n]), n
    raw = models["fastema"].state_dict()
    assert max(float((raw[n].double() - last[n]).abs().max()) for n in raw if n != counter) > 1e-3
    callbacks["fastema"].ema.copy_to()                 # the guide's way to end with the average in the model
    for n, t in models["fastema"].state_dict().items():
        if n != counter:
            torch.testing.assert_close(t.double(), last[n], rtol=0, atol=1e-5)


def test_lightnings_update_cadence_maps_to_update_every_and_update_after_step(tmp_path, one_thread):
    """The guide's mapping of EMAWeightAveraging's other arguments: update_every_n_steps=k is update_every=k
    and use_buffers=False is buffers="copy" (the average after every step); update_starting_at_step=s is
    PowerWarmup(d, min_decay=d, update_after_step=s) from the first update on (global step s + 1): before it
    Lightning's average holds
    the weights fit started from, fastema's follows the weights."""
    from pytorch_lightning.callbacks import EMAWeightAveraging

    from fastema.schedules import PowerWarmup

    d = 0.9
    pairs = [(EMAWeightAveraging(decay=d, update_every_n_steps=3, use_buffers=False),
              WeightEMA(decay=PowerWarmup(d, min_decay=d), update_every=3, buffers="copy")),
             (EMAWeightAveraging(decay=d, update_starting_at_step=4),
              WeightEMA(decay=PowerWarmup(d, min_decay=d, update_after_step=4), buffers="average"))]
    for i, (theirs, ours) in enumerate(pairs):
        probes = [Averages(lambda cb=theirs: cb._average_model.module.state_dict()),   # made at fit start
                  Averages(lambda cb=ours: cb.ema.averaged_state_dict())]
        for cb, probe in zip((theirs, ours), probes):
            trainer(tmp_path, [cb, probe], max_epochs=1).fit(Regressor(), loader())
        start = Regressor().state_dict()
        for step, (a, b, w) in enumerate(zip(probes[0].seen, probes[1].seen, probes[1].model), 1):
            for n in a:
                if i == 1 and step <= 4:
                    assert torch.equal(a[n], start[n].double()) and torch.equal(b[n], w[n]), (step, n)
                elif i == 0 or "num_batches" not in n:
                    torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ddp_fit_with_the_average_split_over_the_ranks_equals_the_unsplit_one(tmp_path):
    """Two ranks under torchrun (gloo, the DDP strategy): WeightEMA(shard_replicas=True) and WeightEMA()
    over the same fit give the same average on every rank, the split one holding less; the split fit's
    Lightning checkpoint holds the average whole and loads back into a split EMA (H1: it crashed)."""
    import os
    import subprocess
    import sys

    script = pathlib.Path(__file__).with_name("lightning_ddp_script.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = re.findall(r"rank (\d) split updates=(\d+) held=(\d+) bits=(\S+) ckpt=(\w+) whole updates=(\d+) "
                       r"held=(\d+) bits=(\S+) ckpt=none", out.stdout)
    assert len(found) == 2, out.stdout
    for _, su, sh, sb, ck, wu, wh, wb in found:
        assert su == wu == "8" and sb == wb and int(sh) < int(wh) and ck == "ok"
    assert found[0][3] == found[1][3]                       # the same average on both ranks


@pytest.mark.slow
def test_ddp_fit_resumes_an_attached_average_split_over_the_ranks_bit_for_bit(tmp_path):
    """Two ranks under torchrun (gloo, the DDP strategy), ``EMA(self, shard_replicas=True)`` made in
    ``configure_optimizers`` and attached to the optimizer, ``GatherAttached("ema")``: the ``.ckpt``
    rank 0 writes holds the average whole, and ``fit(ckpt_path=)`` in a fresh Trainer ends with the
    gathered average (and the model) bit for bit those of an uninterrupted fit, on both ranks
    (issue 61: only the callback order had been tested, in one process)."""
    import os
    import subprocess
    import sys

    script = pathlib.Path(__file__).with_name("lightning_ddp_attach_script.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(script)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = r"updates=(\d+) split=(\w+) held=(\d+) run=(\d+) average=(\w+) model=(\w+)"
    found = re.findall(rf"rank (\d) unsplit=(\d+) full {run} \| first {run} ckpt_updates=(\d+) "
                       rf"ckpt_run=(\d+) whole=(\w+) \| resumed {run}$",
                       "".join((tmp_path / f"result-{r}.txt").read_text() for r in (0, 1)), re.M)
    assert len(found) == 2, out.stdout[-3000:]
    for _rank, unsplit, *rest in found:
        full, first, resumed = rest[:6], rest[6:12], rest[15:]
        ckpt_updates, ckpt_run, whole = rest[12:15]
        assert full[:2] == resumed[:2] == ["8", "True"] and first[:2] == ["4", "True"]
        assert int(full[2]) < int(unsplit)                 # each rank holds its pieces only
        assert ckpt_updates == "4" and whole == "True" and ckpt_run == first[3] == resumed[3]
        assert resumed[4:] == full[4:] and first[4:] != full[4:]   # the average, the model
    held = (4, 10, 19)                                      # each rank's bytes differ: its pieces
    same = [[v for i, v in enumerate(f) if i not in held] for f in found]
    assert same[0][1:] == same[1][1:]                       # the rest the same on both ranks


class Diverge(pl.Callback):
    """A NaN in a weight at optimizer step ``at``, read by the EMA's update of that step alone (put back
    by the module's own hook, which runs after the callbacks'): the average keeps it (guard off)."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            self.kept = pl_module.net[0].bias.detach().clone()
            with torch.no_grad():
                pl_module.net[0].bias[0] = float("nan")
            pl_module.diverged = self


class Healing(Regressor):
    diverged = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.diverged is not None:
            with torch.no_grad():
                self.net[0].bias.copy_(self.diverged.kept)
            self.diverged = None


def test_a_poisoned_average_is_refused_by_the_validation_swap_and_the_resume_until_repaired(tmp_path):
    short = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    cb = WeightEMA(decay=0.8)
    with pytest.raises(ValueError, match=r"swap\(\): the average holds inf or NaN in 'net.0.bias'.*repair_nonfinite"):
        trainer(tmp_path, [Diverge(at=2), cb], **short).fit(Healing(), loader(), loader(8))
    assert not cb.ema.swapped
    with pytest.warns(RuntimeWarning, match="'net.0.bias'"):
        state = cb.state_dict()                        # what Lightning's checkpoint holds of it
    assert state["nonfinite"] == ["net.0.bias"]
    refused = WeightEMA(decay=0.8)
    refused.load_state_dict(state)
    with pytest.raises(ValueError, match="'net.0.bias' holds inf or NaN.*allow_nonfinite=True"):
        trainer(tmp_path, [refused], **short).fit(Regressor(), loader(), loader(8))
    resumed = WeightEMA(decay=0.8, allow_nonfinite=True, validate_with_ema=False)
    resumed.load_state_dict(state)
    model = Regressor()
    with pytest.warns(RuntimeWarning, match="allow_nonfinite"):
        trainer(tmp_path, [resumed], **short).fit(model, loader(), loader(8))
    assert resumed.repair_nonfinite() == ["net.0.bias"]
    assert torch.equal(resumed.ema.averaged_state_dict()["net.0.bias"], model.net[0].bias)


class SavesWhileEvaluating(Regressor):
    """Writes a checkpoint from its first validation (and test) step of epoch 0, before computing the
    loss of that batch, and keeps every batch's loss."""

    def __init__(self, path):
        super().__init__()
        self.path, self.losses = path, {"val": [], "test": []}

    def _step(self, batch, batch_idx, stage):
        if batch_idx == 0 and self.current_epoch == 0:
            self.trainer.save_checkpoint(self.path / f"{stage}.ckpt")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses[stage].append(loss.detach().clone())
        self.log(f"{stage}_loss", loss)

    def validation_step(self, batch, batch_idx):
        self._step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, batch_idx, "test")


def test_a_checkpoint_saved_inside_validation_holds_the_raw_weights_and_validation_stays_on_the_average(tmp_path):
    """trainer.save_checkpoint() from validation_step (or test_step): the checkpoint holds the raw
    weights bit for bit and the EMA, resumes exactly, and the rest of that validation still runs on
    the average (the save swapped the EMA out for good: batches 1.. ran on the raw weights)."""
    val = loader(32, seed=1)

    def on_average(model, ema):                       # a plain evaluation of the averaged weights
        model.eval()
        with torch.no_grad(), ema.average_parameters():
            return [nn.functional.mse_loss(model.net(x), y) for x, y in val]

    cb, probe = WeightEMA(decay=0.8), Probe()
    model = SavesWhileEvaluating(tmp_path / "a")
    trainer(tmp_path / "a", [cb, probe], max_epochs=1).fit(model, loader(32), val)
    assert len(model.losses["val"]) == 4
    for got, want in zip(model.losses["val"], on_average(model, cb.ema)):
        assert torch.equal(got, want)
    raw = model.state_dict()                          # validation ended the fit: the raw weights are back
    assert all(torch.equal(w, probe.steps[-1][1][n]) for n, w in weights(model).items())
    ckpt = torch.load(tmp_path / "a" / "val.ckpt", weights_only=False)
    assert ckpt["state_dict"].keys() == raw.keys()
    for n, w in raw.items():
        assert torch.equal(ckpt["state_dict"][n], w), n
    (state,) = [v for k, v in ckpt["callbacks"].items() if "WeightEMA" in k]
    assert state["calls"] == 4
    now = cb.ema.averaged_state_dict()
    assert state["averaged"]
    for n, rows in state["averaged"].items():          # (one row: one decay)
        assert torch.equal(rows[0], now[n]), n

    # trainer.test too: every batch on the average, the checkpoint the raw weights, which are back after
    trainer(tmp_path / "a", [cb]).test(model, val, verbose=False)
    for got, want in zip(model.losses["test"], on_average(model, cb.ema)):
        assert torch.equal(got, want)
    tested = torch.load(tmp_path / "a" / "test.ckpt", weights_only=False)
    assert all(torch.equal(tested["state_dict"][n], w) for n, w in raw.items())
    assert all(torch.equal(w, raw[n]) for n, w in model.state_dict().items())

    # two epochs, the same save at epoch 0: training after that validation goes on from the raw weights
    full, starts = WeightEMA(decay=0.8), StartsOfBatches()
    model = SavesWhileEvaluating(tmp_path / "b")
    trainer(tmp_path / "b", [full, starts]).fit(model, loader(32), val)
    assert all(torch.equal(starts.seen[4][n], w) for n, w in raw.items())     # epoch 1's first batch
    # resumed from the checkpoint written inside validation: the run without the stop, bit for bit
    resumed = WeightEMA(decay=0.8)
    again = SavesWhileEvaluating(tmp_path / "c")
    trainer(tmp_path / "c", [resumed]).fit(again, loader(32), val, ckpt_path=tmp_path / "a" / "val.ckpt")
    assert resumed.ema.updates == full.ema.updates == 8
    assert all(torch.equal(w, model.state_dict()[n]) for n, w in again.state_dict().items())
    for n, v in resumed.ema.averaged_state_dict().items():
        assert torch.equal(v, full.ema.averaged_state_dict()[n]), n


class StartsOfBatches(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append({n: t.detach().clone() for n, t in pl_module.state_dict().items()})
