"""The faces over the torch average with ``shard_replicas`` (issue 43 item 6): ``PostHocEMA`` (each
rank writes the snapshot pieces it owns; the synthesis reads them all) and ``WindowAverage`` (the
window's ring and sums split like an EMA's rows), on 2 gloo ranks (tests/dist.py), against the
unsplit face bit for bit; and the flat ranges a per-rank file records
(``SplitEntry.flat_range``)."""
from __future__ import annotations

import os

import pytest
import torch
from dist import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from test_replicas import Counted, _same


def _ddp_model():
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.LayerNorm(33), torch.nn.ReLU(),
                                torch.nn.Linear(33, 5))
    return model, DDP(model)


def _posthoc(rank, world, folder):
    import torch.distributed.checkpoint as dcp

    from fastema.torch import PostHocEMA

    model, ddp = _ddp_model()
    split = PostHocEMA(ddp, (0.05, 0.2), snapshot_every=4, path=os.path.join(folder, "split"), shard_replicas=True)
    whole = PostHocEMA(ddp, (0.05, 0.2), snapshot_every=4, path=os.path.join(folder, f"whole{rank}"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(rank)
    for _ in range(12):
        ddp(torch.randn(4, 9, generator=data)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with Counted() as c:
            split.update()          # the folder checked at the first update; then none between snapshots
        whole.update()
        assert not c.calls or split.updates % 4 == 0 or split.updates == 1, c.calls
    assert split.nbytes < whole.nbytes
    for sigma_rel in (0.05, 0.1, 0.15):
        _same(split.synthesize(sigma_rel, max_error=1.0), whole.synthesize(sigma_rel, max_error=1.0),
              f"synthesised {sigma_rel}")
    _same(split.full_state_dict(1), whole.full_state_dict(1), "profile 1")
    snapshot = sorted(n for n in os.listdir(os.path.join(folder, "split")) if not n.endswith((".json", "run")))[-1]
    meta = dcp.FileSystemReader(os.path.join(folder, "split", snapshot)).read_metadata()
    held = {k: sum(int(torch.Size(c.sizes).numel()) for c in m.chunks)
            for k, m in meta.state_dict_metadata.items() if hasattr(m, "chunks")}
    whole_sizes = {k: int(m.size.numel()) for k, m in meta.state_dict_metadata.items() if hasattr(m, "chunks")}
    return {"held": torch.tensor(list(held.values())), "sizes": torch.tensor(list(whole_sizes.values())),
            "chunks": torch.tensor([len(m.chunks) for m in meta.state_dict_metadata.values() if hasattr(m, "chunks")])}


@pytest.mark.slow
def test_posthoc_split_over_replicas_writes_each_element_once_and_synthesises_the_unsplit_profiles(tmp_path):
    results = run_ranks(_posthoc, tmp_path / "run", 2, str(tmp_path))
    r = results[0]
    assert torch.equal(r["held"], r["sizes"])             # every element written once, by the rank holding it
    assert int(r["chunks"].max()) > 1                     # and the big tensors by both ranks


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_a_flat_range_cut_into_rectangles_is_found_again(shape, data):
    from fastema.torch._state.slices import SplitEntry, rects

    n = int(torch.Size(shape).numel())
    first = data.draw(st.integers(0, n))
    last = data.draw(st.integers(first, n))
    pieces = [([0, *o], torch.zeros((2, *s))) for o, s in rects(first, last, tuple(shape))]
    got = SplitEntry(pieces, (2, *shape), torch.float32).flat_range()
    assert got == ((first, last - first) if last > first else (0, 0))


def test_rectangles_not_one_flat_range_have_none():
    from fastema.torch._state.slices import SplitEntry

    block = SplitEntry([([0, 0, 2], torch.zeros((1, 2, 2)))], (1, 3, 4), torch.float32)  # 2 x half
    assert block.flat_range() is None
    apart = SplitEntry([([0, 0, 0], torch.zeros((1, 1, 4))), ([0, 2, 0], torch.zeros((1, 1, 4)))],
                       (1, 3, 4), torch.float32)                                   # rows 0 and 2
    assert apart.flat_range() is None


def _window(rank, world, folder):
    import torch.distributed.checkpoint as dcp

    from fastema.torch import ShardReplicas, WindowAverage

    out = {}
    for case, kwargs in enumerate([dict(window=None), dict(window=3), dict(window=4, ring_dtype="bfloat16", every=2)]):
        model, ddp = _ddp_model()
        split = WindowAverage(ddp, **kwargs, shard_replicas=ShardReplicas(True, bucket=256))
        whole = WindowAverage(ddp, **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(rank)
        for _ in range(9):                                 # past the ring's wrap and its sum's rebuild
            ddp(torch.randn(4, 9, generator=data)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            with Counted() as c:
                split.update()
            assert not c.calls, c.calls
            whole.update()
        assert split.nbytes < whole.nbytes and sum(split.memory().values()) == split.nbytes
        _same(split.averaged_state_dict(), whole.averaged_state_dict(), f"case {case}: averaged_state_dict")
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        with split.average_parameters():
            got = {k: v.clone() for k, v in model.state_dict().items()}
        with whole.average_parameters():
            want = {k: v.clone() for k, v in model.state_dict().items()}
        _same(got, want, f"case {case}: swapped-in mean")
        _same(dict(model.state_dict()), raw, f"case {case}: raw weights back")
        ckpt = os.path.join(folder, f"ckpt{case}")
        dcp.save({"avg": split}, checkpoint_id=ckpt)
        for into in (WindowAverage(ddp, **kwargs, shard_replicas=True), WindowAverage(ddp, **kwargs)):
            dcp.load({"avg": into}, checkpoint_id=ckpt)
            assert into.snapshots == whole.snapshots
            for _ in range(2):                             # the ring and the sums came back too
                into.update()
            out[f"{case}{len(out)}"] = torch.cat([v.flatten() for v in into.full_state_dict().values()])
        for _ in range(2):
            whole.update()
        out[f"want{case}"] = torch.cat([v.flatten() for v in whole.full_state_dict().values()])
    return out


@pytest.mark.slow
def test_window_average_split_over_replicas_equals_the_unsplit_one_and_reshards(tmp_path):
    """SWA (window=None) and windows of 3 and 4 (a bfloat16 ring, every=2): the split mean equals the
    unsplit one bit for bit, with no collective per update, the swap restores the raw weights, and a DCP
    checkpoint of the slices (the ring's included) loads into a split and an unsplit average that go on
    alike."""
    results = run_ranks(_window, tmp_path / "run", 2, str(tmp_path))
    for r in results:
        for key in (k for k in r if not k.startswith("want")):
            assert torch.equal(r[key], r[f"want{key[0]}"]), key
