"""A launch group keeps the launches an owner alternates (issue 87 item 3): two specs that differ in
a flag array alone (the slot of ``fastema._launch.launches``) each keep their launch, where each
once evicted the other (a prepare at every call: on CUDA a bind); a third flag made anew replaces
the oldest, so a flag made at every step holds no more than two launches."""
import numpy as np

from fastema import _launch
from fastema.kernels.kinds import F32


def _group(src, shadow):
    return _launch.Group("cpu", F32, F32, _launch.tables([src.ctypes.data], [src.size], [shadow.ctypes.data],
                                                         "cpu"))


def test_two_alternating_flags_prepare_two_launches_and_lerp_right():
    rng = np.random.default_rng(0)
    src, shadow = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    g = _group(src, shadow)
    clear, skipping = np.zeros(1, np.int32), np.ones(1, np.int32)       # a flag set: the launch writes nothing
    specs = (_launch.spec("lerp", flag=clear), _launch.spec("lerp", flag=skipping))
    ref = shadow.astype(np.float64)
    runs = []
    for i in range(6):
        run = g.launch_of(specs[i % 2])
        run((0.25,))
        if i % 2 == 0:
            ref += 0.25 * (src.astype(np.float64) - ref)
        runs.append(run)
    assert len({id(r) for r in runs}) == 2, runs                      # 2 prepares in 6 alternating calls
    assert np.allclose(shadow, ref, rtol=1e-6, atol=1e-6)
    assert g.launch("lerp", flag=clear) is runs[0]                     # asked by keywords: the same launch


def test_a_third_flag_replaces_the_oldest_launch_of_its_slot():
    src, shadow = np.ones(8, np.float32), np.zeros(8, np.float32)
    g = _group(src, shadow)
    flags = [np.zeros(1, np.int32) for _ in range(3)]
    first, second, third = (g.launch_of(_launch.spec("lerp", flag=f)) for f in flags)
    plain = g.launch("lerp")                                           # another slot (no array): kept apart
    assert g.launch_of(_launch.spec("lerp", flag=flags[1])) is second
    assert g.launch_of(_launch.spec("lerp", flag=flags[2])) is third
    assert g.launch_of(_launch.spec("lerp", flag=flags[0])) is not first   # it gave way to the third
    assert g.launch("lerp") is plain
    assert [op for op, _ in g.prepared()] == ["lerp"] * 3               # two of the slot, and the plain one
