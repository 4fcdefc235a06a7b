"""Checkpoints and exports of a torch average: state dicts, full and sharded, ``save`` and
``load`` (:mod:`.checkpoint`), a split average's pieces as checkpoint entries (:mod:`.slices`),
the ranks' agreement before a collective read or load (:mod:`.agree`), PEFT adapters
(:mod:`.peft`), a sharded attached average in the optimizer's per-parameter entries
(:mod:`.attached`; DCP's calls told by :mod:`.dcp_calls`), and a stream checked and cut into
buckets as the inference engines take it (:mod:`.wire`, for :mod:`fastema.torch.engines`).

May import :mod:`fastema.torch._sharding`, :mod:`fastema.torch._tensors` and
:mod:`fastema.torch._placement`; none of them imports it.
"""
