"""What every model average shares, whatever its framework: the swap state machine.

A model average (``fastema.torch.EMA`` / ``WindowAverage``, ``fastema.tensorflow.EMA``, the
Keras callbacks' JAX EMA) can put one of its averages into the model for evaluation and
take it out again. :class:`ModelSwap` owns which average is in, the re-entrant
evaluation block and the refusals while an average is in; the framework adapter supplies
``exchange(row, into_model)``, which moves the values (all or nothing: when it raises,
nothing changed and the state stays as it was, unless ``held()`` says part of the average
went in). A Ctrl-C during an exchange is held until
the exchange and the state are done, then raised.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from .._interrupts import ctrl_c_held

__all__ = ["ModelSwap"]


class ModelSwap:
    """Which average row sits in the model (None: the model's own weights).

    Args:
        exchange: ``exchange(row, into_model)``: put average ``row`` into the model
            (``into_model=True``) or the model's own weights back (``False``).
        while_in: how to say, in a refusal, that an average is in the model and what to do.
        held: whether the adapter holds part of an average in the model after an exchange in that
            raised (a split average's gather that failed after its first bucket was written); the
            state then says "in", so the way back (a swap) restores the raw weights. None: an
            exchange that raises changed nothing.
        refused: ``refused(row, err)``: where the exchange is a collective (a split average's), a
            swap refused before it (another row than the one in) joins it refusing with ``err``,
            so every rank raises at once instead of the others waiting in it; None: raised here.
    """

    def __init__(self, exchange: Callable[[int, bool], None], while_in: str, held: Callable[[], bool] | None = None,
                 refused: Callable[[int, BaseException], None] | None = None):
        self._exchange = exchange
        self._while_in = while_in
        self._held = held
        self._refused = refused
        self.row: int | None = None

    @property
    def swapped(self) -> bool:
        return self.row is not None

    def swap(self, row: int = 0) -> None:
        """Put average ``row`` into the model, or, when it is in, the model's own weights back."""
        if self.row is not None and row != self.row:
            err = RuntimeError(f"average {self.row} is swapped in; swap it back first (swap({self.row}))")
            if self._refused is not None:
                self._refused(row, err)           # the other ranks' swap back refused too (raises)
            raise err
        into = self.row is None
        with ctrl_c_held():                       # all of the exchange and the state, or none of it
            try:
                self._exchange(row, into)
            except BaseException:
                if into and self._held is not None and self._held():
                    self.row = row                # partly in (a gather that failed midway): the way back is a swap
                raise
            self.row = row if into else None

    @contextlib.contextmanager
    def block(self, row: int = 0, value: Any = None) -> Iterator[Any]:
        """Average ``row`` in for the block, the model's weights back on exit (also when it raises).
        Re-entrant: inside a block (or after ``swap()``) of the same row it leaves the weights as
        they are, and the outer one swaps back. Yields ``value``."""
        if self.row is not None:
            if row != self.row:
                raise RuntimeError(f"average {self.row} is swapped in; average {row} cannot be "
                                   f"swapped in inside that block")
            yield value
            return
        try:
            self.swap(row)                        # a refused swap changed nothing: nothing to put back
            yield value
        finally:
            if self.row == row:                   # in (also when a Ctrl-C held by the swap is raised after it),
                self.swap(row)                    # and not already swapped back inside the block

    def refuse(self, what: str) -> None:
        """RuntimeError naming ``what`` while an average is in the model."""
        if self.row is not None:
            raise RuntimeError(f"{what} while {self._while_in}")
