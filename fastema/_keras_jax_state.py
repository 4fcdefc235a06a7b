"""The one place fastema reads Keras's private training state on the JAX backend.

During ``fit`` on the JAX backend, Keras keeps the newest trainable weights and metric
variables in ``model._jax_state`` (a dict of arrays the compiled step returns) and writes
them back into the Variables only when it syncs (``model.jax_state_sync()``; a flag
``model._jax_state_synced`` says whether it has). Reading the Variables between syncs would
read stale values, and syncing every batch is what Keras avoids. These three functions are
the only reads of that private state; ``tests/bridges/test_keras.py`` pins them against the
installed Keras, so a Keras release that renames them fails there, not in a user's fit.
"""
from __future__ import annotations

__all__ = ["metric_values", "sync", "trainable_values"]


def trainable_values(model) -> list | None:
    """The newest trainable weights while ``fit`` holds them outside the Variables, else None."""
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True) and state.get("trainable_variables"):
        return list(state["trainable_variables"])
    return None


def metric_values(model, index: list[int]) -> list | None:
    """The metric variables at ``index`` (positions in ``model.metrics_variables``) from the
    training state, or None when the state holds none."""
    state = getattr(model, "_jax_state", None)
    if state and state.get("metrics_variables") is not None:
        return [state["metrics_variables"][i] for i in index]
    return None


def sync(model) -> None:
    """Write the training state into the Variables (a no-op outside ``fit``)."""
    sync_ = getattr(model, "jax_state_sync", None)
    if sync_ is not None:
        sync_()
