"""``iter_weights()`` / ``weights_metadata()``: the average streamed out (issue 52 item 3).

One process: every face's stream against its state dict bit for bit (order, wire dtype, tied tensors
once, the metadata), fresh tensors (a consumer's copies survive a swap and an update), the refusals.
Four gloo ranks (tests/dist.py): an average split over replicas (``shard_replicas``) and an HSDP 2x2
one, streamed against ``full_state_dict()`` bit for bit, one all-gather per bucket (counted), ``to=``,
the ranks' agreement (a rank that skipped an update: the same error everywhere), ``update()`` with no
collective.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
from dist import Counted, run_ranks
from support import faults
from torch import nn

from fastema.torch import EMA, PostHocEMA, TargetNetwork, WeightMeta, WindowAverage


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(got: list, want: dict, what: str) -> None:
    assert [n for n, _ in got] == list(want), what
    for n, t in got:
        assert t.dtype == want[n].dtype and t.shape == want[n].shape, f"{what}: {n}"
        assert torch.equal(_bits(t), _bits(want[n])), f"{what}: {n}"


def _cast(state: dict, dtype) -> dict:
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}


def _meta(got: list) -> list:
    return [WeightMeta(n, t.dtype, t.shape) for n, t in got]


class Tied(nn.Module):
    """Tied embedding and head (two state-dict names of one tensor), a BatchNorm (integer buffer)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight


def _train(model: nn.Module, avg, steps: int = 3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=0.1)
            avg.update()


@pytest.mark.parametrize("kind", ["ema", "bf16_shadow_f32", "window", "offload", "excluded"])
def test_the_stream_is_the_full_state_dict_in_order_cast_and_tied_once(kind):
    torch.manual_seed(0)
    model = Tied()
    if kind == "bf16_shadow_f32":
        model = model.to(torch.bfloat16)
    avg = {"ema": lambda: EMA(model, [0.9, 0.5], buffers="copy"),
           "bf16_shadow_f32": lambda: EMA(model, 0.9, shadow_dtype="float32"),
           "window": lambda: WindowAverage(model, 3),
           "offload": lambda: EMA(model, 0.9, offload="cpu"),
           "excluded": lambda: EMA(model, 0.9, exclude=["body.*"])}[kind]()
    _train(model, avg)
    full = avg.full_state_dict()
    want = {n: t for n, t in full.items() if n != "head.weight"}         # tied: once, under its first name
    got = list(avg.iter_weights())
    _same(got, want, kind)
    assert avg.weights_metadata() == _meta(got)
    for dtype in (torch.bfloat16, torch.float64):
        got = list(avg.iter_weights(dtype=dtype, bucket_bytes=64))
        _same(got, _cast(want, dtype), f"{kind} as {dtype}")
        assert avg.weights_metadata(dtype=dtype) == _meta(got)
    assert dict(got)["norm.num_batches_tracked"].dtype == torch.int64    # integer tensors never cast
    if kind == "ema":
        _same(list(avg.iter_weights(1)), {n: t for n, t in avg.full_state_dict(1).items() if n != "head.weight"},
              "row 1")


def test_a_consumers_copies_survive_a_swap_and_an_update_and_a_stream_is_of_one_state():
    torch.manual_seed(0)
    model = Tied()
    ema = EMA(model, 0.5)
    _train(model, ema)
    got = list(ema.iter_weights())
    kept = {n: t.clone() for n, t in got}
    with ema.average_parameters():
        for p in model.parameters():
            p.data.mul_(3)                                # the swapped-in average is written over
    _train(model, ema, seed=1)
    for n, t in got:
        assert torch.equal(t, kept[n]), n                 # fresh buffers: neither the swap nor the update wrote them
    it = ema.iter_weights()                               # consumed lazily, around an update
    first = next(it)
    copy_of_first = first[1].clone()
    _train(model, ema, steps=1, seed=2)
    assert torch.equal(first[1], copy_of_first)
    with pytest.raises(RuntimeError, match="streamed.*yielded so far are of the earlier"):
        next(it)
    with ema.average_parameters():                        # refused by name while swapped in
        with pytest.raises(RuntimeError, match="iter_weights"):
            ema.iter_weights()


