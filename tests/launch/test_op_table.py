"""The op table (``fastema._launch.op``, issue 80 item 2): each op's fixed and varying arguments are
written once, and everything that names them is held to it: both targets' ``PREPARE`` tables (their
keyword signatures, by ``inspect.signature``), ``VARYING``, the docstring table, the variant
enumeration, and a launch prepared on the CPU for every op (a ``Launch``: ``run(*varying)`` and
``run.once(*varying)``)."""
import inspect

import numpy as np
import pytest

from fastema import _launch
from fastema._launch import op
from fastema._launch.cpu import launch as cpu_launch
from fastema.kernels.kinds import DEBIASED, EMA_PART, EXCHANGE, F32, SMA_PART

pytest.importorskip("numba.cuda")
from fastema._launch.cuda import launch as cuda_target  # noqa: E402  (numba-cuda's types; no GPU)
from fastema._launch.shipped import variants  # noqa: E402  (numba-cuda's types; no GPU)


@pytest.mark.parametrize("table", [cpu_launch.PREPARE, cuda_target.PREPARE], ids=["cpu", "cuda"])
def test_both_prepare_tables_take_the_op_tables_keywords(table):
    assert set(table) == set(op.OPS)
    for name, prepare in table.items():
        params = list(inspect.signature(prepare).parameters.values())
        assert params[0].name == "group" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        keywords = {p.name: p.default for p in params[1:]}
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), name
        assert keywords == op.signature(name), name


def test_varying_the_docstring_and_the_dispatch_point_read_the_table():
    assert _launch.VARYING == {name: o.varying for name, o in op.OPS.items()}
    assert _launch.OPS is op.OPS
    for name, o in op.OPS.items():
        assert f'``"{name}"``' in op.__doc__, name
        assert not set(o.fixed) & set(o.varying), name                  # an argument is one or the other
        assert set(o.defaults) <= set(o.fixed) | set(o.varying), name
    for alias in ("lerp_launcher", "plan_lerp_launcher", "copy_launcher", "plan_launcher", "nonfinite_launcher"):
        assert not hasattr(_launch, alias), alias


def test_the_variant_enumeration_calls_every_op_by_the_tables_names():
    seen = set()
    for name, group, fixed, varying in variants._space():
        o = op.OPS[name]
        seen.add(name)
        assert set(fixed) <= set(o.fixed), (name, set(fixed) - set(o.fixed))
        assert set(o.fixed) - set(fixed) <= set(o.defaults), (name, "a required fixed argument left out")
        assert set(varying) == set(o.varying), name
    assert seen == set(op.OPS)


def _plan_arrays() -> dict:
    from fastema.average import Plan
    from fastema.average._device_plan import parameters
    from fastema.kernels.kinds import S_NORMS

    params, decays = parameters(Plan(decay=0.9), 0)
    return {"state": np.zeros(S_NORMS + 1), "params": params, "decays": decays, "w32": np.zeros(1, np.float32),
            "w64": np.zeros(1), "flag": np.zeros(1, np.int32), "keys": np.zeros(1, np.int64),
            "done": np.zeros(1, np.int32)}


def test_every_op_prepares_a_launch_on_the_cpu_that_runs_and_runs_once():
    """``prepare`` returns a ``Launch`` for every op of the table: the results against a float64
    reference for the lerp, and every other op's launch called both ways."""
    shadow, src = np.zeros((3, 16), np.float32), np.arange(16, dtype=np.float32)
    t = _launch.tables([src.ctypes.data], [16], [shadow.ctypes.data], "cpu", row_stride=16)
    g = _launch.Group("cpu", F32, F32, t)
    f64, i32 = np.zeros(4), np.zeros(4, np.int32)
    ring = np.zeros((4, 16), np.float32)
    plan = _plan_arrays()
    fixed = {"lerp": {}, "plan_lerp": {**plan, "gi": 0}, "bema": {}, "plan": {k: plan[k] for k in op.OPS["plan"].fixed},
             "copy": {"to_shadow": True, "row_lo": 0, "row_hi": 3}, "swap": {"mode": EXCHANGE, "row": 1},
             "nonfinite": {"flag": np.zeros(1, np.int32)}, "window": {"ring_kind": F32},
             "streams": {"parts": EMA_PART | SMA_PART, "skip": True, "weighted": True}}
    values = np.ones(4, np.float32).view(np.uint32)
    varying = {"lerp": ((0.5,),), "plan_lerp": (-1,), "bema": (0.5,), "plan": (-1,), "copy": (), "swap": (),
               "nonfinite": (), "window": (np.array([ring.ctypes.data], np.int64), 0, False, 1, False),
               "streams": (values, 1.0, f64, False, DEBIASED, 0.5, np.zeros(8), np.zeros(16), np.zeros(8), i32,
                           np.zeros(16), np.zeros(8), i32.copy(), 0, 0, True)}
    assert set(fixed) == set(varying) == set(op.OPS)
    metric = _launch.Group("cpu", None, F32, None)
    groups = {"streams": metric, "plan": _launch.Group("cpu", None, 0, None)}
    for name in op.OPS:
        run = _launch.prepare(name, groups.get(name, g), **fixed[name])
        assert callable(run) and callable(run.once), name
        run(*varying[name])
        run.once(*varying[name])
    assert inspect.signature(_launch.prepare).return_annotation == "Launch"
    assert inspect.signature(_launch.Launches.launch).return_annotation == "Launch"


def test_a_prepared_lerp_matches_the_float64_reference_and_follows_replaced_tables():
    """A launch reads its group's tables at each call (issue 80 item 1): the owner replaces them, the
    kept launch writes the new sources' lerp, checked against float64."""
    rng = np.random.default_rng(0)
    shadow = rng.standard_normal(40).astype(np.float32)
    a, b = rng.standard_normal(40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    g = _launch.Group("cpu", F32, F32, _launch.tables([a.ctypes.data], [40], [shadow.ctypes.data], "cpu"))
    run = g.launch("lerp")
    ref = shadow.astype(np.float64)
    run((0.25,))
    ref += 0.25 * (a.astype(np.float64) - ref)
    g.tables = _launch.update_addresses(g.tables, [b.ctypes.data], "cpu")     # the source moved
    assert g.launch("lerp") is run                                            # the same launch, kept
    run((0.5,))
    ref += 0.5 * (b.astype(np.float64) - ref)
    assert np.allclose(shadow, ref, rtol=1e-6, atol=1e-6)
