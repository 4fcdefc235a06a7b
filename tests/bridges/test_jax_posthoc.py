"""fastema.jax.snapshot(): an ema() state's power-function profiles written between jitted steps
as post-hoc snapshots, read back and synthesised by fastema.posthoc (the torch PostHocEMA's format)."""
import numpy as np
import pytest
from support.jax_x64 import enable_x64

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")

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


def test_a_state_of_another_average_is_refused_before_anything_is_written(tmp_path):
    """A state whose row count is not the average's profile count (a run resumed from an old state
    after its profile list changed) is refused naming both counts and the fix: never one row's
    values written under another profile's exponent (JAX clamps an index past the last row)."""
    params = {"w": jnp.arange(3.0)}
    one = fj.ema([PowerFunction.of(0.05)])
    state = jax.jit(one.update)(one.init(params), params)
    with pytest.raises(ValueError, match=r"holds 1 profile row.*tracks 2 profile.*the average this state came from"):
        fj.snapshot(AVG, state, tmp_path, run_id="r")
    two = UPDATE(AVG.init(params), params)
    with pytest.raises(ValueError, match=r"holds 2 profile row.*tracks 1 profile.*init a new state"):
        fj.snapshot(one, two, tmp_path, run_id="r")
    cut = two._replace(averages={"w": two.averages["w"][:1]})       # the norms agree, a leaf does not
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(1, 3\)"):
        fj.snapshot(AVG, cut, tmp_path, run_id="r")
    assert list(tmp_path.iterdir()) == []


def _x64_run(w, kept):
    avg = fj.ema([PowerFunction.of(s) for s in SIGMAS], shadow_dtype="float64")
    params = {"w": jnp.asarray(w, jnp.float64), **kept}
    state, update = avg.init(params), jax.jit(avg.update)
    for i in range(3):
        state = update(state, {**params, "w": params["w"] * (1 + i)})
    return avg, state


def test_a_float64_shadow_beyond_float32_is_refused_not_stored_as_inf(tmp_path):
    """A float64 shadow reaches the writer as float64, so its range check refuses a value float32
    cannot hold (as PostHocEMA does) instead of a file holding inf."""
    with enable_x64(True):
        avg, state = _x64_run([1e300, 1.0], {})
        assert state.averages["w"].dtype == jnp.float64
        with pytest.raises(OverflowError, match=r"0:\['w'\] holds 1 finite value.*beyond the range of float32.*"
                                                r"largest is [0-9.]+e\+300.*nothing is written"):
            fj.snapshot(avg, state, tmp_path, run_id="r")
        # J13: raised before the folder is claimed: nothing in it (no .fastema-run), and another run writes
        assert list(tmp_path.iterdir()) == []
        fine, kept = _x64_run([1.0, 2.0], {})
        fj.snapshot(fine, kept, tmp_path, run_id="other")
    assert [s.run_id for s in posthoc.read_snapshots(tmp_path)] == ["other"]


def test_float64_rows_and_leaves_of_any_dtype_round_trip_through_fastema_posthoc(tmp_path):
    """A float64 shadow stored as float32, and uint32 and float8 leaves (no name in every
    safetensors release; float8 none in torch.from_numpy) kept as their bytes with a ``raw`` entry,
    as PostHocEMA keeps them: read back, each profile is the state's row rounded to float32, each
    leaf its value bit for bit in its dtype, and synthesising each tracked profile gives its row."""
    kept = {"n": jnp.asarray([0, 7, 2**32 - 1], jnp.uint32), "f8": jnp.asarray([0.5, -448.0], jnp.float8_e4m3fn)}
    with enable_x64(True):
        avg, state = _x64_run([0.1, -2.5, 3.25e10], kept)
        rows = np.asarray(state.averages["w"])
        path = fj.snapshot(avg, state, tmp_path, run_id="r")
    snap, = posthoc.read_snapshots(tmp_path)
    assert snap.path == path
    assert snap.meta.raw == {posthoc.kept_key("['n']"): "uint32", posthoc.kept_key("['f8']"): "float8_e4m3fn"}
    reader = posthoc.tensor_reader(snap)
    try:
        for k in range(len(SIGMAS)):
            np.testing.assert_array_equal(reader(posthoc.profile_key(k, "['w']")).numpy(), rows[k].astype(np.float32))
        n, f8 = reader(posthoc.kept_key("['n']")), reader(posthoc.kept_key("['f8']"))
        assert n.dtype == torch.uint32 and n.tolist() == [0, 7, 2**32 - 1]
        assert f8.dtype == torch.float8_e4m3fn and f8.float().tolist() == [0.5, -448.0]
    finally:
        reader.close()
    for k, sigma in enumerate(SIGMAS):
        out = posthoc.synthesize(tmp_path, sigma_rel=sigma)
        np.testing.assert_allclose(out["['w']"].numpy(), rows[k], rtol=1e-6)
        assert out["['n']"].tolist() == [0, 7, 2**32 - 1] and out["['f8']"].float().tolist() == [0.5, -448.0]


def test_a_leaf_torch_has_no_dtype_for_is_refused_before_the_folder_is_claimed(tmp_path):
    """An int4 leaf (a JAX dtype torch cannot hold) is a ValueError naming it and the dtypes a
    snapshot stores, before the folder is claimed (nothing written)."""
    params = {"w": jnp.zeros(3), "q": jnp.zeros(3, jnp.int4)}
    state = UPDATE(AVG.init(params), params)
    with pytest.raises(ValueError, match=r"\['q'\] is int4.*float32"):
        fj.snapshot(AVG, state, tmp_path, run_id="r")
    assert list(tmp_path.iterdir()) == []


def test_a_snapshot_at_time_0_is_refused_and_a_file_of_time_0_is_refused_by_name(tmp_path):
    """An optax-style loop's first step is 0: snapshot() after update(step=0) wrote a profile of time 0
    (the torch face refuses it), and synthesis then failed on every snapshot without naming the file.
    snapshot() refuses it; a file of time 0 is refused by name, with the fix."""
    params = {"w": jnp.arange(3.0)}
    state = AVG.update(AVG.init(params), params, step=0)
    with pytest.raises(RuntimeError, match="at time 0"):
        fj.snapshot(AVG, state, tmp_path, run_id="r")
    assert list(tmp_path.iterdir()) == []
    later = AVG.update(state, params, step=5)
    path = fj.snapshot(AVG, later, tmp_path, run_id="r")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        header = {**f.metadata(), "time": "0"}          # the file the old snapshot() wrote at step 0
    save_file(load_file(path), str(tmp_path / "snapshot-000000000000.safetensors"), metadata=header)
    with pytest.raises(ValueError, match=r"snapshot-000000000000\.safetensors.*'time' is .*expected a finite "
                                         r"number > 0.*move it out of the folder"):
        posthoc.synthesize(tmp_path, 0.07)
