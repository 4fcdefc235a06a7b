"""The JAX and TensorFlow bridges against each framework's own way (issue #6).

JAX: ``fastema.jax.EMA.update(params)`` against a jit-compiled ``tree_map`` lerp of the
shadow pytree (JAX's native EMA), with and without donating the old shadow. The
parameters alternate between two pytrees, as a training loop hands over new arrays
every step, so each fastema call pays its full per-leaf DLPack read.

TensorFlow: ``fastema.tensorflow.EMA.update()`` against ``tf.train.ExponentialMovingAverage``
(eager, and its ``apply`` inside a ``tf.function``) and the Keras optimizer's ``use_ema``
averaging step (TensorFlow backend).

Each timed call ends when the result is ready (``block_until_ready`` for JAX; TensorFlow
eager ops on the CPU return finished). Quick mode (CI) times 300 x 4096 instead of 3000 x 4096
(``shapes.MANY``: a tenth of every many-small-tensors scenario).
Every baseline is checked against fastema's EMA of the same start before it is timed
(``bench/suite/checked.py``).
"""
import os

import numpy as np
import pytest

from bench.suite.checked import checked

from .conftest import scenario_rounds, tf_check
from .shapes import MANY_NAME, gpt2_small, many_small

DECAY = 0.999
SCENARIOS = {"gpt2-small": gpt2_small, MANY_NAME: many_small}


def _params(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


@pytest.mark.parametrize("impl", ["fastema", "jit tree_map lerp", "jit tree_map lerp (donated)"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_jax_ema_update(run, benchmark, impl, scenario):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rounds = scenario_rounds(scenario)
    benchmark.group = "JAX EMA update, float32 pytree (cpu)"
    host = _params(SCENARIOS[scenario](), 0)
    trees = [[jnp.asarray(h) for h in host], [jnp.asarray(h + 1) for h in host]]
    n = sum(h.size for h in host)
    turn = [0]

    def params():
        turn[0] ^= 1
        return trees[turn[0]]

    if impl == "fastema":
        from fastema.jax import EMA

        ema = EMA(trees[0], DECAY)
        fn = lambda: ema.update(params())  # noqa: E731
    else:
        w = 1.0 - DECAY
        lerp = jax.jit(lambda s, p: jax.tree_util.tree_map(lambda a, b: a + w * (b - a), s, p),
                       donate_argnums=(0,) if "donated" in impl else ())
        state = [[jnp.asarray(h) for h in host]]

        def fn():
            state[0] = lerp(state[0], params())
            jax.block_until_ready(state[0])

        from fastema.jax import EMA

        ref = EMA([jnp.asarray(h) for h in host], DECAY)         # the same start as the state

        def check():                                             # fastema reads the tree fn reads next
            checked({"fastema": lambda: ref.update(trees[turn[0] ^ 1]), impl: fn},
                    {"fastema": lambda: jax.tree_util.tree_leaves(ref.shadow()), impl: lambda: state[0]},
                    ours="fastema")
    run(fn, "cpu", impl=impl, case=scenario, nbytes=12 * n, elements=n, rounds=rounds,
        check=None if impl == "fastema" else check)


@pytest.mark.parametrize("impl", ["fastema", "tf.train.ExponentialMovingAverage",
                                  "tf.train.ExponentialMovingAverage (tf.function)", "Keras optimizer use_ema"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tensorflow_ema_update(run, benchmark, impl, scenario):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow")

    rounds = scenario_rounds(scenario, large_rounds=3)
    benchmark.group = "TensorFlow EMA update, float32 variables (cpu)"
    shapes = SCENARIOS[scenario]()
    host = _params(shapes, 0)
    variables = [tf.Variable(h) for h in host]
    n = sum(h.size for h in host)
    if impl == "fastema":
        from fastema.tensorflow import EMA

        fn = EMA(variables, DECAY).update
    elif impl.startswith("tf.train"):
        ema = tf.train.ExponentialMovingAverage(DECAY)
        ema.apply(variables)                               # creates the averages
        if "tf.function" in impl:
            @tf.function
            def fn():
                ema.apply(variables)                       # returns an Operation: nothing to hand back
        else:
            fn = lambda: ema.apply(variables)  # noqa: E731
    else:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        keras = pytest.importorskip("keras")
        if keras.backend.backend() != "tensorflow":
            pytest.skip("Keras runs on another backend in this process")
        opt = keras.optimizers.SGD(0.0, use_ema=True, ema_momentum=DECAY, ema_overwrite_frequency=None)
        kvars = [keras.Variable(h) for h in host]
        opt.build(kvars)
        opt.iterations.assign(1)                           # past the first step, which copies
        fn = tf.function(lambda: opt._update_model_variables_moving_average(kvars))
        for avg, v in zip(opt._model_variables_moving_average, kvars):
            avg.assign(v)                                  # Keras starts them at zero; fastema at the weights
    check = None
    if not impl.startswith("fastema"):
        averages = (lambda: [ema.average(v) for v in variables]) if impl.startswith("tf.train") else \
            (lambda: list(opt._model_variables_moving_average))
        check = tf_check(impl, fn, averages, kvars if impl.startswith("Keras") else variables, DECAY)
    run(fn, "cpu", impl=impl, case=scenario, nbytes=12 * n, elements=n, rounds=rounds, check=check)
