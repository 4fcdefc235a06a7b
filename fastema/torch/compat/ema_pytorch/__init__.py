"""lucidrains ema-pytorch's ``EMA``, ``KarrasEMA``, ``PostHocEMA`` (0.8) and 0.8.3's ``EMAPytree``
(``EMATensor``: ``EMA(tree)``) and ``EMAModuleWrapper``, on fastema's kernels.

Deviations (documented on each class): a model that cannot be deep-copied raises (ema-pytorch
exits); ``KarrasEMA`` uses the Delta-t decay, so the realised profile is the requested one for any
``update_every`` (the same numbers at ``update_every=1``); ``PostHocEMA`` writes its checkpoints
atomically and checks ``checkpoint_every_num_steps`` (an int >= 1 or ``"manual"``) and
``checkpoint_dtype`` (a floating ``torch.dtype``) at construction; ``EMAPytree``'s ``state_dict()``
holds the averaged tensors (``ema_pytree.<path>``; ema-pytorch's only the counters), a tree whose
structure or shapes changed is refused before anything changes, integer leaves are copied, not
averaged; ``EMAModuleWrapper`` checks every route before hooking any, and refuses ``ema=`` with EMA
arguments; ``EMA`` and ``EMAPytree`` refuse at construction an ``inv_gamma`` or ``power`` not
finite and > 0, a ``min_value`` outside [0, 1] and an ``update_after_step`` not an int >= 0
(ema-pytorch takes them: a NaN ``inv_gamma`` or ``power`` averages NaN in). Where ema-pytorch
asserts (``only_online`` with ``only_ema``, ``sigma_rel`` with ``gamma``, ...), the error is an
``AssertionError`` too (:class:`AssertionValueError`, :class:`AssertionTypeError`,
:class:`AssertionRuntimeError`: also the ``ValueError`` / ``TypeError`` / ``RuntimeError`` fastema
raises), so ``except AssertionError`` catches it as it catches ema-pytorch's.

One private module per concern: ``_base`` (the counters, the warm-up, the average step and
ema-pytorch's helpers, shared by the three families), ``_model`` (``EMA``, ``KarrasEMA``),
``_posthoc`` (``PostHocEMA``), ``_shared`` (``PostHocEMA``'s agreeing profiles on one shadow),
``_pytree`` (``EMAPytree``), ``_wrapper`` (``EMAModuleWrapper``).
"""
from ._base import AssertionRuntimeError, AssertionTypeError, AssertionValueError, _inplace_copy, _inplace_lerp
from ._model import EMA, KarrasEMA
from ._posthoc import PostHocEMA
from ._pytree import EMAPytree, EMATensor
from ._wrapper import EMAModuleWrapper

__all__ = ["EMA", "EMAModuleWrapper", "EMAPytree", "EMATensor", "KarrasEMA", "PostHocEMA"]
# (the Assertion*Error classes are importable from here too; catching AssertionError or the
# ValueError / TypeError / RuntimeError they also are is what code ported from ema-pytorch does)

# A pickle (torch.save of a whole EMA) names each class, and the helpers ema.inplace_copy /
# ema.inplace_lerp wrap, by __module__ and name: they keep this package's path, as when it was one
# file, so files saved before and after the split load either way and no private module is named
# (the errors too: a traceback names the package).
for _named in (EMA, KarrasEMA, PostHocEMA, EMAPytree, EMAModuleWrapper, _inplace_copy, _inplace_lerp,
               AssertionValueError, AssertionTypeError, AssertionRuntimeError):
    _named.__module__ = __name__
del _named
