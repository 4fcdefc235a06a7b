"""WeightEMA on the JAX backend: :class:`fastema.jax.EMA` over a Keras model, with the swap the
callback needs, and the one place fastema reads Keras's private training state.

During ``fit`` on the JAX backend, Keras keeps the newest trainable weights and metric
variables in ``model._jax_state`` (a dict of arrays the compiled step returns) and writes
them back into the Variables only when it syncs (``model.jax_state_sync()``; a flag
``model._jax_state_synced`` says whether it has). Reading the Variables between syncs would
read stale values, and syncing every batch is what Keras avoids. :func:`trainable_values`,
:func:`metric_values` and :func:`sync` are the only reads of that private state;
``tests/bridges/test_keras.py`` pins them against the installed Keras, so a Keras release that
renames them fails there, not in a user's fit.
"""
from __future__ import annotations

from ..average import Face, FaceNonFinite, ModelSwap

__all__ = ["metric_values", "positions", "sync", "trainable_values"]


def positions(model, variables: list) -> list:
    """Where fit's state holds each of ``variables`` (``(kind, position)``; None: in neither list, read
    from the variable itself), found by identity: fit's state lists the model's trainable (and
    non-trainable) variables in the model's order when fit starts, which is not the EMA's once layers
    were frozen or unfrozen since it was made (a frozen one: in the non-trainable state). Fixed for a
    fit (Keras's own sync relies on that): the caller finds them once per fit."""
    where: dict = {}
    for kind in ("non_trainable_variables", "trainable_variables"):      # (trainable last: it wins)
        where.update({id(v): (kind, i) for i, v in enumerate(getattr(model, kind))})
    return [where.get(id(v)) for v in variables]


def trainable_values(model, variables: list, at: list) -> list | None:
    """The newest values of ``variables`` while ``fit`` holds them outside the Variables, else None
    (``at``: their :func:`positions`)."""
    state = getattr(model, "_jax_state", None)
    if not state or getattr(model, "_jax_state_synced", True):
        return None
    return [v.value if p is None else state[p[0]][p[1]] for v, p in zip(variables, at)]


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


class _JaxModelEMA(Face, FaceNonFinite):
    """fastema.jax.EMA over a Keras model's trainable variables on the JAX backend, with the
    swap the callback needs. During ``fit`` the newest weights live in the trainer's state
    (``model._jax_state``), not in the variables, and are read from there."""

    def __init__(self, model, variables: list, decay, **kwargs):
        from ..jax import EMA

        self.model = model
        self.variables = list(variables)
        self.inner = EMA([v.value for v in self.variables], decay, **kwargs)
        self._core = self.inner._core
        self._raw: list | None = None
        self._at: list | None = None           # the variables' places in fit's state (positions)
        self._swap = ModelSwap(self._exchange, "the average is swapped into the model; swap() back first")

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    def new_fit(self) -> None:
        """A fit starts: the variables' places in its state are found again at its first read."""
        self._at = None

    def _current(self) -> list:
        if self._at is None and getattr(self.model, "_jax_state", None):
            self._at = positions(self.model, self.variables)
        newest = None if self._at is None else trainable_values(self.model, self.variables, self._at)
        return [v.value for v in self.variables] if newest is None else newest

    def update(self) -> None:
        self._swap.refuse("update()")
        self.inner.update(self._current())

    def swap(self) -> None:
        if not self._swap.swapped:                             # a swap in: refused for inf or NaN
            self._core.refuse_nonfinite("swap()", 0)
        self._swap.swap(0)

    def _exchange(self, row: int, into_model: bool) -> None:
        # The newest weights into the variables first. Out of the model too: after an exception in
        # the validation inside fit, fit's own clean-up would otherwise sync the validation's state
        # (the average) over the raw weights put back here.
        sync(self.model)
        if into_model:
            self._raw = [v.value for v in self.variables]      # JAX arrays are immutable: an exact stash
            values = self.inner.shadow(allow_nonfinite=True)   # (checked by swap())
        else:
            values, self._raw = self._raw, None
        for v, a in zip(self.variables, values):
            v.assign(a)

    def copy_to(self) -> None:
        self._core.refuse_nonfinite("copy_to()", 0)
        for v, a in zip(self.variables, self.inner.shadow(allow_nonfinite=True)):
            v.assign(a)

    def repair_nonfinite(self) -> list[str]:
        """The averaged variables holding inf or NaN <- their newest weights; the names reset."""
        self._swap.refuse("repair_nonfinite()")
        return self.inner.repair_nonfinite(self._current())

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict, *, allow_nonfinite: bool | None = None) -> None:
        self.inner.load_state_dict(state, allow_nonfinite=allow_nonfinite)