def test_bad_arguments_are_refused_with_the_fix():
    model = Tied()
    ema = EMA(model, 0.9)
    for kwargs, match in ((dict(dtype="bfloat16"), "floating torch dtype"), (dict(dtype=torch.int32), "floating"),
                          (dict(bucket_bytes=8), "bytes >= 16"), (dict(bucket_bytes=True), "bytes"),
                          (dict(to=1), "outside the 1 rank"), (dict(to="rank0"), "'all'"), (dict(to=[]), "non-empty"),
                          (dict(to=True), "global rank")):
        with pytest.raises((TypeError, ValueError), match=match):
            ema.iter_weights(**kwargs)
    with pytest.raises(IndexError):
        ema.iter_weights(3)
    assert [n for n, _ in ema.iter_weights(to=[0])] == [m.name for m in ema.weights_metadata()]


def test_a_target_network_streams_its_target():
    torch.manual_seed(0)
    online = Tied()
    target = copy.deepcopy(online)
    net = TargetNetwork(online, target, tau=0.3)
    _train(online, net)
    want = {n: t for n, t in target.state_dict().items() if n != "head.weight"}
    got = list(net.iter_weights(dtype=torch.bfloat16))
    _same(got, _cast(want, torch.bfloat16), "target")
    assert net.weights_metadata(dtype=torch.bfloat16) == _meta(got)
    got = list(net.iter_weights())
    kept = {n: t.clone() for n, t in got}
    _train(online, net, seed=1)                           # the target is written in place: the copies are not
    assert all(torch.equal(t, kept[n]) for n, t in got)
    with pytest.raises(IndexError, match="one average"):
        net.iter_weights(1)
    it = net.iter_weights()                               # a hard update is a write of the target too
    next(it)
    net.hard_update()
    with pytest.raises(RuntimeError, match=r"changed while it was streamed \(update\(\) or hard_update\(\)"):
        next(it)


def test_posthoc_streams_a_synthesised_average_and_its_tracked_profiles(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=2, path=tmp_path)
    _train(model, ema, steps=6)
    want = ema.synthesize(0.07)
    want = {n: want[n] for n in model.state_dict() if n != "head.weight"}
    got = list(ema.iter_weights(0.07))
    _same(got, want, "synthesised")
    assert ema.weights_metadata(0.07) == _meta(got)
    got = list(ema.iter_weights(0.07, dtype=torch.bfloat16))
    _same(got, _cast(want, torch.bfloat16), "synthesised as bfloat16")
    assert ema.weights_metadata(0.07, dtype=torch.bfloat16) == _meta(got)
    _same(list(ema.iter_weights(row=1)), {n: t for n, t in ema.full_state_dict(1).items() if n != "head.weight"},
          "tracked profile 1")
    with pytest.raises(ValueError, match="not both"):
        ema.iter_weights(0.07, row=0)
    with pytest.raises(ValueError, match="give sigma_rel= or gamma="):   # no profile: refused as iter_weights does
        ema.weights_metadata()


def test_posthoc_synthesises_one_tensor_at_a_time_as_the_stream_is_consumed(tmp_path, request):
    """The synthesised stream never holds the whole average: nothing is combined when iter_weights()
    returns, each averaged tensor is combined when the stream reaches it, and when a tensor is yielded
    it is the only combined tensor alive (the consumer dropped the earlier ones)."""
    import gc
    import weakref

    from fastema.posthoc import _synthesis, read_snapshots

    torch.manual_seed(0)
    model = Tied()
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=2, path=tmp_path)
    _train(model, ema, steps=6)
    want = ema.synthesize(0.07)
    averaged = set(read_snapshots(tmp_path)[-1].averaged)
    made: list = []                                       # (name, weakref to the combined tensor)
    faults.held(request, _synthesis.watched(lambda name, out: made.append((name, weakref.ref(out)))))
    stream = ema.iter_weights(0.07)
    assert made == []                                     # the solution is ready, no tensor combined yet
    seen = []
    for name, t in stream:
        seen.append(name)
        assert torch.equal(_bits(t), _bits(want[name])), name
        gc.collect()
        assert [n for n, _ in made] == [n for n in seen if n in averaged], name         # each when reached
        alive = [n for n, r in made if r() is not None]
        assert alive == ([name] if made and made[-1][0] == name else []), (name, alive)
        del t
    assert seen == [n for n in model.state_dict() if n != "head.weight"]


