"""The oldest JAX ``fastema.jax`` runs on, checked first at its import (:data:`JAX_FLOOR`)."""
import jax

from .._floors import refuse_older

#: As ``pyproject.toml``'s ``jax`` extra says: the oldest release every JAX test of fastema passed on
#: (``docs/install.md``, "Which framework release": jax 0.4.35 cannot batch ``optimization_barrier``
#: under ``vmap``, 0.4.30 has no public ``jax.lax.optimization_barrier``, both of which the float32
#: schedules use; 0.6.0 has no ``jax.shard_map`` to test the sharded average with).
JAX_FLOOR = (0, 6, 2)

refuse_older("fastema.jax", "jax", jax.__version__, JAX_FLOOR, "jax",
             "on jax 0.4.35 a vmapped update fails: no batching rule for optimization_barrier")
