"""fastema.jax.ema() across devices: a 2x2 mesh of CPU devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=4``, in a process of its own: backend_runs' "jax4").

Under ``NamedSharding`` (GSPMD, what pjit was) the averages take the parameters' layout and the
compiled update holds no collective: each device averages its own shard. The result equals the
one-device run bit for bit (stochastic rounding included: the noise index is the element's place
in the whole array, an iota XLA partitions). Under ``shard_map`` each device runs the update on
its local shard."""
import pytest
from backend_runs import run_on, script

pytest.importorskip("jax")

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")

MESH = r"""
import json
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import fastema.jax as fj

assert len(jax.devices()) == 4
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
specs = {"w": P("x", "y"), "b": P("y"), "n": P()}
rng = np.random.default_rng(0)
def params(i):
    return {"w": jnp.asarray(rng.standard_normal((8, 6)) * (i + 1), jnp.bfloat16),
            "b": jnp.asarray(rng.standard_normal(6), jnp.float32), "n": jnp.int32(i)}
seq = [params(i) for i in range(4)]
put = lambda p: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), p, specs)
out = {}
avg = fj.ema([0.9, 0.999], shadow_dtype="bfloat16", rounding="stochastic", seed=11)

state = jax.jit(avg.init)(put(seq[0]))
out["spec_w"] = list(state.averages["w"].sharding.spec)
out["spec_b"] = list(state.averages["b"].sharding.spec)
update = jax.jit(avg.update, donate_argnums=0)
hlo = update.lower(state, put(seq[1])).compile().as_text()
out["collectives"] = [c for c in %(collectives)r if c in hlo]
out["aliased"] = "input_output_alias" in hlo
for p in seq[1:]:
    state = update(state, put(p))
out["spec_after"] = list(state.averages["w"].sharding.spec)
out["shards"] = [list(s.data.shape) for s in state.averages["w"].addressable_shards]

one = jax.devices()[0]
ref = jax.jit(avg.init)(jax.device_put(seq[0], one))
for p in seq[1:]:
    ref = jax.jit(avg.update)(ref, jax.device_put(p, one))
f32 = lambda a: np.asarray(a.astype(jnp.float32))
out["equal"] = all(np.array_equal(f32(a), f32(b)) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref)))
out["average_spec"] = list(avg.average(state)["w"].sharding.spec)

# the guard reads every element: with sharded parameters it is one all-reduce of a flag
guarded = fj.ema(0.9, skip_nonfinite=True)
g_state = jax.jit(guarded.init)(put(seq[0]))
g_hlo = jax.jit(guarded.update).lower(g_state, put(seq[1])).compile().as_text()
out["guard_collectives"] = [c for c in %(collectives)r if c in g_hlo]

# shard_map: each device updates its local shard (nearest rounding: the noise index would be local)
plain = fj.ema([0.9, 0.5], update_every=2)
s_state = jax.jit(plain.init)(put(seq[0]))
state_specs = type(s_state)(averages={"w": P(None, "x", "y"), "b": P(None, "y"), "n": P()},
                            calls=P(), updates=P(), last_time=P(),
                            first_time=P(), norms=P(), seed=P(), skipped=P())
mapped = jax.jit(jax.shard_map(plain.update, mesh=mesh, in_specs=(state_specs, specs), out_specs=state_specs),
                 donate_argnums=0)
m_hlo = mapped.lower(s_state, put(seq[1])).compile().as_text()
out["shard_map_collectives"] = [c for c in %(collectives)r if c in m_hlo]
s_ref = plain.init(seq[0])
for p in seq[1:]:
    s_state = mapped(s_state, put(p))
    s_ref = jax.jit(plain.update)(s_ref, p)
out["shard_map_equal"] = all(np.array_equal(f32(a), f32(b))
                             for a, b in zip(jax.tree.leaves(s_state), jax.tree.leaves(s_ref)))
out["shard_map_updates"] = int(s_state.updates)
print(json.dumps(out))
""" % {"collectives": COLLECTIVES}
script("EMA_MESH", MESH, ("jax4",))


@pytest.mark.slow          # the four-device JAX process starts here (when it is the first), and compiles four steps
def test_the_average_is_laid_out_as_the_parameters_with_no_collective():
    res = run_on("jax4", "EMA_MESH")
    assert res["spec_w"] == [None, "x", "y"] and res["spec_after"] == res["spec_w"]
    assert res["spec_b"] == [None, "y"]
    assert res["shards"] == [[2, 4, 3]] * 4                    # (2, 8, 6) over 2x2: (2, 4, 3) each
    assert res["collectives"] == [] and res["aliased"]
    assert res["average_spec"] == ["x", "y"]


def test_the_sharded_run_equals_the_one_device_run_bit_for_bit():
    """bfloat16 averages with stochastic rounding, K=2: every element's noise depends on its
    place in the whole array, so the 2x2 run equals the one-device run."""
    assert run_on("jax4", "EMA_MESH")["equal"]


def test_the_nonfinite_guard_is_the_one_collective():
    assert run_on("jax4", "EMA_MESH")["guard_collectives"] == ["all-reduce"]


def test_shard_map_updates_each_local_shard():
    res = run_on("jax4", "EMA_MESH")
    assert res["shard_map_collectives"] == [] and res["shard_map_equal"] and res["shard_map_updates"] == 2
