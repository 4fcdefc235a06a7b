"""Checkpoints and exports of a torch average: state dicts, full and sharded, ``save`` and
``load`` (:mod:`.checkpoint`), a split average's pieces as checkpoint entries (:mod:`.slices`),
the ranks' agreement before a collective read or load (:mod:`.agree`), and PEFT adapters
(:mod:`.peft`).

May import :mod:`fastema.torch._sharding`, :mod:`fastema.torch._tensors` and
:mod:`fastema.torch._placement`; none of them imports it.
"""
