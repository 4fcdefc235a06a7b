"""Checkpoint merging: the weighted average of saved checkpoints, at disk speed, in bounded memory.

``merge_checkpoints(inputs, out, weights="uniform", dtype="same", ...)`` reads every floating
tensor of the inputs one tensor (or one 512 KiB piece of one) at a time, copied into small buffers
(``read="pread"``; ``read="mmap"`` reads safetensors and torch files in place, for inputs nothing
else writes: one shrunk during the merge can kill the process with SIGBUS), through a compiled
multi-input weighted-sum kernel (float32 accumulation, float64 on request; the next piece read and
the last one written on helper threads meanwhile), and writes the merge into a temporary folder
beside ``out`` that is renamed into place when it is whole. Command line: ``python -m fastema
merge OUT INPUT... --weights minus-sqrt``.

- :mod:`.weights`: the weight styles (uniform, Megatron-LM's ``linear`` / ``minus-sqrt``, EMA by
  steps, WSM's decay-emulating weights, EDM2's ``sigma_rel``, explicit lists), each with its formula;
- :mod:`.inputs`: the input formats, detected from what is on disk (safetensors, Hugging Face
  folders, torch files with ``weights_only=True``, DCP folders, post-hoc snapshots);
- :mod:`.plan`: every input checked against the first before anything is written, and what each
  entry becomes (averaged, copied from one input, tied, left out);
- :mod:`.writer`: the output files and their atomic publication;
- :mod:`.report`: :class:`MergeReport`; :mod:`.core`: the driver; ``_engine``: the pieces through
  the kernel.

Guide: "Merge checkpoints instead of decaying the learning rate" (``docs/guides/merging.md``).
"""
from ._source import MergeError
from .core import merge_checkpoints
from .report import MergeReport
from .weights import STYLES, Weights, merge_weights

__all__ = ["MergeError", "MergeReport", "STYLES", "Weights", "merge_checkpoints", "merge_weights"]
