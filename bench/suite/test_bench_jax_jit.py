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

Each baseline (the step alone, the tree_map lerp, flax.nnx.EMA) is run once before it is timed
against fastema's row from the same start (``bench/suite/checked.py``): the parameters at one
point, the average at another (so that a row which averages nothing cannot agree), one step each;
the step alone is compared on the parameters it wrote, the averages on the parameters and the
average.

``bytes`` is what the average itself must move per step (K=1: read s and p, write s: 12 bytes an
element; K=3: 28), so the report's GB/s is the average's share. Quick mode (CI): 300 x 4096.
"""
import numpy as np
import pytest

from .checked import checked, is_baseline
from .conftest import QUICK
from .shapes import many_small

DECAY = 0.999
SCENARIOS = {"300x4096": lambda: many_small(count=300), "48x2^18": lambda: many_small(count=48, numel=1 << 18)}
IMPLS = ["no average", "fastema.jax.ema", "jit tree_map lerp", "flax.nnx.EMA", "fastema.jax.ema K=3",
         "fastema.jax.ema K=1 x3", "fastema.jax.ema K=1 x3 (3 steps)", "fastema.jax.EMA (between steps)"]


def _sgd(p):
    return p - 1e-3 * p


class _Row:
    """One row's jitted step: :meth:`start` puts the parameters at ``params`` and the average at
    ``average`` (host arrays), :meth:`fn` is the timed call, :meth:`result` the arrays its last
    call wrote (the parameters, then the average where the row keeps one)."""

    def __init__(self, impl: str):
        import jax
        import jax.numpy as jnp

        import fastema.jax as fj

        self.impl, self.jax, self.jnp = impl, jax, jnp
        self.box: dict = {}
        k3 = impl == "fastema.jax.ema K=3" or " x3" in impl
        self.avgs = [fj.ema(d) for d in (DECAY, 0.99, 0.9)] if " x3" in impl else None
        self.avg = fj.ema([DECAY, 0.99, 0.9] if k3 else DECAY) if impl.startswith("fastema.jax.ema") else None
        step_only = jax.jit(lambda p: jax.tree.map(_sgd, p), donate_argnums=0)
        if impl == "flax.nnx.EMA":
            from flax import nnx

            @nnx.jit
            def nnx_step(model, ema):
                for p in model.ps:
                    p[...] = _sgd(p[...])
                ema.update(model)
            self._nnx_step = nnx_step
        elif impl == "fastema.jax.EMA (between steps)":
            self._step_only = step_only
        elif impl == "fastema.jax.ema K=1 x3 (3 steps)":
            self._step_only = step_only
            self._updates = [jax.jit(a.update, donate_argnums=0) for a in self.avgs]
        else:
            w = 1.0 - DECAY

            def step(p, states):
                p = jax.tree.map(_sgd, p)
                if impl == "no average":
                    return p, states
                if impl == "jit tree_map lerp":
                    return p, [jax.tree.map(lambda a, b: a + w * (b - a), s, p) for s in states]
                if self.avgs is not None:
                    return p, [a.update(s, p) for a, s in zip(self.avgs, states)]
                return p, [self.avg.update(s, p) for s in states]
            self._jitted = jax.jit(step, donate_argnums=(0, 1))

    def start(self, params: list, average: list) -> None:
        jax, jnp, impl, box = self.jax, self.jnp, self.impl, self.box
        box["p"] = [jnp.asarray(h) for h in params]
        if impl == "flax.nnx.EMA":
            from flax import nnx

            class Model(nnx.Module):
                def __init__(self, arrays):
                    self.ps = nnx.List([nnx.Param(a) for a in arrays])

            box["model"] = Model([jnp.asarray(h) for h in average])
            box["ema"] = nnx.EMA(box["model"], decay=DECAY)     # its shadow: a copy of ``average``
            for p, h in zip(box["model"].ps, params):
                p[...] = jnp.asarray(h)
        elif impl == "fastema.jax.EMA (between steps)":
            import fastema.jax as fj

            box["face"] = fj.EMA([jnp.asarray(h) for h in average], DECAY)
        elif impl == "no average":
            box["s"] = []
        elif impl == "jit tree_map lerp":
            box["s"] = [[jnp.asarray(h) for h in average]]
        else:
            start = [jnp.asarray(h) for h in average]
            box["s"] = ([jax.jit(a.init)(start) for a in self.avgs] if self.avgs is not None
                        else [jax.jit(self.avg.init)(start)])

    def fn(self) -> None:
        jax, impl, box = self.jax, self.impl, self.box
        if impl == "flax.nnx.EMA":
            from flax import nnx

            self._nnx_step(box["model"], box["ema"])
            jax.block_until_ready(jax.tree.leaves(nnx.state(box["ema"])))
        elif impl == "fastema.jax.EMA (between steps)":
            box["p"] = self._step_only(box["p"])
            box["face"].update(box["p"])                 # waits for the step, then the host kernel
        elif impl == "fastema.jax.ema K=1 x3 (3 steps)":
            box["p"] = self._step_only(box["p"])
            box["s"] = [u(s, box["p"]) for u, s in zip(self._updates, box["s"])]
            jax.block_until_ready(box["s"])
        else:
            box["p"], box["s"] = self._jitted(box["p"], box["s"])
            jax.block_until_ready((box["p"], box["s"]))

    def result(self) -> list:
        box = self.box
        if self.impl == "flax.nnx.EMA":
            from flax import nnx

            params = [p[...] for p in box["model"].ps]
            return params + self.jax.tree.leaves(nnx.state(box["ema"]))
        if self.impl == "no average":
            return list(box["p"])
        if self.impl == "jit tree_map lerp":
            return list(box["p"]) + list(box["s"][0])
        if self.impl == "fastema.jax.ema":
            return list(box["p"]) + list(self.avg.average(box["s"][0]))
        raise NotImplementedError(f"{self.impl}: fastema's own row, not checked")


def _check(row: _Row, host: list):
    """The ``check=`` of a baseline ``row``: fastema's K=1 row and ``row`` each started with the
    average at ``host`` and the parameters moved away from it (+10 N(0, 1): one update moves the
    average by 1e-2 of that, a thousand times the check's tolerance), one step each; they must
    agree (``bench.suite.checked.checked``). The step alone is compared on the parameters only."""
    rng = np.random.default_rng(1)
    moved = [h + np.float32(10) * rng.standard_normal(h.shape, dtype=np.float32) for h in host]
    ours = _Row("fastema.jax.ema")

    def check():
        ours.start(moved, host)
        row.start(moved, host)
        n = len(host) if row.impl == "no average" else None
        checked({"fastema": ours.fn, row.impl: row.fn},
                {"fastema": lambda: ours.result()[:n], row.impl: row.result}, ours="fastema")
    return check


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_jax_average_in_the_jitted_step(run, benchmark, impl, scenario):
    pytest.importorskip("jax")
    if impl == "flax.nnx.EMA":
        pytest.importorskip("flax.nnx")
    if QUICK and scenario != "300x4096":
        pytest.skip("full mode only")
    benchmark.group = "JAX: the average inside a jitted training step, float32 (cpu)"
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s, dtype=np.float32) for s in SCENARIOS[scenario]()]
    n = sum(h.size for h in host)
    k3 = impl == "fastema.jax.ema K=3" or " x3" in impl
    row = _Row(impl)
    check = _check(row, host) if is_baseline(impl) else None
    row.start(host, host)
    # 15 rounds (not the suite's 5): a row is a few ms, and 5 of them on a loaded 2-core VM put K=3
    # anywhere between 2.5 and 21 ms (the fused update's HLO reads the parameters once: the spread is
    # the machine's)
    run(row.fn, "cpu", impl=impl, case=scenario, nbytes=(28 if k3 else 12) * n, elements=n, check=check,
        rounds=15 if QUICK else 40)
    # the check ran from its own start: the timed calls go on from wherever it left the row
