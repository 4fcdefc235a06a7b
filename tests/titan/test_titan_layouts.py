"""``build(layouts=...)`` (plain local shards: torchtitan's spmd_types backend) checked against the local
shard at build (review 9 M-3): a layout the shard does not fit, a ``Shard`` dim out of range or a malformed
entry is refused by name; a layout that fits saves and resumes bit for bit. One rank here (a gloo group of
one, FileStore in tmp_path); uneven shards on two ranks: test_titan_manager.py. The shard arithmetic
against ``torch.chunk`` of a real tensor. Imports no torchtitan."""
import datetime

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastema.torchtitan import EMA

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture
def mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _bad(mesh):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import Partial

    where = r"layouts\['weight'\]"
    return [
        ((mesh, [Shard(0)], (2, 2)), where + r": \[Shard\(dim=0\)\] of global shape \(2, 2\) give this rank "
                                     r"\(mesh coordinate \[0\]\) a shard of shape \(2, 2\), but its local "
                                     r"tensor has shape \(4, 4\): give the global shape of the whole"),
        ((mesh, [Replicate()], (8, 8, 8)), where + r": \[Replicate\(\)\] of global shape \(8, 8, 8\) give .* "
                                           r"shape \(8, 8, 8\), but its local tensor has shape \(4, 4\)"),
        ((mesh, [Shard(0)], (4, 4, 1)), r"a shard of shape \(4, 4, 1\), but its local tensor has shape \(4, 4\)"),
        ((mesh, [Shard(5)]), where + r": Shard\(dim=5\) \(mesh dim 0\) shards dim 5 of a 2-D tensor: give a "
                                     r"dim in \[-2, 2\)"),
        ((mesh, [Shard(-3)], (4, 4)), r"shards dim -3 of a 2-D tensor"),
        ((mesh, [Shard(2)], (4, 4, 1)), r"a shard of shape \(4, 4, 1\)"),
        ((mesh, [Shard(0), Shard(1)]), where + r" gives 2 placements for a 1-D mesh: give one per mesh dim"),
        ((mesh, [Partial()]), r"the placement Partial\(.*\) \(mesh dim 0\) is neither Shard\(dim\) nor Replicate"),
        ((mesh, [0]), r"the placement 0 \(mesh dim 0\) is neither"),
        ((mesh, "S0"), r"the placements must be a list, one per mesh dim, got 'S0'"),
        (("cpu", [Shard(0)]), where + r": the mesh must be a DeviceMesh .*, got str"),
        ((mesh, [Shard(0)], (4, -4)), r"the global shape must be a sequence of ints >= 0 .*, got \(4, -4\)"),
        ((mesh, [Shard(0)], (4.0, 4)), r"the global shape must be a sequence of ints >= 0"),
        ((mesh,), where + r" must be \(mesh, placements\) or \(mesh, placements, global_shape\)"),
    ]


@needs_gloo
def test_a_layout_that_does_not_fit_the_local_shard_is_refused_by_name(mesh):
    """Before the check a (2, 2) global shape over a (4, 4) shard built, saved, and resumed the corner with the
    rest zeros; ``Shard(5)`` raised a raw IndexError."""
    m = nn.Linear(4, 4, bias=False)
    before = m.weight.detach().clone()
    for layout, match in _bad(mesh):
        with pytest.raises(ValueError, match=match):
            EMA.Config(decays=[0.9]).build(model_parts=[m], layouts={"weight": layout})
    assert torch.equal(m.weight, before)


@needs_gloo
def test_a_layout_that_fits_saves_and_resumes_bit_for_bit(mesh, tmp_path):
    """A negative ``Shard`` dim is taken as DTensor takes it (``Shard(-1)`` of a 2-D tensor: ``Shard(1)``), so the
    checkpoint's placements are the ones a load compares."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    torch.manual_seed(0)
    m = nn.Linear(4, 3, bias=False)
    ema = EMA.Config(decays=[0.9]).build(model_parts=[m], layouts={"weight": (mesh, [Shard(-1)], (3, 4))})
    assert ema.tracked[0].layout[1:] == ((Shard(1),), (3, 4), (4, 1))
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.step(1)
    value = ema.state_dict()["state.weight.ema_params.decay_0p9"]
    assert isinstance(value, DTensor) and value.placements == (Shard(1),) and value.shape == (3, 4)
    dcp.save({"ema": ema}, checkpoint_id=str(tmp_path / "ckpt"))
    saved = ema.shadow.view("weight", 0).clone()
    with torch.no_grad():
        ema.shadow.view("weight", 0).zero_()
    dcp.load({"ema": ema}, checkpoint_id=str(tmp_path / "ckpt"))
    assert torch.equal(ema.shadow.view("weight", 0), saved)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_shard_a_rank_holds_is_torch_chunks_piece(data):
    """``shard_shape`` against ``torch.chunk`` applied mesh dim by mesh dim to a real tensor (DTensor's
    ``Shard``: the last chunks shorter or empty)."""
    from fastema.torchtitan._layouts import shard_shape

    shape = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
    mesh_sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    dims = [data.draw(st.none() | st.integers(0, len(shape) - 1)) for _ in mesh_sizes]
    coordinate = [data.draw(st.integers(0, n - 1)) for n in mesh_sizes]
    piece = torch.empty(shape)
    for n, dim, at in zip(mesh_sizes, dims, coordinate):
        if dim is not None:
            chunks = piece.chunk(n, dim) if piece.shape[dim] else ()
            piece = chunks[at] if at < len(chunks) else piece.narrow(dim, 0, 0)
    assert shard_shape(shape, mesh_sizes, dims, coordinate) == tuple(piece.shape)
