"""The ranks' agreement, one protocol for every collective read (``fastema/torch/_state/agree.py``):
on 2 gloo ranks of a split (``shard_replicas``) average,

- ranks making different reads (kind, direction or row) refuse on every rank, naming both reads, and
  nothing is read or changed (round 7's H1: a swap back paired with a ``copy_to()`` mixed raw and
  averaged slices silently);
- a failure on one rank of what a read allocates (the swap's raw window, the gather buckets, a
  stream's buffer and entries, a state dict's host copies, the saved file) is raised on every rank,
  at once, and the retry reads the average bit for bit, the model's raw weights intact (round 7's
  H2: the raw window allocated after the agreement; its retry wrote header bytes into another rank's
  weights);
- a received header that is no header, and sequence numbers that differ, are "collectives out of
  step" on the ranks in the exchange (never a refusal "on rank -4707031836776502990"), and the ranks
  count alike again after it.

Every collective times out after 30 s and each case's time is bounded far below that: a regression
is a failure, never a hang. The failures are injected in the test, on one rank, once: an allocation
(``fastema.torch._placement.gather.allocate``, where every buffer of a read comes from, or the raw
window's ``FlatShadow``), a host copy, a file write.
"""
from __future__ import annotations

import contextlib

import torch
from dist import run_ranks
from support import faults
from support.calls import watching

_COLLECTIVE_S = 30.0       # every collective's timeout in these worlds: a hang is an error, fast
_BOUND_S = 10.0            # a refusal reaches every rank within this (far below the timeout)


def _outcome(fn) -> tuple[str, str, float]:
    """What a rank got, its message followed by its causes' (the refusals here chain them)."""
    return faults.outcome(fn, causes=True)


def _trained(split=True):
    """A model, its split average and the unsplit one (the reference: the split one is it, bit for
    bit), two rows, after 3 steps."""
    from fastema.torch import EMA

    m = faults.model()
    ema, ref = EMA(m, [0.5, 0.9], shard_replicas=split), EMA(m, [0.5, 0.9])
    for i in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.9).add_(i / 10)
        ema.update()
        ref.update()
    return m, ema, ref


@contextlib.contextmanager
def _failing(function, when, exc: BaseException):
    """``function`` (a class: its ``__init__``) raising ``exc`` as it begins at the calls ``when(n)``
    picks (from 1), its calls watched (``tests/support/calls.py``), not replaced."""
    calls = [0]

    def call(args):
        calls[0] += 1
        if when(calls[0]):
            raise exc

    with watching(function.__init__ if isinstance(function, type) else function, on_call=call):
        yield calls


def _oom(what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"simulated: no memory for {what}")


# ------------------------------------------------------------------ H1: different reads

_NAMES = {"swap in": "swap() in of row 0", "swap in row 1": "swap() in of row 1",
          "copy_to": "copy_to() of row 0", "copy_to row 1": "copy_to() of row 1",
          "copy_to(export)": "full_state_dict() of row 0", "save": "save() of row 0",
          "full_state_dict": "full_state_dict() of row 0",
          "iter_weights": "iter_weights() of row 0",
          "state_dict(gathered)": "state_dict() gathered", "load_state_dict": "load_state_dict()",
          "averaged_state_dict": "averaged_state_dict() of row 0"}
_PAIRS = [("swap in", "copy_to"), ("swap in", "swap in row 1"), ("copy_to", "copy_to row 1"),
          ("full_state_dict", "save"), ("full_state_dict", "iter_weights"),
          ("copy_to(export)", "swap in"), ("state_dict(gathered)", "full_state_dict"),
          ("load_state_dict", "copy_to"), ("averaged_state_dict", "full_state_dict")]


