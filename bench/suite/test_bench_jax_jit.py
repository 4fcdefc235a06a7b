"""The average inside a jitted JAX training step, on the CPU (issue 71).

Each row times one jitted step that takes the parameters and the average's state (both donated),
moves the parameters (an SGD-like ``p - 1e-3 * p``, the same in every row: the step the average
sits in) and updates the average:

- ``no average``: the step alone (its own cost, the floor under every other row);
- ``fastema.jax.ema``: :func:`fastema.jax.ema` (float32, one decay) inside the step;
- ``jit tree_map lerp``: a hand-written ``jax.tree.map(lambda s, p: s + w * (p - s), ...)``;
- ``flax.nnx.EMA``: flax's own EMA object, ``ema.update(model)`` inside ``nnx.jit``;
- ``fastema.jax.ema K=3`` against ``fastema.jax.ema K=1 x3`` (three states, one jitted step) and
  ``fastema.jax.ema K=1 x3 (3 steps)`` (three jitted calls): the parameters read once or three times;
- ``fastema.jax.EMA (between steps)``: the between-steps face, ``ema.update(params)`` after the
  jitted step (its kernels on the host), the old way.

``bytes`` is what the average itself must move per step (K=1: read s and p, write s: 12 bytes an
element; K=3: 28), so the report's GB/s is the average's share. Quick mode (CI): 300 x 4096.
"""
import numpy as np
import pytest

from .conftest import QUICK
from .shapes import many_small

DECAY = 0.999
SCENARIOS = {"300x4096": lambda: many_small(count=300), "48x2^18": lambda: many_small(count=48, numel=1 << 18)}
IMPLS = ["no average", "fastema.jax.ema", "jit tree_map lerp", "flax.nnx.EMA", "fastema.jax.ema K=3",
         "fastema.jax.ema K=1 x3", "fastema.jax.ema K=1 x3 (3 steps)", "fastema.jax.EMA (between steps)"]


UNCHECKED = ("no average", "jit tree_map lerp", "flax.nnx.EMA")   # rows whose check= is still to write


def _sgd(p):
    return p - 1e-3 * p


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_jax_average_in_the_jitted_step(run, benchmark, impl, scenario):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import fastema.jax as fj

    if QUICK and scenario != "300x4096":
        pytest.skip("full mode only")
    if impl in UNCHECKED:
        pytest.skip("a baseline is run once against fastema's result before it is timed "
                    "(bench/suite/checked.py); this row's check is not written yet (issue 71 item 4)")
    benchmark.group = "JAX: the average inside a jitted training step, float32 (cpu)"
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s, dtype=np.float32) for s in SCENARIOS[scenario]()]
    n = sum(h.size for h in host)
    box: dict = {"p": [jnp.asarray(h) for h in host]}
    k3 = impl == "fastema.jax.ema K=3" or " x3" in impl
    nbytes = (28 if k3 else 12) * n

    if impl == "flax.nnx.EMA":
        nnx = pytest.importorskip("flax.nnx")

        class Model(nnx.Module):
            def __init__(self, arrays):
                self.ps = nnx.List([nnx.Param(a) for a in arrays])

        model = Model(box["p"])
        ema = nnx.EMA(model, decay=DECAY)

        @nnx.jit
        def nnx_step(model, ema):
            for p in model.ps:
                p[...] = _sgd(p[...])
            ema.update(model)

        def fn():
            nnx_step(model, ema)
            jax.block_until_ready(jax.tree.leaves(nnx.state(ema)))
    elif impl == "fastema.jax.EMA (between steps)":
        step_only = jax.jit(lambda p: jax.tree.map(_sgd, p), donate_argnums=0)
        face = fj.EMA(box["p"], DECAY)

        def fn():
            box["p"] = step_only(box["p"])
            face.update(box["p"])                 # waits for the step, then the host kernel
    else:
        if impl == "no average":
            average, states = None, []
        elif impl == "jit tree_map lerp":
            w = 1.0 - DECAY
            init = lambda p: jax.tree.map(jnp.copy, p)  # noqa: E731
            average = lambda s, p: jax.tree.map(lambda a, b: a + w * (b - a), s, p)  # noqa: E731
            states = [init(box["p"])]
        elif impl in ("fastema.jax.ema", "fastema.jax.ema K=3"):
            avg = fj.ema([DECAY, 0.99, 0.9] if k3 else DECAY)
            average, states = avg.update, [jax.jit(avg.init)(box["p"])]
        else:
            avgs = [fj.ema(d) for d in (DECAY, 0.99, 0.9)]
            states = [jax.jit(a.init)(box["p"]) for a in avgs]
            average = None

        if impl == "fastema.jax.ema K=1 x3 (3 steps)":
            step_only = jax.jit(lambda p: jax.tree.map(_sgd, p), donate_argnums=0)
            updates = [jax.jit(a.update, donate_argnums=0) for a in avgs]

            def fn():
                box["p"] = step_only(box["p"])
                for i, u in enumerate(updates):
                    states[i] = u(states[i], box["p"])
                jax.block_until_ready(states)
        else:
            def step(p, states):
                p = jax.tree.map(_sgd, p)
                if impl == "fastema.jax.ema K=1 x3":
                    return p, [a.update(s, p) for a, s in zip(avgs, states)]
                return p, [average(s, p) for s in states]

            jitted = jax.jit(step, donate_argnums=(0, 1))

            def fn():
                box["p"], box["s"] = jitted(box["p"], box.get("s", states))
                jax.block_until_ready((box["p"], box["s"]))
    run(fn, "cpu", impl=impl, case=scenario, nbytes=nbytes, elements=n)
