"""The attached average's carrier, as a matrix (issue 69 item 3): {EMA, WindowAverage,
PostHocEMA} x {unsharded, FSDP2, split over replicas} x {default options, flattened,
full_state_dict} x {a frozen part inside the optimizer, averaged buffers, a stateless
optimizer}: trained 3 steps, saved through DCP's getter (``dcp.save``; a full state dict through
``torch.save``), resumed into fresh objects (other initial weights) through DCP's setter, 2 more
steps, and the average bit for bit against the uninterrupted run (2 gloo ranks where sharded, in
one call of the long-lived world per sharding).

A split average under ``full_state_dict`` is refused by name at the save (DCP gathers DTensors
only, not a split's pieces): that is the case's check.

CI runs a Latin square of the last three factors for each sharding (every pair of face, options
and variant once: 9 cases, one world call per face), 27 cases in all; the other 54 of the
full product are marked slow."""
import itertools
import os

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from torch import nn

FACES = ("EMA", "WindowAverage", "PostHocEMA")
OPTIONS = ("default", "flatten", "full")
VARIANTS = ("frozen", "buffers", "stateless")
STEPS, MORE = 3, 2


def latin(face, option):
    return VARIANTS[(FACES.index(face) + OPTIONS.index(option)) % 3]


SQUARE = [(f, o, latin(f, o)) for f in FACES for o in OPTIONS]
REST = [c for c in itertools.product(FACES, OPTIONS, VARIANTS) if c not in SQUARE]


def _make(seed, sharding, face, variant, folder):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastema.torch import EMA, PostHocEMA, WindowAverage

    torch.manual_seed(seed)
    mid = nn.BatchNorm1d(8) if variant == "buffers" else nn.Tanh()
    model = nn.Sequential(nn.Linear(6, 8), mid, nn.Linear(8, 5), nn.Linear(5, 3))
    if variant == "frozen":
        model[0].requires_grad_(False)            # inside the optimizer (model.parameters())
    wrapped = model
    if sharding == "fsdp2":                       # uneven local shards (5 rows), a frozen group
        for i in (0, 2, 3):
            fully_shard(model[i])
        wrapped = fully_shard(model)
    elif sharding == "split":
        wrapped = DDP(model)
    opt = (torch.optim.SGD(wrapped.parameters(), lr=0.1) if variant == "stateless"
           else torch.optim.Adam(wrapped.parameters(), lr=1e-2))
    kw = {"shard_replicas": True} if sharding == "split" else {}
    if variant == "buffers":
        kw["buffers"] = "average"
    src = wrapped if sharding == "split" else model
    if face == "EMA":
        avg = EMA(src, [0.5, 0.9], **kw)
    elif face == "WindowAverage":
        avg = WindowAverage(src, 3, **kw)
    else:
        avg = PostHocEMA(src, (0.05, 0.1), snapshot_every=None, path=folder, **kw)
    return wrapped, opt, avg.attach(opt)


