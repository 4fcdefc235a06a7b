"""Checkpoint merging: the weighted average of saved checkpoints, at disk speed, in bounded memory.

``merge_checkpoints(inputs, out, weights="uniform", dtype="same", ...)`` reads every floating
tensor of the inputs one tensor (or one 512 KiB piece of one) at a time, copied into small buffers
(``read="pread"``; ``read="mmap"`` reads safetensors and torch files in place, for inputs nothing
else writes: one shrunk during the merge can kill the process with SIGBUS), through a compiled
multi-input weighted-sum kernel (float32 accumulation, float64 on request; the next piece read and
the last one written on helper threads meanwhile), and writes the merge into a temporary folder
beside ``out`` that is renamed into place when it is whole (:mod:`fastema._io.files`). Command
line: ``python -m fastema merge OUT INPUT... --weights minus-sqrt``.

The inputs are detected from what is on disk (safetensors files, Hugging Face model folders, torch
files read with ``weights_only=True``, DCP folders, post-hoc snapshot folders) and every one is
checked against the first before anything is written (names, shapes, dtypes, tied tensors). The
weight styles (uniform, Megatron-LM's ``linear`` / ``minus-sqrt``, EMA by steps, WSM's
decay-emulating weights, EDM2's ``sigma_rel``, explicit lists) and their formulas are
:func:`merge_weights`'; what a merge did is its :class:`MergeReport`. This ``__init__`` is the
package's surface: its modules are private.

Guide: "Merge checkpoints instead of decaying the learning rate" (``docs/guides/merging.md``).
"""
# Not in __all__: MergeOptions, the options merge_checkpoints checks (python -m fastema merge's flags).
from ._core import merge_checkpoints
from ._options import MergeOptions  # noqa: F401
from ._report import MergeReport
from ._source import MergeError
from ._weights import STYLES, Weights, merge_weights

__all__ = ["MergeError", "MergeReport", "STYLES", "Weights", "merge_checkpoints", "merge_weights"]
