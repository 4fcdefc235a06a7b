"""The oldest JAX ``fastema.jax`` runs on (``fastema._floors.FLOORS``), checked first at its import."""
import jax

from .._floors import refuse_older

refuse_older("fastema.jax", "jax", jax.__version__,
             "0.6.2 is the oldest release every test of fastema.jax passed on "
             "(before it, jax has no jax.shard_map to test the sharded average with; "
             "on 0.4.35 a vmapped update fails, and 0.4.30 has no public "
             "jax.lax.optimization_barrier)")
