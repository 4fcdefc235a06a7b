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
from support.attach import dcp_load, dcp_options, dcp_save, rank_step, rows
from torch import nn

FACES = ("EMA", "WindowAverage", "PostHocEMA")
OPTIONS = ("default", "flatten", "full")
VARIANTS = ("frozen", "buffers", "stateless")
STEPS, MORE = 3, 2
F32 = torch.float32      # rank_step: rank 0's batch on every rank (BatchNorm's statistics)


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




def _options(option):
    return dcp_options(option == "flatten", option == "full")


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
            rank_step(wrapped, opt, s, width=6, dtype=F32)
        if sharding == "split" and option == "full":   # DCP gathers DTensors only: refused
            try:
                dcp_save(wrapped, opt, os.path.join(at, "ckpt"), _options(option), "torch")
            except ValueError as err:
                out[f"{name}/refused"] = torch.tensor("gather_attached()" in str(err))
            continue
        how = "torch" if option == "full" else "save"   # full: every rank the whole state, a file
        path = os.path.join(at, f"ckpt{rank if option == 'full' else ''}")
        dcp_save(wrapped, opt, path, _options(option), how)
        for s in range(STEPS, STEPS + MORE):
            rank_step(wrapped, opt, s, width=6, dtype=F32)
        out.update(rows(avg, f"{name}/ref"))
        wrapped, opt, avg = _make(1, sharding, face, variant, os.path.join(at, "run"))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "the optimizer state dict")   # no start-over
            dcp_load(wrapped, opt, path, _options(option), "torch" if how == "torch" else "load",
                     each=True)
        out[f"{name}/loaded_calls"] = torch.tensor(avg.state_dict()["calls"])
        for s in range(STEPS, STEPS + MORE):
            rank_step(wrapped, opt, s, width=6, dtype=F32)
        out.update(rows(avg, f"{name}/resumed"))
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
