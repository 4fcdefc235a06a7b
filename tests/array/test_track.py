"""fastema.Tracker in plain training loops, and ``python -m fastema plot``."""
import io

import numpy as np
import pytest
import torch
from reference import no_host_reads
from torch import nn

from fastema import Tracker
from fastema.__main__ import main as cli
from fastema.cli.plot import read_log, smooth_series

pd = pytest.importorskip("pandas")


def train(steps, tracker, every_check=None):
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    losses, reads = [], []
    for step in range(steps):
        idx = torch.randint(0, 256, (16,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = (model(x[idx]) - y[idx]).abs().mean().detach()
        losses.append((loss.item(), acc.item()))
        if every_check is None or (step + 1) % every_check:
            with no_host_reads():                     # between reads, updates never touch the host
                out = tracker.update(loss=loss.detach(), mae=acc)
        else:
            out = tracker.update(loss=loss.detach(), mae=acc)
        reads.append(out)
    return np.array(losses), reads


def test_tracker_in_a_training_loop_matches_pandas_and_reads_every_n():
    tracker = Tracker(("loss", "mae"), ema={"span": 10}, sma=7, every=5)
    losses, reads = train(40, tracker, every_check=5)
    assert [i for i, r in enumerate(reads) if r is not None] == list(range(4, 40, 5))
    df = pd.DataFrame(losses, columns=["loss", "mae"])
    for step in range(4, 40, 5):
        r = reads[step]
        for name in ("loss", "mae"):
            assert r[f"{name}_ema"] == pytest.approx(df[name].ewm(span=10).mean()[step], rel=1e-5)
            assert r[f"{name}_sma"] == pytest.approx(df[name].rolling(7, min_periods=1).mean()[step], rel=1e-5)
    dev = tracker.smoothed()
    assert set(dev) == {"loss_ema", "mae_ema", "loss_sma", "mae_sma"} and dev["loss_ema"].shape == ()


def test_progress_bar_shows_the_smoothed_values():
    pytest.importorskip("tqdm")
    tracker = Tracker(["loss"], ema=0.5, sma=None, every=3)
    out = io.StringIO()
    for i in tracker.progress(range(6), file=out, mininterval=0):
        tracker.update(torch.tensor(float(i)))
    tracker.bar.close()
    expected = pd.Series(np.arange(6.0)).ewm(alpha=0.5).mean().iloc[-1]
    assert tracker.last == {"loss_ema": pytest.approx(expected)}
    assert f"loss_ema={expected:.4g}" in out.getvalue()


def test_tracker_state_dict_resumes_exactly():
    a = Tracker(["loss"], ema=0.8, sma=4)
    values = np.random.default_rng(0).normal(size=20)
    for v in values[:12]:
        a.update(v)
    b = Tracker(["loss"], ema=0.8, sma=4)
    b.load_state_dict(a.state_dict())
    for v in values[12:]:
        a.update(v)
        b.update(v)
    assert b.read() == a.read()
    with pytest.raises(ValueError, match="follows"):
        Tracker(["acc"]).load_state_dict(a.state_dict())


def test_a_tracker_state_that_is_not_this_trackers_is_refused_by_what_differs():
    """A state without "names" raised a bare KeyError, names=None a TypeError. Each is refused naming what
    to do, and nothing changes; another every= (how often values are read) is taken."""
    a = Tracker(["loss"], every=5)
    a.update(1.0)
    state = a.state_dict()
    b = Tracker(["loss"], every=None)
    for bad, match in (({k: v for k, v in state.items() if k != "names"}, "not a fastema.Tracker state dict"),
                       ({**state, "names": None}, "follows None")):
        with pytest.raises(ValueError, match=match):
            b.load_state_dict(bad)
        assert b.count == 0
    b.load_state_dict(state)
    assert b.count == 1


def test_tracker_bad_inputs():
    t = Tracker(["loss", "acc"])
    with pytest.raises(ValueError, match="unknown \\['lr'\\], missing \\['acc'\\]"):
        t.update(loss=1.0, lr=0.1)
    with pytest.raises(TypeError, match="all as numbers"):
        t.update(torch.tensor(1.0), 2.0)
    with pytest.raises(ValueError, match="2 values"):
        t.update(1.0)
    with pytest.raises(ValueError, match="4 elements"):
        t.update(torch.ones(4), torch.ones(()))
    with pytest.raises(ValueError, match="distinct"):
        Tracker(["a", "a"])
    with pytest.raises(ValueError, match="every"):
        Tracker(["a"], every=0)
    with pytest.raises(TypeError, match="ema must be"):
        Tracker(["a"], ema="high")


def test_a_vector_of_a_framework_the_tracker_does_not_read_is_refused_saying_what_to_pass():
    """Tracker.update(jnp.array([loss, acc])) said only "expected 2 values, got 1", as if a value were
    missing: it names the array and what the vector of all the metrics may be, and changes nothing."""
    jnp = pytest.importorskip("jax.numpy")
    t = Tracker(["loss", "acc"], ema=0.5, sma=None)
    with pytest.raises(ValueError, match=r"expected 2 values .*got 1 \(jaxlib\..*ArrayImpl of shape \(2,\)\): the "
                                         r"vector of them all must be a NumPy array or a torch tensor \(np\.asarray"):
        t.update(jnp.array([1.0, 0.5]))
    assert t.count == 0
    t.update(np.asarray(jnp.array([1.0, 0.5])))
    assert t.read() == {"loss_ema": 1.0, "acc_ema": 0.5}


def test_nonfinite_losses_are_skipped():
    t = Tracker(["loss"], ema=0.5, sma=3)
    for v in (1.0, float("nan"), 3.0, float("inf")):
        t.update(v)
    s = pd.Series([1.0, np.nan, 3.0, np.nan])
    r = t.read()
    assert r["loss_ema"] == pytest.approx(s.ewm(alpha=0.5, ignore_na=True).mean().iloc[-1])
    assert r["loss_sma"] == pytest.approx(s.rolling(3, min_periods=1).mean().iloc[-1])


def test_read_log_csv_and_plain_list(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("epoch,step,loss,val_loss\n0,0,1.0,\n0,1,0.5,\n0,1,,0.7\n1,2,0.25,\n")
    x, v, name = read_log(str(p))
    assert name == "loss" and list(x) == [0, 1, 2] and list(v) == [1.0, 0.5, 0.25]
    x, v, name = read_log(str(p), "val_loss")
    assert list(v) == [0.7] and list(x) == [1]
    q = tmp_path / "losses.txt"
    q.write_text("3, 2\n1\n")
    x, v, _ = read_log(str(q))
    assert list(v) == [3.0, 2.0, 1.0] and list(x) == [0, 1, 2]
    with pytest.raises(ValueError, match="no column 'acc'.*'loss'"):
        read_log(str(p), "acc")


def test_smooth_series_is_pandas():
    values = np.random.default_rng(3).normal(size=300)
    values[[5, 50]] = np.nan
    got = smooth_series(values, ema={"halflife": 7}, sma=20)
    s = pd.Series(values)
    np.testing.assert_allclose(got["ema"], s.ewm(halflife=7, ignore_na=True).mean(), rtol=1e-9)
    np.testing.assert_allclose(got["sma"], s.rolling(20, min_periods=1).mean(), rtol=1e-9)


def test_plot_command_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = tmp_path / "train.csv"
    rows = "\n".join(f"{i},{1 / (i + 1) + 0.1 * np.sin(i)}" for i in range(200))
    log.write_text("step,loss\n" + rows + "\n")
    assert cli(["plot", str(log), "--span", "20", "--sma", "25", "--logy"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "train-loss.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert cli(["plot", str(log), "--column", "acc"]) == 2
    assert "no column 'acc'" in capsys.readouterr().err
    assert cli(["nope"]) == 2


def test_plot_command_reports_bad_logs_and_names_outputs_safely(tmp_path, capsys):
    # reliability L11
    pytest.importorskip("matplotlib")
    lightning = tmp_path / "metrics.csv"
    lightning.write_text("step,train/loss\n" + "\n".join(f"{i},{1 / (i + 1)}" for i in range(30)) + "\n")
    assert cli(["plot", str(lightning), "--column", "train/loss", "--sma", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "metrics-train_loss.png")
    big = tmp_path / "big.csv"
    big.write_text("step,loss,note\n1,0.5," + "x" * 200_000 + "\n")
    assert cli(["plot", str(big)]) == 2
    assert "not a readable CSV log" in capsys.readouterr().err
    numbers = tmp_path / "n.txt"
    numbers.write_text("1.0\n2.0\n\nabc\n")
    assert cli(["plot", str(numbers)]) == 2
    assert "line 4: 'abc' is not a number" in capsys.readouterr().err
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"step,loss,nom\n1,0.5,caf\xe9\n2,0.4,b\n")
    assert cli(["plot", str(latin), "--sma", "1"]) == 0
