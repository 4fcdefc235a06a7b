"""Streams end on every rank (round 7's H3): a stream of a split or sharded average closed early on
one rank (a ``break``, a consumer that raises, an iterator dropped before or after its first item,
``close()``) reads the rest of its collectives there without yielding, so the other ranks get the
whole stream at once and the next read works on every rank; the consumer's own exception is raised
unchanged. The same through every form that consumes a stream: the engines' adapters
(``named_tensor_buckets``, ``flattened_buckets``, ``WeightSource``, ``load_weights``), each closing
a stream the caller still holds, and the streams of ``WindowAverage``, ``PostHocEMA`` (a tracked
profile) and a sharded ``TargetNetwork``.

2 gloo ranks; every collective times out after 30 s and each stream's time is bounded far below that
(a rank left waiting in a broadcast would take the collective timeout): a regression is a failure,
never a hang. The HSDP (2 x 2 mesh) case is in ``tests/torch/state/test_stream.py``'s 4-rank world.
"""
from __future__ import annotations

import copy
import time

import torch
from dist import run_ranks

_COLLECTIVE_S = 30.0       # every collective's timeout in these worlds
_BOUND_S = 10.0            # a stream and the next read finish within this on every rank


def _six_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(6)])


def _same(a, b) -> bool:
    a, b = dict(a), dict(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step(model, k: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9).add_(k / 10)


class _Stop(KeyError):
    """What a consumer raises (an engine's ``load_weights`` meeting a name it does not know)."""


def _stop(stream, mode: str, err: BaseException) -> None:
    """A consumer of ``stream()`` (a new stream) stopping after its first item as ``mode`` says."""
    if mode in ("break", "every rank breaks"):
        for _ in stream():
            break
    elif mode == "raise":
        for _ in stream():
            raise err
    elif mode == "dropped":
        it = stream()
        next(it)
        del it
    elif mode == "dropped unstarted":
        it = stream()
        del it
    elif mode == "close":
        it = stream()
        next(it)
        it.close()


_MODES = ("break", "raise", "dropped", "dropped unstarted", "close", "every rank breaks")


def _run(rank: int, stream, mode: str, read, want) -> tuple:
    """Rank 1 stops ``stream()`` as ``mode`` says (rank 0 too for "every rank breaks"), rank 0 reads
    it whole; then ``read()`` on every rank. ``(the consumer's error unchanged, seconds of the
    stream, the stream whole on rank 0, seconds of the next read, the next read right)``."""
    err = _Stop("an engine's name it does not know")
    expected = want()                        # on every rank (a sharded target's is a collective)
    got: list = []
    stops = rank == 1 or mode == "every rank breaks"
    t0 = time.monotonic()
    try:
        if stops:
            _stop(stream, mode, err)
        else:
            got = list(stream())
        caught = None
    except _Stop as e:
        caught = e
    streamed = time.monotonic() - t0
    if (rank, mode) == (1, "raise"):         # the consumer's own, unchanged: nothing chained to it
        own = caught is err and err.__context__ is None and err.__cause__ is None
    else:
        own = caught is None
    t0 = time.monotonic()
    again = read()
    whole = stops or _same(got, expected)
    return own, streamed, whole, time.monotonic() - t0, _same(again, expected)


def _check(ranks) -> None:
    for r in (0, 1):
        for case, (own, streamed, whole, again_s, again) in ranks[r]["cases"].items():
            assert own and whole and again, (r, case, own, whole, again)
            assert streamed < _BOUND_S and again_s < _BOUND_S, (r, case, streamed, again_s)


def _early_stops(rank, world, root):
    """A split EMA's iter_weights stopped early on rank 1 in every way; WindowAverage's and
    PostHocEMA's (a tracked profile) broken off; each then read whole on every rank."""
    from fastema.torch import EMA, PostHocEMA, WindowAverage

    m = _six_layers()
    ph = dict(sigma_rels=(0.05, 0.1), snapshot_every=None)
    faces = {"EMA": (EMA(m, 0.5, shard_replicas=True), EMA(m, 0.5), 0),
             "WindowAverage": (WindowAverage(m, 3, shard_replicas=True), WindowAverage(m, 3), 0),
             "PostHocEMA": (PostHocEMA(m, **ph, path=f"{root}/ph{rank}", shard_replicas=True),
                            PostHocEMA(m, **ph, path=f"{root}/whole{rank}"), 1)}
    for k in range(2):
        _step(m, k)
        for avg, ref, _ in faces.values():
            avg.update()
            ref.update()
    out = {}
    for face, (avg, ref, row) in faces.items():
        for mode in _MODES if face == "EMA" else ("raise",):
            stream = lambda a=avg, r=row: a.iter_weights(row=r, bucket_bytes=64)   # noqa: E731
            read = lambda a=avg, r=row: a.full_state_dict(r)                       # noqa: E731
            want = lambda a=ref, r=row: a.full_state_dict(r)                       # noqa: E731
            out[f"{face} {mode}"] = _run(rank, stream, mode, read, want)
    return {"cases": out}


def test_a_stream_stopped_early_on_one_rank_ends_on_every_rank(tmp_path):
    _check(run_ranks(_early_stops, tmp_path, 2, str(tmp_path), timeout=300,
                     pg_timeout=_COLLECTIVE_S))


def _adapters(rank, world, root):
    """The engines' adapters stopped early on rank 1 while the caller still holds the stream (each
    closes it), and a sharded TargetNetwork's stream broken off."""
    from torch.distributed.fsdp import fully_shard

    from fastema.torch import EMA, TargetNetwork, engines

    m = _six_layers()
    ema, ref = EMA(m, 0.5, shard_replicas=True), EMA(m, 0.5)
    _step(m, 1)
    ema.update()
    ref.update()
    held: list = []                          # the caller's reference to each stream: kept

    def stream():
        held.append(ema.iter_weights(bucket_bytes=64))
        return held[-1]

    def buckets():
        return (pair for bucket in engines.named_tensor_buckets(stream(), 200) for pair in bucket)

    def unpacked():                          # SGLang's side: each tensor sliced out of its bucket
        for bucket in engines.flattened_buckets(stream(), 200, multi_dtype=True):
            for meta in bucket["metadata"]:
                flat = bucket["flattened_tensor"][meta.start_idx:meta.end_idx]
                yield meta.name, flat.view(meta.dtype).view(meta.shape)

    adapters = {"named_tensor_buckets": buckets, "flattened_buckets": unpacked,
                "WeightSource": lambda: iter(engines.WeightSource(ema, bucket_bytes=64))}
    out = {}
    for name, make in adapters.items():
        for mode in ("raise", "break"):
            out[f"{name} {mode}"] = _run(rank, make, mode, ema.full_state_dict, ref.full_state_dict)

    def loader(weights):
        for _ in weights:
            raise _Stop("load_weights: an unknown name")

    model = type("Engine", (), {"load_weights": staticmethod(loader if rank == 1 else list)})()
    t0 = time.monotonic()
    kind = _outcome(lambda: engines.load_weights(model, stream()))
    right = kind == ("_Stop" if rank == 1 else "ok")
    out["load_weights"] = (right, time.monotonic() - t0, True, 0.0,
                           _same(ema.full_state_dict(), ref.full_state_dict()))
    online = _six_layers()
    target = copy.deepcopy(online)
    for net in (online, target):
        fully_shard(net)
    tn = TargetNetwork(online, target, tau=0.5)
    tn.update()
    full = lambda: {n: p.full_tensor() for n, p in target.state_dict().items()}   # noqa: E731
    out["TargetNetwork"] = _run(rank, tn.iter_weights, "raise", lambda: dict(tn.iter_weights()),
                                full)
    return {"cases": out}


def _outcome(fn) -> str:
    try:
        fn()
    except _Stop:
        return "_Stop"
    return "ok"


def test_the_engines_adapters_and_a_sharded_target_close_a_stream_stopped_early(tmp_path):
    _check(run_ranks(_adapters, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S))
