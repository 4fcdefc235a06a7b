"""What a merge did (:class:`MergeReport`), the memory it held, and its progress bar."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

__all__ = ["MergeReport", "anon_bytes", "Progress"]


def anon_bytes() -> int | None:
    """This process's anonymous resident memory now (``RssAnon`` of ``/proc/self/status``: heap and
    buffers, not the file pages of memory-mapped inputs), or None where there is no ``/proc``."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclasses.dataclass
class MergeReport:
    """What :func:`fastema.merge.merge_checkpoints` did (or, with ``dry_run``, would do).

    Attributes:
        out: the output path.
        inputs: the input paths, in order (a snapshot folder: one per stored profile).
        formats: each input's format (``safetensors``, ``huggingface``, ``torch``, ``dcp``,
            ``snapshot``).
        steps: each input's training step (None where it records none).
        weights: the normalised weight of each input.
        style: the weight style; ``formula``: what it computed.
        dtype: the output dtype asked for (``same``: each tensor's input dtype).
        averaged: names of the averaged tensors; ``copied``: ``name -> why`` of the tensors copied
            from the ``copy_from`` input; ``tied``: ``alias -> name`` of tensors written once;
            ``dropped``: entries left out (optimizer state); ``not_written``: entries the output
            format cannot hold (a torch file's non-tensor entries in safetensors); ``not_copied``:
            ``name -> why`` of the small files of the ``copy_from`` folder a merged folder did not
            copy (a link out of that folder, a FIFO or device: only regular files inside it are).
        copy_from: the input the copied entries come from.
        files: the files written (relative to ``out`` for a folder).
        bytes_read, bytes_written: bytes of tensor data read from the inputs and written.
        seconds: wall time of the whole merge.
        peak_anon_bytes: the largest anonymous resident memory (``RssAnon``) seen during the merge,
            less the amount before it (None without ``/proc``).
        verified: every output tensor was read back and checked against the plan.
        dry_run: nothing was written.
    """
    out: str
    inputs: list
    formats: list
    steps: list
    weights: tuple
    style: str
    formula: str
    dtype: str
    averaged: list = dataclasses.field(default_factory=list)
    copied: dict = dataclasses.field(default_factory=dict)
    tied: dict = dataclasses.field(default_factory=dict)
    dropped: list = dataclasses.field(default_factory=list)
    not_written: list = dataclasses.field(default_factory=list)
    not_copied: dict = dataclasses.field(default_factory=dict)
    copy_from: int = -1
    files: list = dataclasses.field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_anon_bytes: int | None = None
    verified: bool = False
    dry_run: bool = False

    def weights_table(self) -> str:
        """One line per input: its weight, step and path (printed before a merge)."""
        lines = [f"weights ({self.style}): {self.formula}"]
        for i, (w, path, step) in enumerate(zip(self.weights, self.inputs, self.steps)):
            at = "" if step is None else f" step {step:g}" if isinstance(step, float) else f" step {step}"
            lines.append(f"  {i:>3}  {w:10.6f}{at}  {path}" + ("  (weight 0: not read)" if w == 0 else ""))
        return "\n".join(lines)

    def summary(self) -> str:
        """What was done, in a few lines."""
        verb = "would write" if self.dry_run else "wrote"
        rate = self.bytes_read / self.seconds / 2**20 if self.seconds > 0 else 0.0
        lines = [f"{verb} {self.out}: {len(self.averaged)} tensors averaged, {len(self.copied)} copied from input "
                 f"{self.copy_from}" + (f", {len(self.tied)} tied names written once" if self.tied else "")]
        if not self.dry_run:
            lines.append(f"read {_size(self.bytes_read)}, wrote {_size(self.bytes_written)} in {self.seconds:.2f} s "
                         f"({rate:.0f} MiB/s read)"
                         + ("" if self.peak_anon_bytes is None else
                            f", peak anonymous memory +{_size(self.peak_anon_bytes)}")
                         + (", verified" if self.verified else ""))
        if self.dropped:
            lines.append(f"left out (optimizer state, entries outside the model's state): {len(self.dropped)} "
                         f"({_few(self.dropped)})")
        if self.not_written:
            lines.append(f"not written (not tensors; a .safetensors output holds tensors only): "
                         f"{_few(self.not_written)}")
        if self.not_copied:
            shown = [f"{name} ({why})" for name, why in self.not_copied.items()]
            lines.append(f"not copied from input {self.copy_from}'s folder (only regular files inside it are): "
                         f"{_few(shown, 8)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.weights_table() + "\n" + self.summary()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _few(names: list, n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class Progress:
    """A tqdm bar of the bytes read, with bytes/s (tqdm imported only when shown; no bar where
    tqdm is not installed). ``show``: True, False, or None (when stderr is a terminal)."""

    def __init__(self, total: int, show: bool | None):
        self._bar: Any = None
        if show is None:
            show = sys.stderr.isatty()
        if not show or total <= 0:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", leave=False,
                         dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
