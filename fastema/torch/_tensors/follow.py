"""Following a model that changed under its average, written once: :class:`Followed`, the base of
the model side (:class:`~fastema.torch._tensors.model.TorchModel`) and of a target network's pair
side (:class:`~fastema.torch._tensors.pairs.TorchPairs`).

The usual step costs one check (:meth:`fastema.torch._tensors.slots.Slots.unchanged`: an address
and a layout per tensor, a ``len()`` per module table on the way). torch's registration hooks
(:func:`fastema.torch.registration_hooks`) set :attr:`Followed.stale` when a parameter, buffer or
submodule is set on a watched module. When something changed, :meth:`Followed.follow` asks the
side to look its tensors up again (``_relook``): by name, checked against what the average was
made of, and followed, or refused by name before anything is written.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Followed"]


class Followed:
    """A side that follows its modules' tensors (see the module). ``slots`` is its
    :class:`~fastema.torch._tensors.slots.Slots`; ``stale`` is set by the registration hooks."""

    slots: Any
    stale = False

    def follow(self) -> bool:
        """Before reading or writing the tensors: follow re-registered or moved tensors (or refuse,
        writing nothing). True when something had changed (and was followed)."""
        if self.slots.unchanged(self.stale):           # the usual step: nothing moved
            return False
        moved, renamed = self.slots.changes(self.stale)
        self._relook(moved, renamed)
        self.stale = False
        return True

    def _relook(self, moved: bool, renamed: bool) -> None:
        """Follow the change ``Slots.changes`` found: ``moved`` (storage moved under a tracked
        tensor, or a tensor replaced) or ``renamed`` (a registration or a module table changed: new
        names?); refuse by name, writing nothing, what no longer fits."""
        raise NotImplementedError
