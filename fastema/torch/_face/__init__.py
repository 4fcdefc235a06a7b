"""What every torch face shares: the torch-face contract (:mod:`.contract`: the parts, typed by
the protocols they are, and :class:`~.contract.TorchFace`, the one base that takes them), a model
average's read side and checkpoint methods (:mod:`.average`: ``TorchAverage``) and the compiled
step (:mod:`.compiled`: ``face.compiled``, the torch.compile operators). The faces' modules
(``ema.py``, ``window.py``, ``posthoc.py``, ``target.py``) build on them.

May import every other sub-package of :mod:`fastema.torch` and its shared modules (``_swap``);
none of the sub-packages imports it.
"""
