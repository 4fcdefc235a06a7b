"""Where an average lives, and the one place its shadow is chosen (:mod:`.pick`:
``make_shadow``, and the ``Offload`` / ``ShardReplicas`` options): on the weights' device
(:class:`fastema.FlatShadow`, :class:`fastema.WindowShadow`), in host memory through two staging
chunks (:mod:`.offload`, :mod:`.offload_ring`, folded on a worker thread, :mod:`.folds`), read
from an optimizer's host masters (:mod:`.host_masters`), or split over the ranks that hold
replicas of the model (:mod:`.replicas`); what each holds in memory (:mod:`.memory`).

Imports :mod:`fastema.torch._sharding` only, of the torch face's sub-packages (a shadow is handed
its sources; it never imports the model side).
"""
