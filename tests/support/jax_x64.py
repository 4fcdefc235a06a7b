"""``jax.enable_x64`` as the tests use it (a context manager: float64 on or off inside), on every
jax fastema supports: top-level from jax 0.8, ``jax.experimental.enable_x64`` before (0.6.2-0.7,
where fastema's floor is)."""
from typing import Any


def enable_x64(on: bool = True) -> Any:
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    import jax.experimental

    return getattr(jax.experimental, "enable_x64")(on)     # gone from jax.experimental in 0.10
