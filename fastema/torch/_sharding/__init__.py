"""Other libraries' sharding, as fastema reads it: DTensors (FSDP2 ``fully_shard``, tensor
parallel, HSDP) and DeepSpeed ZeRO-3 partitions (:mod:`.tensors`), and the float32 master
weights DeepSpeed's optimizers keep (:mod:`.masters`).

The lowest of the torch face's sub-packages: it imports none of the others (``_tensors``,
``_placement`` and ``_state`` import it). fastema's own split of an average over replicas
(``shard_replicas=``) is not here: it is a placement (:mod:`fastema.torch._placement.replicas`).
"""
