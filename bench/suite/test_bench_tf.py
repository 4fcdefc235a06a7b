"""``fastema.tensorflow.compat.ExponentialMovingAverage`` against ``tf.train.ExponentialMovingAverage``
(issue 26), both in a ``tf.function``: ``apply(variables)`` as its own ``tf.function`` (what a
training step that ends with ``ema.apply(...)`` adds), and ``fastema.tensorflow.EMA.update()``
in a ``tf.function`` too.

Scenarios: GPT-2 small's 148 tensors (124M float32 parameters: target >= 2x) and 3000 small
variables of 4096 elements (per-variable overhead: target >= 1x). Each timed call ends when the
averages are written (TensorFlow's CPU ops and fastema's host kernel return finished). Quick
mode (CI) uses 300 small variables and skips GPT-2 (TensorFlow's tracing of 3000 variables
alone takes minutes). The baseline is checked against ``fastema.tensorflow.EMA`` of the same start
before it is timed (``bench/suite/checked.py``).
"""
import os

import numpy as np
import pytest

from .conftest import scenario_rounds, tf_check
from .shapes import MANY_NAME, gpt2_small, many_small

DECAY = 0.999
SCENARIOS = {"gpt2-small": gpt2_small, MANY_NAME: many_small}
IMPLS = ["fastema.tensorflow.compat.ExponentialMovingAverage", "fastema.tensorflow.EMA.update",
         "tf.train.ExponentialMovingAverage"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tf_function_ema_apply(run, benchmark, impl, scenario):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow")

    rounds = scenario_rounds(scenario, large_rounds=5)
    benchmark.group = "TensorFlow EMA apply in a tf.function, float32 variables (cpu)"
    shapes = SCENARIOS[scenario]()
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    n = sum(int(np.prod(s)) for s in shapes)
    if impl == "fastema.tensorflow.EMA.update":
        from fastema.tensorflow import EMA

        ema = EMA(variables, DECAY)

        @tf.function
        def step():
            ema.update()
    else:
        if impl.startswith("fastema"):
            from fastema.tensorflow.compat import ExponentialMovingAverage
        else:
            ExponentialMovingAverage = tf.train.ExponentialMovingAverage
        ema = ExponentialMovingAverage(DECAY)
        ema.apply(variables)                               # creates the averages (eagerly)

        @tf.function
        def step():
            ema.apply(variables)
    check = None if impl.startswith("fastema") else \
        tf_check(impl, step, lambda: [ema.average(v) for v in variables], variables, DECAY)
    run(step, "cpu", impl=impl, case=scenario, nbytes=12 * n, elements=n, rounds=rounds, check=check)
