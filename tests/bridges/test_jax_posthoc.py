"""fastema.jax.snapshot(): an ema() state's power-function profiles written between jitted steps
as post-hoc snapshots, read back and synthesised by fastema.posthoc (the torch PostHocEMA's format)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("torch")

import fastema.jax as fj  # noqa: E402
from fastema import posthoc  # noqa: E402
from fastema.schedules import PowerFunction  # noqa: E402

SIGMAS = (0.05, 0.1)
AVG = fj.ema([PowerFunction.of(s) for s in SIGMAS])
UPDATE = jax.jit(AVG.update)


def _run(tmp_path, steps=(4, 8, 12), dtype="float32", run_id="run-a"):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    state = AVG.init({"w": jnp.asarray(w), "b": jnp.asarray(b, jnp.bfloat16), "count": jnp.int32(0)})
    paths = []
    for i in range(1, max(steps) + 1):
        w, b = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32), b + 0.1
        state = UPDATE(state, {"w": w, "b": jnp.asarray(b, jnp.bfloat16), "count": np.int32(i)})
        if i in steps:
            paths.append(fj.snapshot(AVG, state, tmp_path, run_id=run_id, dtype=dtype))
    return state, paths


def test_snapshots_are_read_and_a_tracked_profile_synthesises_to_the_state(tmp_path):
    """Three snapshots at steps 4, 8, 12: read back with their times, exponents, names and kept
    leaves; synthesising a tracked sigma_rel at the last time gives that profile's row of the state
    (float32, within the least-squares solve's rounding); every profile's stored values are the
    state's rows bit for bit."""
    state, paths = _run(tmp_path)
    snaps = posthoc.read_snapshots(tmp_path)
    assert [s.time for s in snaps] == [4.0, 8.0, 12.0] and [s.updates for s in snaps] == [4, 8, 12]
    assert snaps[-1].gammas == pytest.approx([s.gamma for s in AVG.schedules])
    assert sorted(snaps[-1].averaged) == ["['b']", "['w']"] and snaps[-1].others == ["['count']"]
    reader = posthoc.tensor_reader(snaps[-1])
    try:
        for k in range(len(SIGMAS)):
            for name in ("w", "b"):
                got = reader(posthoc.profile_key(k, f"['{name}']")).numpy()
                want = np.asarray(state.averages[name][k].astype(jnp.float32))
                np.testing.assert_array_equal(got, want)
        assert int(reader(posthoc.kept_key("['count']"))) == 12
    finally:
        reader.close()
    out = posthoc.synthesize(tmp_path, sigma_rel=SIGMAS[1])
    np.testing.assert_allclose(out["['w']"].numpy(), np.asarray(state.averages["w"][1]), rtol=1e-5, atol=1e-6)


def test_snapshot_refusals(tmp_path):
    """Not power-function profiles, a bad run id or dtype, no update yet, inside jit, and a second
    run in one folder: refused with the fix, nothing written."""
    params = {"w": jnp.zeros(3)}
    state = AVG.init(params)
    with pytest.raises(ValueError, match="PowerFunction"):         # checked before the state is read
        fj.snapshot(fj.ema(0.99), state, tmp_path, run_id="r")
    with pytest.raises(RuntimeError, match="before any update"):
        fj.snapshot(AVG, state, tmp_path, run_id="r")
    state = UPDATE(state, params)
    with pytest.raises(ValueError, match="run_id"):
        fj.snapshot(AVG, state, tmp_path, run_id="a/b")
    with pytest.raises(ValueError, match="dtype"):
        fj.snapshot(AVG, state, tmp_path, run_id="r", dtype="int8")
    with pytest.raises(TypeError, match="between jitted steps"):
        jax.jit(lambda s: fj.snapshot(AVG, s, tmp_path, run_id="r") and 0)(state)
    assert list(tmp_path.iterdir()) == []
    fj.snapshot(AVG, state, tmp_path, run_id="first")
    later = UPDATE(state, params)
    with pytest.raises(ValueError, match="first"):
        fj.snapshot(AVG, later, tmp_path, run_id="second")
