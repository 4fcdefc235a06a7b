"""Which of a model's tensors are averaged and where they sit: the registration hooks, names and
patterns (:mod:`.hooks`), the slots of tracked tensors and the per-step check (:mod:`.slots`),
the model side of an average (:mod:`.model`: ``TorchModel``), a target network's pairs
(:mod:`.pairs`: ``TorchPairs``), and following a model that changed (:mod:`.follow`, written
once for both sides).

Imports :mod:`fastema.torch._sharding` only, of the torch face's sub-packages.
"""
