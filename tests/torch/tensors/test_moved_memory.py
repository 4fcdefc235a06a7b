"""The per-step check (``Slots.unchanged``) against every way the memory under a tracked tensor can
move between two updates while the module keeps the same object in the same slot: followed by
``EMA`` and ``TargetNetwork``, never read or written at the old address. And why the check reads
every tensor's address at every update (issue 63 item 5): some of these moves change nothing but
the address, so no fingerprint that skips the address read (the object, ``_version``, the
TensorImpl, the storage object) sees every move.

Re-registration and replacement (``load_state_dict(assign=True)``, ``_parameters[k] = ...``,
FSDP2's resharding, ``model.to()``) keep their own tests: ``test_model_changes.py``,
``test_target.py``, ``sharding/test_sharded.py``."""
import copy

import models
import pytest
import torch
from torch import nn

import fastema.torch as ft
from fastema.torch import EMA, TargetNetwork


def _data(t, new):
    t.data = new                                   # set_data: same object, same version counter


def _set(t, new):
    with torch.no_grad():
        t.set_(new)                                # set_: in place, the version counter moves


def _swap(t, new):
    other = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    torch.utils.swap_tensors(t, other)             # the same object, another TensorImpl


#: torch 2.12 on: a storage can take another's memory in place (before, only as below, freeing it)
SWAPPABLE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


def _swap_storage(t, new):
    """The storage object keeps its place and takes other memory (as ``share_memory_`` and a
    reallocation do); the old memory goes to ``new``'s storage, returned to be kept alive."""
    if not SWAPPABLE:
        pytest.skip(f"torch {torch.__version__} has no UntypedStorage._swap_data_ptr_ (2.12 on): "
                    "share_memory_ and a reallocation, which it stands for, are seen below")
    t.untyped_storage()._swap_data_ptr_(new.untyped_storage())
    return new


def _share(t, new):
    t.share_memory_()                              # model.share_memory() (Hogwild, A3C)


def _grow(t, new):
    with torch.no_grad():                          # reallocated (and copied) in place
        t.untyped_storage().resize_(2 * t.untyped_storage().nbytes())


# Each keeps the old memory alive: a check that missed the move reads or writes live, poisoned
# memory (a clear failure, never a crash).
MOVES = {"data assigned": _data, "set_": _set, "swap_tensors": _swap,
         "storage data swapped": _swap_storage}
# These free the old memory (a check that missed them would touch freed memory): shown below to
# change what "storage data swapped" changes, whose cases stand for them.
IN_PLACE = {"share_memory_": _share, "storage reallocated": _grow}


def _signals(t) -> dict:
    return {"object": id(t), "version": t._version, "impl": t._cdata,
            "storage": t.untyped_storage()._cdata, "address": t.data_ptr()}


def test_only_the_address_sees_every_move():
    """torch's own behaviour, the reason for an address read per tensor and update: every move
    keeps the object and changes the address; ``share_memory_``, a reallocated storage and a
    swapped storage pointer change nothing else (not the version counter, the TensorImpl or the
    storage object), and ``p.data = ...`` keeps the version counter and the TensorImpl. Should
    this fail on a new torch, a cheaper check may have become possible: look again at what each
    signal sees."""
    changed = {}
    moves = {m: fn for m, fn in {**MOVES, **IN_PLACE}.items() if SWAPPABLE or fn is not _swap_storage}
    for move, fn in moves.items():
        t = nn.Parameter(torch.randn(4, 4))
        keep = t.detach()                          # the old memory stays alive: never reused
        before = _signals(t)
        also = fn(t, torch.randn(4, 4))
        after = _signals(t)
        changed[move] = {k for k in before if before[k] != after[k]}
        del keep, also
    assert all("address" in c and "object" not in c for c in changed.values()), changed
    in_place = [changed[m] for m in ("share_memory_", "storage reallocated", "storage data swapped")
                if m in changed]
    assert in_place == [{"address"}] * (2 + SWAPPABLE), changed
    assert not {"version", "impl"} & changed["data assigned"], changed


def _poison_old(old: torch.Tensor, now: torch.Tensor):
    """NaN into the memory the tensor left, kept alive by ``old`` (which shares no version counter
    with the tensor: the tensor's own does not move); a read or a write there shows."""
    with torch.no_grad():
        if old.data_ptr() != now.data_ptr():
            old.fill_(float("nan"))


@pytest.fixture(params=[True, False], ids=["hooks", "no hooks"])
def hooks(request):
    ft.registration_hooks(request.param)
    yield request.param
    ft.registration_hooks(True)


@pytest.mark.parametrize("what", ["0.weight", "1.running_mean"])   # averaged; copied
@pytest.mark.parametrize("move", sorted(MOVES))
def test_ema_follows_memory_moved_under_a_tracked_tensor(move, what, hooks):
    model = models.mlp(4, 8, 3, norm=nn.BatchNorm1d)    # Linear, BatchNorm1d, ReLU, Linear

    def tensor():
        return model.get_parameter(what) if what.endswith("weight") else model.get_buffer(what)

    ema = EMA(model, 0.5)
    models.moved(ema, model)                       # recorded and updated once
    t = tensor()
    before = ema.state_dict()["averaged"][what].clone() if what.endswith("weight") else None
    old, address = t.data, t.data_ptr()            # .data: a version counter of its own
    new = torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) / 7
    kept = MOVES[move](t, new.clone())             # the values come with the memory: no write after
    assert tensor() is t and t.data_ptr() != address     # the same object, its memory elsewhere
    _poison_old(kept if kept is not None else old, t)
    ema.update()
    got = ema.averaged_state_dict()[what]
    if before is None:
        assert torch.equal(got, new)               # a copied buffer: its latest value
    else:
        want = (0.5 * before.double() + 0.5 * new.double()).float()
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (got, want)
    averaged = ema.state_dict()["averaged"].values()
    assert all(torch.isfinite(v).all() for v in averaged)


@pytest.mark.parametrize("side", ["online", "target"])
@pytest.mark.parametrize("move", sorted(MOVES))
def test_target_network_follows_memory_moved_under_either_network(move, side, hooks):
    online = models.mlp(5, 16, 1)
    target = copy.deepcopy(online).requires_grad_(False)
    tn = TargetNetwork(online, target, tau=0.5)
    tn.update()
    t = (online if side == "online" else target)[0].weight
    old, address = t.data, t.data_ptr()            # .data: a version counter of its own
    kept = MOVES[move](t, torch.full_like(t, 2.0 if side == "online" else 4.0))
    assert t.data_ptr() != address
    _poison_old(kept if kept is not None else old, t)
    want = target[0].weight.detach().lerp(online[0].weight.detach(), 0.5)   # torch's float32 lerp
    tn.update()
    assert torch.equal(target[0].weight, want)     # read and written where the weights are now