def test_posthoc_stream_refuses_before_the_first_tensor_or_when_it_reaches_a_bad_one(tmp_path):
    """The arguments, the folder and the solution are refused when iter_weights() is called; a
    profile holding NaN in a later tensor when the stream reaches it, with synthesize()'s message,
    after the tensors before it were yielded."""
    torch.manual_seed(0)
    model = Tied()
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=2, path=tmp_path)
    with pytest.raises(FileNotFoundError, match="no snapshot"):     # nothing written yet: an empty folder
        ema.iter_weights(0.07)
    _train(model, ema, steps=4)
    with pytest.raises(ValueError, match="sigma_rel"):
        ema.iter_weights(5.0)
    with pytest.raises(ValueError, match="time must be a finite number"):
        ema.iter_weights(0.07, time=float("nan"))
    with pytest.raises(ValueError, match="max_error"):              # a target the snapshots cannot represent
        ema.iter_weights(0.25, max_error=1e-9)
    with torch.no_grad():
        model.body.bias[0] = float("nan")                # the last snapshot's body.bias: the third tensor
    _train(model, ema, steps=2)
    with pytest.raises(ValueError, match=r"the profile 0:body.bias holds inf or NaN") as whole:
        ema.synthesize(0.07)
    stream = ema.iter_weights(0.07)                       # no refusal yet: body.bias is not reached
    got = [next(stream)[0], next(stream)[0]]
    assert got == ["emb.weight", "body.weight"]
    with pytest.raises(ValueError) as streamed:
        next(stream)
    assert str(streamed.value) == str(whole.value)
    assert ema.synthesize(0.07, time=4, max_error=1.0)    # before it: whole again


def test_synthesize_iter_yields_synthesize_tensors_in_the_order_asked(tmp_path):
    from fastema import posthoc

    torch.manual_seed(0)
    model = Tied()
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=2, path=tmp_path)
    _train(model, ema, steps=6)
    for dtype in (None, torch.bfloat16):
        want = posthoc.synthesize(tmp_path, 0.07, dtype=dtype)
        _same(list(posthoc.synthesize_iter(tmp_path, 0.07, dtype=dtype)), dict(want), f"synthesize_iter {dtype}")
    order = ["norm.num_batches_tracked", "body.bias", "emb.weight"]
    _same(list(posthoc.synthesize_iter(tmp_path, gamma=7.0, order=order)),
          {n: posthoc.synthesize(tmp_path, gamma=7.0)[n] for n in order}, "ordered")
    with pytest.raises(ValueError, match=r"order names tensors the snapshots do not hold: \['nope'\]"):
        posthoc.synthesize_iter(tmp_path, 0.07, order=["emb.weight", "nope"])
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        posthoc.synthesize_iter(tmp_path, 0.07, dtype=torch.int8)


# ------------------------------------------------------------------ four gloo ranks

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 33), nn.ReLU(), nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 6))


def _steps(model: nn.Module, avgs: list, n: int = 3) -> None:
    """The same step on every rank (replicas stay equal), then each average's update: no collective."""
    for k in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(0.01 * (k + 1))
        for avg in avgs:
            with Counted() as c:
                avg.update()
            assert not c.calls, c.calls


