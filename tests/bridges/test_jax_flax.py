"""fastema.jax.ema() in a real training loop: a flax nnx model trained with optax AdamW, the
average updated inside the jitted step; on one device and on a 2x2 mesh of CPU devices (the
parameters sharded over the model axis, the batch over the data axis). Runs in backend_runs'
four-device JAX process; skipped where flax or optax is not installed (the ``flax`` and ``dev``
extras install them)."""
import pytest
from backend_runs import run_on, script

pytest.importorskip("jax")
pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

LOOP = r"""
import json
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import fastema.jax as fj


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def data(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = np.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] + 0.5 * rng.standard_normal((n, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def run(put=lambda t: t, batch_put=lambda t: t, steps=300, batch=32):
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    params = put(params)
    tx = optax.adamw(3e-2, weight_decay=1e-4)
    avg = fj.ema(0.98, debias=True)
    opt_state, ema_state = tx.init(params), avg.init(params)

    def loss_fn(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def train_step(carry, batch):
        params, opt_state, ema_state = carry
        grads = jax.grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, avg.update(ema_state, params)), None     # the average inside the step

    xs, ys = data(1, steps * batch)
    batches = (batch_put(xs.reshape(steps, batch, 8)), batch_put(ys.reshape(steps, batch, 1)))
    train = jax.jit(lambda carry, batches: jax.lax.scan(train_step, carry, batches)[0], donate_argnums=0)
    params, opt_state, ema_state = train((params, opt_state, ema_state), batches)
    xv, yv = data(2, 4096)
    averaged = avg.average(ema_state)
    return (float(jax.jit(loss_fn)(params, xv, yv)), float(jax.jit(loss_fn)(averaged, xv, yv)), averaged,
            ema_state)


out = {}
raw, averaged, one, _ = run()
out["one"] = [raw, averaged]
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
RULES = {(8, 64): P(None, "model"), (64,): P("model"), (64, 1): P("model", None), (1,): P()}
put = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, RULES[x.shape])), tree)
batch_put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "data")))
raw4, averaged4, four, state4 = run(put, batch_put)
out["mesh"] = [raw4, averaged4]
out["laid_out"] = [a.sharding.is_equivalent_to(NamedSharding(mesh, P(None, *RULES[a.shape[1:]])), a.ndim)
                   for a in jax.tree.leaves(state4.averages)]
pairs = list(zip(jax.tree.leaves(one), jax.tree.leaves(four)))
out["max_diff"] = max(float(jnp.max(jnp.abs(a - np.asarray(b)))) for a, b in pairs)
out["max_value"] = max(float(jnp.max(jnp.abs(a))) for a, _ in pairs)
print(json.dumps(out))
"""
script("FLAX_LOOP", LOOP, ("jax4",))


@pytest.mark.slow          # two training runs of 300 scanned steps (one device, 2x2 mesh) and flax's import
def test_the_average_in_the_jitted_step_beats_the_raw_weights():
    """AdamW at a high learning rate on noisy data: the raw weights jitter around the solution,
    the average (debiased, decay 0.98) sits closer to it: a lower validation loss."""
    raw, averaged = run_on("jax4", "FLAX_LOOP")["one"]
    assert averaged < 0.9 * raw, (raw, averaged)


@pytest.mark.slow
def test_the_mesh_run_equals_the_one_device_run():
    """The same loop on a 2x2 mesh (batch over "data", the layers over "model"): the averages are
    laid out as the parameters and equal the one-device run to float32 rounding (the training
    step's sums are split over devices, so the parameters differ in their last bits; the average's
    own update is elementwise, see test_jax_sharded)."""
    res = run_on("jax4", "FLAX_LOOP")
    assert res["laid_out"] == [True] * 4
    assert res["max_diff"] <= 1e-5 * res["max_value"], res
    assert abs(res["mesh"][1] - res["one"][1]) <= 1e-5 * res["one"][1]
    assert res["mesh"][1] < 0.9 * res["mesh"][0]


ORBAX = r"""
import json, tempfile
import numpy as np, jax, jax.numpy as jnp
import orbax.checkpoint as ocp
import fastema.jax as fj
from fastema.schedules import PowerWarmup

avg = fj.ema([PowerWarmup(0.99), PowerWarmup(0.999)], debias=True, shadow_dtype="bfloat16", rounding="stochastic",
             seed=9)
update = jax.jit(avg.update, donate_argnums=0)
rng = np.random.default_rng(0)
seq = [{"w": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32), "n": jnp.int32(i)} for i in range(8)]
state = avg.init(seq[0])
for p in seq[:4]:
    state = update(state, p)
with tempfile.TemporaryDirectory() as d:
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(d + "/ema", state)
        ckpt.wait_until_finished()
        template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        restored = type(state)(*ckpt.restore(d + "/ema", template))
for p in seq[4:]:
    state = update(state, p)
    restored = update(restored, p)
f32 = lambda a: np.asarray(a.astype(jnp.float32))
print(json.dumps({"equal": all(np.array_equal(f32(a), f32(b))
                               for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored))),
                  "updates": int(restored.updates)}))
"""
script("ORBAX", ORBAX, ("jax4",))


def test_the_state_checkpoints_with_orbax_and_resumes_bit_for_bit():
    """The state is a NamedTuple of arrays: orbax saves it as a train state, and the resumed average
    (warm-ups, debiasing, bfloat16 with stochastic rounding) continues bit for bit."""
    pytest.importorskip("orbax.checkpoint")
    res = run_on("jax4", "ORBAX")
    assert res == {"equal": True, "updates": 8}