def _different_reads(rank, world, root):
    """Rank 0 and rank 1 make different reads: every pair is refused on both ranks, naming both,
    within the bound, with nothing changed; then the same read on both works (the sequence numbers
    stayed equal)."""
    m, ema, ref = _trained()
    raw = faults.raw(m)
    export = faults.model()
    exported = faults.raw(export)
    state = ema.state_dict()
    reads = {
        "swap in": lambda: ema.swap(),
        "swap in row 1": lambda: ema.swap(1),
        "copy_to": lambda: ema.copy_to(),
        "copy_to row 1": lambda: ema.copy_to(row=1),
        "copy_to(export)": lambda: ema.copy_to(export),
        "full_state_dict": lambda: ema.full_state_dict(),
        "save": lambda: ema.save(f"{root}/different.safetensors"),
        "iter_weights": lambda: list(ema.iter_weights()),
        "state_dict(gathered)": lambda: ema.gathered_state_dict(),
        "load_state_dict": lambda: ema.load_state_dict(state),
        "averaged_state_dict": lambda: ema.averaged_state_dict(),
    }
    out = {}
    for pair in _PAIRS:
        kind, msg, s = _outcome(reads[pair[rank]])
        both = all(f"EMA.{_NAMES[p]}" in msg for p in pair) and "different reads" in msg
        intact = faults.same(raw, faults.raw(m)) and faults.same(exported, faults.raw(export))
        out[" / ".join(pair)] = (kind, both, s, intact, ema.swapped)
    # round 7's A01: rank 0 evaluates alone (swap, swap) while rank 1 exports (copy_to, copy_to)
    for attempt in range(2):
        kind, msg, s = _outcome(ema.swap if rank == 0 else ema.copy_to)
        both = "EMA.swap() in of row 0" in msg and "EMA.copy_to() of row 0" in msg
        out[f"A01 {attempt}"] = (kind, both, s, faults.same(raw, faults.raw(m)), ema.swapped)
    # a swap back paired with a copy_to(): rank 1 refuses its own (it is swapped), and rank 0 says
    # that its model still holds the average, as it does
    with ref.average_parameters():
        averaged = faults.raw(m)
    ema.swap()
    kind, msg, s = _outcome(ema.swap if rank == 0 else ema.copy_to)
    said = (["EMA.swap() back of row 0", "EMA.copy_to() of row 0", "still holds the average"]
            if rank == 0 else ["copy_to() while the EMA weights are swapped"])
    out["swap back / copy_to"] = (kind, all(w in msg for w in said), s, faults.same(averaged, faults.raw(m)),
                                  not ema.swapped)
    ema.swap()                                   # every rank: the raw weights back
    with ema.average_parameters():               # and the reads work again, bit for bit
        inside = faults.raw(m)
    return {"cases": out, "after": (faults.same(raw, faults.raw(m)), faults.same(inside, averaged),
                                    faults.same(ema.full_state_dict(1), ref.full_state_dict(1)),
                                    ema._checkpoint.agreement.sequence.count)}


