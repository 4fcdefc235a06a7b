"""The small model, batches and comparisons the ``ema.attach(optimizer)`` tests share."""
from __future__ import annotations

import torch
from torch import nn


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