def _step(wrapped, opt, rank, step):
    """The same batch on every rank: FSDP2 leaves buffers unsynchronised, and DCP keeps one
    rank's copy of a plain tensor (the model's BatchNorm statistics and their averages)."""
    g = torch.Generator().manual_seed(1000 * step)
    wrapped(torch.randn(4, 6, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _whole(avg, prefix):
    """The average's rows (gathered: a collective where sharded or split), and its count."""
    state = avg.gathered_state_dict() if avg.split else avg.state_dict()
    out = {f"{prefix}/calls": torch.tensor(state["calls"])}
    for key in ("averaged", "ring"):
        for n, v in state.get(key, {}).items():
            out[f"{prefix}/{key}/{n}"] = (v.full_tensor() if hasattr(v, "full_tensor")
                                          else v).clone()
    return out


def _options(option):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=option == "flatten",
                            full_state_dict=option == "full")


def _save(wrapped, opt, option, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(wrapped, opt, options=_options(option))
    if option == "full":                          # every rank the whole state: one file each
        torch.save({"model": msd, "optim": osd}, path + ".pt")
    else:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _load(wrapped, opt, option, path):
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as dsd

    o = _options(option)
    if option == "full":
        state = torch.load(path + ".pt", weights_only=True)
    else:
        msd, osd = dsd.get_state_dict(wrapped, opt, options=o)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
    dsd.set_model_state_dict(wrapped, state["model"], options=o)
    dsd.set_optimizer_state_dict(wrapped, opt, state["optim"], options=o)


def _cases(rank, world, folder, sharding, cases):
    """Each case: the uninterrupted run (``ref``), and a fresh run resumed from its save at
    step 3 (``resumed``)."""
    import warnings

    out = {}
    for face, option, variant in cases:
        name = f"{face}-{option}-{variant}"
        at = os.path.join(folder, f"{sharding}-{name}")
        os.makedirs(at, exist_ok=True)
        wrapped, opt, avg = _make(0, sharding, face, variant, os.path.join(at, "run"))
        for s in range(STEPS):
            _step(wrapped, opt, rank, s)
        if sharding == "split" and option == "full":   # DCP gathers DTensors only: refused
            try:
                _save(wrapped, opt, option, os.path.join(at, "ckpt"))
            except ValueError as err:
                out[f"{name}/refused"] = torch.tensor("gather_attached()" in str(err))
            continue
        _save(wrapped, opt, option, os.path.join(at, f"ckpt{rank if option == 'full' else ''}"))
        for s in range(STEPS, STEPS + MORE):
            _step(wrapped, opt, rank, s)
        out.update(_whole(avg, f"{name}/ref"))
        wrapped, opt, avg = _make(1, sharding, face, variant, os.path.join(at, "run"))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "the optimizer state dict")   # no start-over
            _load(wrapped, opt, option, os.path.join(at, f"ckpt{rank if option == 'full' else ''}"))
        out[f"{name}/loaded_calls"] = torch.tensor(avg.state_dict()["calls"])
        for s in range(STEPS, STEPS + MORE):
            _step(wrapped, opt, rank, s)
        out.update(_whole(avg, f"{name}/resumed"))
    return out


def _check(r, cases):
    for face, option, variant in cases:
        name = f"{face}-{option}-{variant}"
        if f"{name}/refused" in r:                # split x full_state_dict: refused by name
            assert bool(r[f"{name}/refused"]), name
            continue
        keys = [k[len(name) + 5:] for k in r if k.startswith(f"{name}/ref/")]
        assert any("averaged" in k for k in keys), name
        if variant == "buffers":                  # the buffers' averages are carried too
            assert any("running_mean" in k for k in keys), keys
        assert int(r[f"{name}/loaded_calls"]) == STEPS, name
        for k in keys:
            assert torch.equal(r[f"{name}/resumed/{k}"], r[f"{name}/ref/{k}"]), (name, k)


def _one_process(tmp_path, cases):
    r = _cases(0, 1, str(tmp_path), "none", cases)
    _check(r, cases)


def _two_ranks(tmp_path, sharding, cases):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    rs = run_ranks(_cases, tmp_path / "out", 2, str(tmp_path), sharding, cases, timeout=300.0,
                   pg_timeout=60.0)
    for r in rs:
        _check(r, cases)


def test_unsharded(tmp_path):
    _one_process(tmp_path, SQUARE)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("sharding", ["fsdp2", "split"])
def test_two_ranks(tmp_path, sharding, face):
    _two_ranks(tmp_path, sharding, [c for c in SQUARE if c[0] == face])


@pytest.mark.slow
def test_unsharded_the_rest(tmp_path):
    _one_process(tmp_path, REST)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp2", "split"])
def test_two_ranks_the_rest(tmp_path, sharding):
    _two_ranks(tmp_path, sharding, REST)