def test_ranks_making_different_reads_refuse_on_every_rank_naming_both(tmp_path):
    ranks = run_ranks(_different_reads, tmp_path, 2, str(tmp_path), timeout=300,
                      pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        for case, (kind, both, s, intact, swapped) in ranks[r]["cases"].items():
            want = "RuntimeError" if case == "swap back / copy_to" else "Disagreement"
            assert (kind, both, intact, swapped) == (want, True, True, False), (r, case, kind)
            assert s < _BOUND_S, (r, case, s)
        assert ranks[r]["after"][:3] == (True, True, True), (r, ranks[r]["after"])
    assert ranks[0]["after"][3] == ranks[1]["after"][3]       # the sequence numbers advanced alike
    assert not (tmp_path / "different.safetensors").exists()


# ------------------------------------------------------------------ H2 and every read's retry


def _swap_in_raw_window(rank, world, root):
    """Round 7's H2 (A08, A08b): the swap's raw window cannot be allocated on rank 1, inside
    ``average_parameters()``, which each rank retries: the first attempt is refused on both ranks at
    once (rank 1 its own out-of-memory error, rank 0 a Disagreement naming rank 1 and its reason),
    the retry evaluates the average bit for bit, and the raw weights come back."""
    from fastema.torch import ShardReplicas
    from fastema.torch._placement import split as splits  # where a split makes its raw window

    out = {}
    for case, split in (("A08", True), ("A08b bucket 1024", ShardReplicas(True, bucket=1024))):
        m, ema, ref = _trained(split)
        raw = faults.raw(m)
        with ref.average_parameters(1):
            want = faults.raw(m)
        errors, inside = [], []
        with _failing(splits.FlatShadow, lambda n: rank == 1 and n == 1, _oom("the window")):
            for _ in range(2):
                kind, msg, s = _outcome(lambda: _evaluate(ema, m, 1, inside))
                errors.append((kind, msg[:300], s))
                if kind == "ok":
                    break
        right = len(inside) == 1 and faults.same(inside[0], want)
        out[case] = (errors, right, faults.same(raw, faults.raw(m)), ema.swapped)
    return {"cases": out}


def _evaluate(ema, m, row, inside: list) -> None:
    with ema.average_parameters(row):
        inside.append(faults.raw(m))


def test_a_swap_whose_raw_window_fails_on_one_rank_is_refused_on_every_rank_and_retried(tmp_path):
    ranks = run_ranks(_swap_in_raw_window, tmp_path, 2, str(tmp_path), timeout=300,
                      pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        for case, (errors, right, intact, swapped) in ranks[r]["cases"].items():
            assert len(errors) == 2 and errors[1][0] == "ok", (r, case, errors)
            kind, msg, s = errors[0]
            want = "OutOfMemoryError" if r == 1 else "Disagreement"
            assert kind == want and "the window" in msg and s < _BOUND_S, (r, case, errors[0])
            assert r == 1 or "refused on rank 1" in msg, (r, case, msg)
            assert right and intact and not swapped, (r, case)


def _retries(rank, world, root):
    """A one-rank failure of every read, then the retry on every rank: swap in and back, copy_to,
    full_state_dict (its buffer; an entry mid-stream), state_dict(gathered), save (rank 1's buffer;
    the writer's file), load_state_dict, iter_weights (its buffer; an entry mid-stream)."""
    from safetensors.torch import load_file

    from fastema.torch._placement import gather
    from fastema.torch._state import checkpoint

    m, ema, ref = _trained()
    raw, state = faults.raw(m), ema.state_dict()
    with ref.average_parameters():
        averaged = faults.raw(m)
    full, gathered = ref.full_state_dict(), ref.state_dict()["averaged"]
    out: dict = {}
    got: dict = {}
    streamed: list = []

    def case(name, read, check, module=gather, attr="allocate", on=1, at=1, exc=None):
        """``module.attr`` fails at its ``at``-th call on rank ``on`` (``allocate``: 1 the read's
        buffers, 2 its first kept entry, mid-stream), then every rank retries."""
        when = lambda n: rank == on and n == at                 # noqa: E731
        with _failing(getattr(module, attr), when, exc or _oom(name)) as calls:
            failed = _outcome(read)
        retried = _outcome(read)
        out[name] = (*failed, calls[0] >= at or rank != on, retried[:2], check())

    case("swap in", ema.swap, lambda: ema.swapped and faults.same(averaged, faults.raw(m)))
    case("swap back", ema.swap, lambda: not ema.swapped and faults.same(raw, faults.raw(m)))
    case("copy_to", ema.copy_to, lambda: faults.same(averaged, faults.raw(m)))
    m.load_state_dict(raw)
    case("full_state_dict", lambda: got.update(ema.full_state_dict()), lambda: faults.same(full, got))
    case("full_state_dict mid-stream", lambda: got.update(ema.full_state_dict()),
         lambda: faults.same(full, got), at=2)
    case("state_dict(gathered)", lambda: got.update(ema.gathered_state_dict()),
         lambda: faults.same(got["averaged"], gathered), module=checkpoint, attr="staged")
    path, path2 = f"{root}/retried.safetensors", f"{root}/written.safetensors"
    case("save", lambda: ema.save(path), lambda: rank == 1 or faults.same(load_file(path), full))
    case("save: the writer's file", lambda: ema.save(path2),
         lambda: rank == 1 or faults.same(load_file(path2), full), module=checkpoint,
         attr="_atomic_write", on=0, exc=OSError(28, "simulated: No space left on device"))
    case("load_state_dict", lambda: ema.load_state_dict(state),
         lambda: faults.same(full, ema.full_state_dict()), module=checkpoint, attr="local_part")
    case("iter_weights", lambda: streamed.append(list(ema.iter_weights())),
         lambda: faults.same(dict(streamed[-1]), full))
    case("iter_weights mid-stream", lambda: streamed.append(list(ema.iter_weights())),
         lambda: faults.same(dict(streamed[-1]), full), at=2)
    return {"cases": out, "after": (faults.same(raw, faults.raw(m)), ema.swapped,
                                    ema._checkpoint.agreement.sequence.count)}


def test_a_one_rank_failure_of_every_read_is_raised_on_every_rank_and_the_retry_works(tmp_path):
    ranks = run_ranks(_retries, tmp_path, 2, str(tmp_path), timeout=300, pg_timeout=_COLLECTIVE_S)
    for r in (0, 1):
        assert ranks[r]["after"][:2] == (True, False), (r, ranks[r]["after"])
        for name, (kind, msg, s, injected, retried, right) in ranks[r]["cases"].items():
            assert injected and retried == ("ok", "") and right, (r, name, kind, msg, retried)
            assert s < _BOUND_S, (r, name, s)
            failing = 0 if name == "save: the writer's file" else 1
            if name == "iter_weights mid-stream":        # a stream: rank 1's error its own, no hang
                assert kind == ("OutOfMemoryError" if r == 1 else "ok"), (r, name, kind, msg)
            elif r == failing:                           # its own error (the read's words around)
                assert kind in ("OutOfMemoryError", "OSError", "RuntimeError"), (r, name, kind)
                assert "simulated" in msg, (r, name, msg)
            else:                                        # the same failure, named, on the other
                assert kind in ("Disagreement", "RuntimeError"), (r, name, kind)
                assert f"refused on rank {failing}" in msg and "simulated" in msg, (r, name, msg)
    assert ranks[0]["after"][2] == ranks[1]["after"][2]   # the sequence numbers advanced alike


# ------------------------------------------------------------------ out of step


def _out_of_step(rank, world, root):
    """The agreement's own cases: a rank inside a gather of the header's size while the other makes
    an exchange (no header: out of step, naming both reads, not counted), ranks whose counts differ
    (out of step, then counted alike), a refusal (every rank counts it), other reads."""
    import torch.distributed as dist

    from fastema.torch._state.agree import SIZE, Read, Sequence, Stamp, agree

    group = [(dist.group.WORLD, "cpu")]
    read = Read("copy_to()", row=0, owner="EMA")
    out = {}
    seq = Sequence()
    seq.count, seq.last = 6, "EMA.swap() in of row 0"
    if rank == 0:                    # rank 1 is still in a gather bucket of the header's size
        out["no header"] = _outcome(lambda: agree(group, read, Stamp(3), seq))
    else:
        got = torch.empty(2 * SIZE // 4)
        dist.all_gather_into_tensor(got, torch.linspace(-3.0, 7.0, SIZE // 4))
        out["no header"] = ("data", "", 0.0)
    out["count after no header"] = (seq.count, "", 0.0)
    seq.count = 6 if rank == 0 else 4                      # a read ran on rank 0 only, twice
    out["counts differ"] = _outcome(lambda: agree(group, read._replace(row=rank), Stamp(3), seq))
    out["count after"] = (seq.count, "", 0.0)
    out["in step again"] = _outcome(lambda: agree(group, read, Stamp(3), seq))
    refusal = "no file" if rank else None
    out["refused"] = _outcome(lambda: agree(group, read, Stamp(3), seq, refusal))
    out["count after refused"] = (seq.count, "", 0.0)
    back = read._replace(kind="swap()", direction="back")
    out["differ"] = _outcome(lambda: agree(group, read if rank else back, Stamp(3), seq))
    out["last"] = (0, seq.last, 0.0)
    return {"cases": out}


def test_collectives_out_of_step_are_named_and_the_ranks_count_alike_again(tmp_path):
    ranks = run_ranks(_out_of_step, tmp_path, 2, str(tmp_path), timeout=120,
                      pg_timeout=_COLLECTIVE_S)
    kind, msg, _ = ranks[0]["cases"]["no header"]
    assert kind == "Disagreement" and "collectives out of step" in msg, msg
    assert "received no agreement's header from rank 1" in msg and "refused on rank" not in msg, msg
    assert "EMA.copy_to() of row 0" in msg and "EMA.swap() in of row 0" in msg, msg
    assert ranks[0]["cases"]["count after no header"][0] == 6          # not paired: not counted
    for r in (0, 1):
        c = ranks[r]["cases"]
        kind, msg, s = c["counts differ"]
        assert kind == "Disagreement" and "collectives out of step" in msg, (r, msg)
        assert "rank 1 makes read 5" in msg and "rank 0 read 7" in msg, (r, msg)
        assert "EMA.copy_to() of row 1" in msg and "EMA.copy_to() of row 0" in msg, (r, msg)
        assert c["count after"][0] == 7 and c["in step again"][0] == "ok", (r, c)
        kind, msg, _ = c["refused"]
        assert kind == "Disagreement" and "refused on rank 1" in msg and "no file" in msg, (r, msg)
        assert c["count after refused"][0] == 9, (r, c)
        kind, msg, _ = c["differ"]
        assert kind == "Disagreement" and "EMA.swap() back of row 0 on rank 0" in msg and \
            "EMA.copy_to() of row 0 on rank 1" in msg, (r, msg)
        assert c["last"][1] == "EMA.copy_to() of row 0", (r, c["last"])
