"""The small model, batches and comparisons the ``ema.attach(optimizer)`` tests share."""
from __future__ import annotations

import io

import torch
from torch import nn

from fastema.torch import ATTACH_KEY as KEY


def net(dtype=torch.float32, seed=0):
    """A 6 -> 8 -> 3 MLP of ``dtype``, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(n, dtype=torch.float32):
    """``n`` batches of 4 inputs, the same in every test."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, generator=g).to(dtype) for _ in range(n)]


def averaged(avg):
    """A copy of the average's tensors (its ``state_dict()["averaged"]``)."""
    return {k: v.clone() for k, v in avg.state_dict()["averaged"].items()}


def same(a, b):
    """Whether two dicts of tensors hold the same keys and bit-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_load(state):
    """``state`` as a file holds it: ``torch.save``, read back with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def step(model, opt, x, scaler=None):
    """One training step on batch ``x`` (the loss in float32; ``scaler``: a GradScaler's)."""
    loss = model(x).float().square().mean()
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def rank_step(model, opt, step, rank=0, width=8, dtype=torch.bfloat16):
    """Training step ``step`` on rank ``rank``: a batch of 4 x ``width`` inputs of ``dtype`` drawn
    from ``1000 * step + rank`` (rank 0's alike on every rank: where the ranks must see one batch,
    BatchNorm's statistics), the loss in float32."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, width, generator=g).to(dtype)
    step_on(model, opt, x)


def step_on(model, opt, x):
    model(x).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


def resumes_bit_for_bit(train, xs, at=4, loaded=None):
    """The attach round trip through the optimizer's state dict: ``train(state=None)`` makes
    ``(model, optimizer, attached average)`` (from other weights where ``state``, the model's and
    the optimizer's state dicts, is given, then loads it). One run over every batch of ``xs``; one
    over the first ``at``, saved (``weights_only=True``) and resumed into ``train(saved)``, which
    must hold the saved average (``loaded(saved_ema, resumed_ema)``: the caller's checks too), and
    run over the rest: the average (float32 in the file, what bfloat16 would lose), its count and
    the weights end bit for bit those of the uninterrupted run. Returns the saved file's state."""
    model, opt, ema = train()
    for x in xs:
        step(model, opt, x)
    model1, opt1, ema1 = train()
    for x in xs[:at]:
        step(model1, opt1, x)
    saved = save_load((model1.state_dict(), opt1.state_dict()))
    avg = saved[1][KEY]["averaged"]
    assert all(t.dtype == torch.float32 for t in avg.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in avg.values())   # bf16 loses it
    model2, opt2, ema2 = train(saved)
    assert ema2.updates == at and same(averaged(ema2), averaged(ema1))
    if loaded is not None:
        loaded(ema1, ema2)
    for x in xs[at:]:
        step(model2, opt2, x)
    assert ema2.updates == ema.updates == len(xs)
    assert same(averaged(ema2), averaged(ema))
    assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), model.parameters()))
    return saved


# ------------------------------------------------------------ through DCP (one process or ranks)


def rows(avg, prefix, dtype=None):
    """The average's whole state as flat tensors: ``{prefix}/calls`` and ``{prefix}/{averaged or
    ring}/{name}`` (a split average's gathered, a sharded one's DTensors in full: collectives
    there, on every rank); ``dtype``: what every row must be (asserted)."""
    state = avg.gathered_state_dict() if avg.split else avg.state_dict()
    out = {f"{prefix}/calls": torch.tensor(state["calls"])}
    for key in ("averaged", "ring"):
        for n, v in state.get(key, {}).items():
            assert dtype is None or v.dtype == dtype, (key, n, v.dtype)
            out[f"{prefix}/{key}/{n}"] = (v.full_tensor() if hasattr(v, "full_tensor")
                                          else v).clone()
    return out


def same_rows(r, a, b):
    """Assert that ``r``'s rows under prefix ``a`` are bit for bit those under ``b`` (some)."""
    keys = [k[len(a) + 1:] for k in r if k.startswith(a + "/")]
    assert keys
    for k in keys:
        assert torch.equal(r[f"{a}/{k}"], r[f"{b}/{k}"]), (a, b, k)


def dcp_options(flat=False, full=False, **kw):
    """DCP's ``StateDictOptions`` (``flat``: ``flatten_optimizer_state_dict``, ``full``:
    ``full_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat, full_state_dict=full, **kw)


def dcp_save(model, opt, path, options, how="save"):
    """The model's and the optimizer's state through DCP's getter, written at ``path``: ``how``
    ``"save"`` (``get_state_dict`` + ``dcp.save``), ``"async_save"`` (``dcp.async_save``, waited
    for), ``"torch"`` (``torch.save`` of a full state dict to ``path + ".pt"``); returns the
    optimizer's state dict DCP made."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt, options=options)
    if how == "torch":
        torch.save({"model": msd, "optim": osd}, path + ".pt")
    elif how == "async_save":
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path).result()
    else:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return osd


def dcp_load(model, opt, path, options, how="load", each=False):
    """A save of :func:`dcp_save` loaded into ``model`` and ``opt`` through DCP's setter: ``how``
    ``"load"`` (``get_state_dict`` for the layout, ``dcp.load`` into it) or ``"torch"``
    (``torch.load`` of ``path + ".pt"``); ``each``: ``set_model_state_dict`` then
    ``set_optimizer_state_dict`` (else ``set_state_dict``)."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as dsd

    if how == "torch":
        state = torch.load(path + ".pt", weights_only=True)
    else:
        msd, osd = dsd.get_state_dict(model, opt, options=options)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
    if each:
        dsd.set_model_state_dict(model, state["model"], options=options)
        dsd.set_optimizer_state_dict(model, opt, state["optim"], options=options)
    else:
        dsd.set_state_dict(model, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=options)


# ------------------------------------------------------------ under Lightning


def regressor(momentum=0.9, ema_kw=None):
    """A Lightning module: a 4 -> 16 -> 1 regressor (weights of seed 0) trained by SGD (lr 0.05,
    ``momentum``); ``ema_kw``: an ``EMA(self, 0.9, **ema_kw)`` made in ``configure_optimizers``
    and attached to its optimizer (the module's ``ema``; None: no average). Used in one process
    (``tests/bridges/test_attach_trainers.py``) and by the DDP scripts under torchrun
    (``tests/bridges/lightning_ddp*_script.py``)."""
    import pytorch_lightning as pl

    from fastema.torch import EMA

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
            self.ema = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=momentum)
            if ema_kw is not None:
                self.ema = EMA(self, 0.9, **ema_kw).attach(opt)
            return opt

    return Regressor()


def regression_data(n, seed, curved=True):
    """``n`` pairs of 4 inputs (drawn from ``seed``) and their target (``sin(x).sum()``; not
    ``curved``: ``x.sum()``), in batches of 8."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x.sin() if curved else x).sum(1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
