"""Every shadow class holds to the protocols of :mod:`fastema._shadow`: what the engine's update
driver calls (``Updatable``), what a face reads (``Shadow``), or both (``AveragingShadow``). The
optional members come from ``Capabilities`` with their defaults, so a face never probes a shadow
with ``getattr`` (tests/test_architecture.py holds that)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from dist import run_ranks

from fastema import FlatShadow, WindowShadow
from fastema._shadow import AveragingShadow, Capabilities, Shadow, Updatable, WindowingShadow
from fastema.pairs import PairShadow


def members(proto) -> set[str]:
    """The names a protocol declares (its annotations, methods and properties, its bases' too)."""
    out: set[str] = set()
    for cls in proto.__mro__:
        if cls in (object,) or cls.__name__ in ("Protocol", "Generic"):
            continue
        out |= set(getattr(cls, "__annotations__", {}))
        out |= {k for k, v in vars(cls).items() if not k.startswith("_") and (callable(v) or isinstance(v, property))}
    return out | ({"__len__"} if "__len__" in vars(Shadow) and proto is not Updatable else set())


def missing(obj, proto) -> list[str]:
    return sorted(m for m in members(proto) if not hasattr(obj, m))


def test_the_protocols_list_what_the_engine_and_faces_call():
    assert {"update_checked", "folds_later", "queued", "scan_groups", "bias_correct"} <= members(Updatable)
    assert {"exact_swap", "in_place", "group", "split_id", "join", "parts", "written", "backup",
            "swap", "copy_to_sources", "view", "state_view", "retarget"} <= members(Shadow)
    assert members(Shadow) | members(Updatable) <= members(AveragingShadow)


def sources(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(5 + i, generator=g) for i in range(n)}


def offloaded(src):
    from fastema.torch._placement.offload import OffloadedShadow

    return OffloadedShadow(src, rows=2, dtype="float32", chunk=64)


def host_masters(src):
    from fastema.torch._placement.host_masters import HostMastersShadow

    return HostMastersShadow(src, rows=1, dtype="float32")


@pytest.mark.parametrize("make", [lambda s: FlatShadow(s, rows=2), lambda s: FlatShadow(s, dtype="same"),
                                  offloaded, host_masters], ids=["flat", "flat-same", "offloaded", "host-masters"])
def test_an_ema_shadow_is_an_averaging_shadow(make):
    shadow = make(sources())
    assert missing(shadow, AveragingShadow) == []
    assert isinstance(shadow, AveragingShadow) and isinstance(shadow, Capabilities)


def test_a_window_shadow_is_a_shadow_and_lists_its_ring():
    shadow = WindowShadow(sources(), 3)
    assert missing(shadow, Shadow) == []
    assert isinstance(shadow, Shadow) and not isinstance(shadow, Updatable)
    rings = [a for part, a in shadow.parts() if part == "ring"]
    assert len(rings) == 1 and any(r is rings[0] for r in shadow.written())


def test_a_pair_shadow_is_updatable_and_holds_only_tables():
    target = [torch.zeros(4), torch.zeros(6)]
    shadow = PairShadow(target, [torch.ones(4), torch.ones(6)])
    assert missing(shadow, Updatable) == []
    assert shadow.written() == [] and {p for p, _ in shadow.parts()} == {"tables"}
    assert all(isinstance(a, np.ndarray) for _, a in shadow.parts())


def test_the_capability_defaults():
    flat = FlatShadow({"a": torch.zeros(4, dtype=torch.float16)})        # float32 shadow: a swap rounds
    assert (flat.exact_swap, flat.folds_later, flat.in_place, flat.group, flat.split_id) == (
        False, False, False, None, None)
    assert FlatShadow({"a": torch.zeros(4, dtype=torch.bfloat16)}).exact_swap     # packed exactly
    assert FlatShadow({"a": torch.zeros(4)}).exact_swap
    backup = flat.backup()
    assert backup.groups[0]["shadow_dtype"] == "float16"                # the sources' own dtype
    off = offloaded(sources())
    assert (off.exact_swap, off.folds_later, off.swapped) == (False, True, False)
    with pytest.raises(TypeError, match="no in-place swap"):
        off.swap()
    with pytest.raises(TypeError, match="nothing is queued"):
        flat.queued(lambda: None)
    assert {p for p, _ in off.parts()} >= {"shadow", "staging chunks", "tables"}


def _split_shadows(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from fastema.torch._placement.offload import OffloadedShadow
    from fastema.torch._placement.split import Split, SplitWindow, split_of

    group = dist.group.WORLD
    src, part = sources(), split_of(group)
    made = {"replica": Split(FlatShadow(src, rows=1, split=part), group, 64, 7),
            "replica-window": SplitWindow(WindowShadow(src, 2, split=part), group, 64, 7),
            "offloaded-replica": Split(OffloadedShadow(src, rows=1, dtype="float32", chunk=64,
                                                       split=part), group, 64, 7)}
    protos = {"replica": AveragingShadow, "replica-window": WindowingShadow,
              "offloaded-replica": AveragingShadow}
    out = {f"missing {k}": ",".join(missing(s, protos[k])) for k, s in made.items()}
    out.update({f"group {k}": s.group is group and s.exact_swap and s.split_id == 7
                and s.gather_bucket == 64 for k, s in made.items()})
    out["declared"] = [(s.folds_later, s.host_plan_only, s.holds_interrupts) for s in made.values()]
    for s in made.values():
        s.join()
    return out


def test_the_split_shadows_hold_to_the_protocols(tmp_path):
    """A split is a wrapper of a storage made with this rank's slice: it holds to the storage's
    protocol, and declares the storage's capabilities as its own (an offloaded storage folds later
    and on the host's plan, split or not)."""
    for result in run_ranks(_split_shadows, tmp_path, 2):
        assert {k: v for k, v in result.items() if k.startswith("missing") and v} == {}
        assert all(v for k, v in result.items() if k.startswith("group"))
        assert result["declared"] == [(False,) * 3, (False,) * 3, (True,) * 3]


def _other_slice(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from fastema.torch._placement.split import Split

    try:
        Split(FlatShadow(sources(), split=(world - 1 - rank, world)), dist.group.WORLD, 64, 0)
    except ValueError as err:
        return {"said": str(err)}
    return {"said": ""}


def test_a_split_refuses_a_storage_of_another_slice(tmp_path):
    for result in run_ranks(_other_slice, tmp_path, 2):
        assert "split=split_of(group)" in result["said"]


def test_the_protocol_members_are_declared_not_probed():
    """The optional members are Capabilities' attributes: a shadow class that lacks one inherits the
    default, so ``hasattr`` is True on every class (no probe can be False)."""
    for name in ("folds_later", "in_place", "group", "split_id", "exact_swap", "join", "parts", "written",
                 "queued", "swapped", "swap", "bias_correct"):
        assert hasattr(Capabilities, name), name
    assert inspect.isclass(Shadow) and inspect.isclass(Updatable)