def _split(rank, world):
    """shard_replicas on 4 ranks: the stream against full_state_dict (bit for bit, any bucket), one
    all-gather per bucket, to=, the metadata with no collective, the agreement's refusals."""
    from fastema.torch import ShardReplicas
    from fastema.torch._state.agree import Disagreement

    model = _mlp()
    split = EMA(model, [0.9, 0.5], shard_replicas=ShardReplicas(True, bucket=256))
    window = WindowAverage(model, 3, shard_replicas=True)
    offloaded = EMA(model, 0.9, shard_replicas=True, offload="cpu")
    # the same averages unsplit: full_state_dict() reads a split average through the stream's own code,
    # so each split stream is also held to the unsplit average (the split is bit for bit the unsplit one)
    unsplit = {split: EMA(model, [0.9, 0.5]), window: WindowAverage(model, 3), offloaded: EMA(model, 0.9)}
    _steps(model, [split, window, offloaded, *unsplit.values()])
    n = len(list(model.state_dict()))
    for avg in (split, window, offloaded):
        full = avg.full_state_dict()
        _same(list(avg.iter_weights(bucket_bytes=16)), unsplit[avg].full_state_dict(),
              f"{type(avg).__name__} against the unsplit average")
        specs = avg._side.specs
        held = [sum(specs[name].pieces[1][r][1] for name in specs) for r in range(world)]   # each rank's slice
        for bucket in (16, 1 << 8, 1 << 30):
            with Counted() as c:
                got = list(avg.iter_weights(bucket_bytes=bucket))
            _same(got, full, f"{type(avg).__name__} bucket {bucket}")
            # the agreement's one exchange, then one broadcast a bucket: each rank's slice in buckets of 4-byte values
            assert c.gathers() == 1 and c.calls.count("broadcast") == sum(-(-h * 4 // bucket) for h in held), \
                (bucket, held, c.calls)
    _same(list(split.iter_weights(1, dtype=torch.bfloat16, bucket_bytes=300)),
          _cast(split.full_state_dict(1), torch.bfloat16), "row 1 as bfloat16")
    with Counted() as c:
        meta = split.weights_metadata(dtype=torch.bfloat16)
    assert not c.calls and [m.name for m in meta] == list(full)
    with Counted() as c:
        to0 = list(split.iter_weights(to=0, bucket_bytes=1 << 12))
    assert (len(to0) == n) == (rank == 0) and (rank == 0 or not to0)
    out = {"to0_calls": torch.tensor(len(c.calls))}
    with pytest.raises(Disagreement, match="pass the same"):          # other arguments on one rank
        split.iter_weights(bucket_bytes=1 << 12 if rank else 1 << 13)
    refused = (TypeError, "floating torch dtype") if rank == 2 else (Disagreement, "refused on rank 2.*floating")
    with pytest.raises(refused[0], match=refused[1]):                  # one rank refuses: every rank raises
        split.iter_weights(dtype=torch.bfloat16 if rank != 2 else "bf16")
    it = split.iter_weights(bucket_bytes=256)                      # consumed lazily around an update on every rank
    name, first = next(it)
    kept = first.clone()
    _steps(model, [split], 1)
    assert torch.equal(first, kept)
    with pytest.raises(RuntimeError, match="changed while it was streamed"):
        next(it)                                                    # on every rank alike: no gather is left waiting
    if rank != 1:
        split.update()                                              # rank 1 skips an update
    with pytest.raises(Disagreement, match="skipped update"):
        split.iter_weights()
    return out


def test_split_over_replicas_streams_bucket_by_bucket(tmp_path):
    results = run_ranks(_split, tmp_path, 4, timeout=240)
    assert len({int(r["to0_calls"]) for r in results}) == 1           # every rank joins every collective


def _hsdp(rank, world):
    """HSDP 2x2: the split average (shard_replicas=True) and the unsplit one streamed against
    full_state_dict bit for bit; a sharded target network's target against its full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _mlp()
    target = _mlp()
    for m in (model, target):
        for layer in (m[0], m[2], m[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    split = EMA(model, 0.9, shard_replicas=True)
    whole = EMA(model, 0.9)
    net = TargetNetwork(model, target, tau=0.5)
    _steps(model, [split, whole, net])
    _same(list(split.iter_weights(bucket_bytes=16)), whole.full_state_dict(), "HSDP split against the unsplit")
    for avg in (split, whole):
        full = avg.full_state_dict()
        for bucket in (16, 1 << 20):
            _same(list(avg.iter_weights(bucket_bytes=bucket)), full, f"HSDP {bucket} split={avg is split}")
        _same(list(avg.iter_weights(dtype=torch.bfloat16)), _cast(full, torch.bfloat16), "HSDP bf16")
        with Counted() as c:
            meta = avg.weights_metadata()
        assert not c.calls and [tuple(m.shape) for m in meta] == [tuple(t.shape) for t in full.values()]
    with Counted() as c:
        list(split.iter_weights(bucket_bytes=1 << 20))
    want = {n: t.full_tensor() for n, t in target.state_dict().items()}
    _same(list(net.iter_weights()), want, "HSDP target")
    # round 7's HS02: rank 2 stops each stream early (a consumer that raises), the other three read
    # it whole, at once, and the next read works on every rank
    full = split.full_state_dict()
    for avg, right in ((split, full), (net, want)):
        t0 = time.monotonic()
        try:
            got = [] if rank == 2 else list(avg.iter_weights())
            for _ in avg.iter_weights() if rank == 2 else ():
                raise KeyError("an engine's name it does not know")
        except KeyError:
            pass
        assert time.monotonic() - t0 < 10, "a rank waited for the one that stopped"
        if rank != 2:
            _same(got, right, "HSDP: the whole stream beside a rank that stopped")
    _same(list(split.full_state_dict().items()), full, "HSDP: the next read")
    return {"calls": torch.tensor(len(c.calls)), "broadcasts": torch.tensor(c.calls.count("broadcast"))}


def test_hsdp_2x2_streams_bit_for_bit(tmp_path):
    results = run_ranks(_hsdp, tmp_path, 4, timeout=240, pg_timeout=30)
    assert len({int(r["calls"]) for r in results}) == 1 and int(results[0]["broadcasts"]) >= 2
