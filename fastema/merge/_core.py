"""The merge driver: inputs -> weights -> plan -> one tensor (or one piece of one) at a time
through the compiled weighted-sum kernel (:mod:`fastema.kernels.merge_cpu`) -> the output,
written into a temporary folder and renamed into place (:mod:`._writer`)."""
from __future__ import annotations

import json
import os
import time
import zlib
from typing import Callable, Sequence

from .._io.safe_files import open_regular
from .._io.safetensors import SafetensorsWriter
from ._engine import Engine
from ._inputs import open_input
from ._options import MergeOptions
from ._plan import Plan, make_plan, shards
from ._report import MergeReport, Progress, anon_bytes
from ._safetensors_input import read_safetensors_header
from ._source import MergeError
from ._weights import merge_weights
from ._writer import Output, copy_small, small_files

__all__ = ["merge_checkpoints"]

MAX_SHARD_BYTES = 5 * 10**9
"""A merged model folder is cut into safetensors shards of at most this many bytes (Hugging Face's
default), unless the ``copy_from`` input is a folder whose shards it copies."""
_COPY_BYTES = 16 << 20


def merge_checkpoints(inputs: Sequence, out, weights="uniform", dtype: str = "same", *, copy_from="last",
                      only: str | None = None, exclude: str | None = None, steps: Sequence | None = None,
                      allow_negative: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                      accumulate: str = "float32", optimizer: bool = False, verify: bool = False,
                      dry_run: bool = False, overwrite: bool = False, progress: bool | None = None,
                      log: Callable[[str], None] | None = None, read: str = "pread",
                      max_error: float | None = None) -> MergeReport:
    """Merge checkpoints: every floating tensor the weighted sum of the inputs' (see
    :mod:`fastema.merge`).

    Args:
        inputs: checkpoint paths, oldest first: safetensors files, Hugging Face model folders,
            torch ``.pt``/``.bin`` files, torch DCP folders, post-hoc snapshot folders (mixed
            formats are fine when names and shapes agree).
        out: the output: a ``.safetensors`` file, or a folder (a Hugging Face model folder:
            ``model.safetensors`` or shards, with the ``copy_from`` input's config, tokenizer and
            other small files when it is such a folder).
        log: where the weights are printed before the merge (None: not printed).
    <<options>>

    Returns:
        A :class:`MergeReport` (also with ``dry_run``).

    Raises:
        MergeError: a ``ValueError`` naming the input and the tensor: inputs that do not match
            (a missing or extra tensor, a shape or dtype), a truncated or damaged file, a pickle
            that is not a state dict, a symbolic-link loop, weights refused, too little disk, a
            tensor tied in one input and stored apart in another, an ``out`` that appeared while
            the merge ran (without ``overwrite``: another merge published there first; it is left
            as it is), an input truncated during the merge; or an option refused (before any input
            is opened). Nothing is written and no input changes. Any error or Ctrl-C during the merge removes what was
            written.
    """
    arguments = locals()
    options = MergeOptions(**{name: arguments[name] for name in MergeOptions.names()})
    return _merge(inputs, out, options, log)


if merge_checkpoints.__doc__:                   # each option's text is MergeOptions' (python -OO: none)
    merge_checkpoints.__doc__ = merge_checkpoints.__doc__.replace("    <<options>>", MergeOptions.docs(8))


def _merge(inputs: Sequence, out, options: MergeOptions, log: Callable[[str], None] | None) -> MergeReport:
    """:func:`merge_checkpoints` with its options checked."""
    t0 = time.perf_counter()
    base_anon = anon_bytes()
    if isinstance(inputs, (str, os.PathLike)) or len(inputs) < 1:
        raise MergeError("inputs must be a list of one or more checkpoint paths")
    out = os.fspath(out)
    as_folder = not out.lower().endswith(".safetensors")
    _not_an_input(out, inputs)
    if not options.dry_run:
        Output.check(out, as_folder, options.overwrite)
    sources: list = []
    try:
        for i, path in enumerate(inputs):
            sources += open_input(path, i, read=options.read, optimizer=options.optimizer)
        steps = options.steps
        if steps is not None and len(steps) != len(sources):
            raise MergeError(f"{len(steps)} step(s) given for {len(sources)} input(s): give one per input")
        known = list(steps) if steps is not None else [s.step for s in sources]
        try:
            w = merge_weights(options.weights, len(sources), steps=known, seed=options.seed,
                              allow_negative=options.allow_negative, profiles=[s.profile for s in sources],
                              max_error=options.max_error)
        except ValueError as err:
            raise MergeError(str(err)) from None
        plan = make_plan(sources, options, readers=sum(v != 0 for v in w.values))
        report = _report(out, sources, known, w, options.dtype, plan)
        donor = sources[plan.copy_from]
        extra, report.not_copied = small_files(donor.folder) if as_folder and donor.folder else ([], {})
        if log is not None:
            log(report.weights_table())
        if options.dry_run:
            report.dry_run = True
            report.seconds = time.perf_counter() - t0
            return report
        files = shards(plan, donor.layout, MAX_SHARD_BYTES) if as_folder else [(os.path.basename(out), None)]
        need = plan.bytes_written + sum(size for _, _, size in extra) + (1 << 20)
        target = Output(out, as_folder, options.overwrite, need)
        try:
            peak = _write(target, files, extra, sources, plan, w.values, report, options)
            target.publish()
        except BaseException:
            try:                            # the inputs first: the removal needs descriptors they may hold
                _close(sources)
            except Exception:               # the error that stopped the merge is the one to report
                pass
            finally:
                target.discard()
            raise
        report.peak_anon_bytes = None if base_anon is None or peak is None else max(0, peak - base_anon)
        report.verified = options.verify
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        _close(sources)


def _close(sources: list) -> None:
    """Close every input (each once: the list is emptied), the first error raised after all."""
    first = None
    while sources:
        try:
            sources.pop(0).close()
        except BaseException as err:        # the others still close
            first = first or err
    if first is not None:
        raise first


def _not_an_input(out: str, inputs) -> None:
    """Refuse an ``out`` that is an input, lies inside an input's folder (writing it would change that
    input), or holds an input (a folder ``out`` is replaced whole), links resolved."""
    real_out = os.path.realpath(out)
    for i, path in enumerate(inputs):
        try:
            same = os.path.exists(out) and os.path.samefile(out, path)
        except OSError:
            same = False
        real_in = os.path.realpath(os.fspath(path))
        if same or real_out == real_in:
            raise MergeError(f"out {out!r} is input {i}: the merge never writes over an input; write elsewhere")
        if os.path.commonpath([real_out, real_in]) == real_in:
            raise MergeError(f"out {out!r} lies inside input {i} ({os.fspath(path)!r}): writing it would change that "
                             f"input; write outside it")
        if os.path.commonpath([real_out, real_in]) == real_out:
            raise MergeError(f"out {out!r} holds input {i} ({os.fspath(path)!r}): replacing it would remove that "
                             f"input; write elsewhere")


def _report(out, sources, steps, w, dtype, plan: Plan) -> MergeReport:
    report = MergeReport(out=out, inputs=[s.display for s in sources],
                         formats=[s.format for s in sources], steps=steps, weights=w.values, style=w.style,
                         formula=w.formula, dtype=dtype, copy_from=plan.copy_from, bytes_read=plan.bytes_read,
                         bytes_written=plan.bytes_written)
    for it in plan.items:
        if it.action == "average":
            report.averaged.append(it.name)
        elif it.action == "copy":
            report.copied[it.name] = it.why
        for a in it.aliases:
            report.tied[a] = it.name
    report.dropped = sorted({d for s in sources for d in s.dropped})
    return report


def _write(target: Output, files, extra, sources, plan: Plan, weights, report: MergeReport,
           options: MergeOptions) -> int | None:
    """Every output file into ``target.folder``; returns the peak anonymous memory seen."""
    items = {it.name: it for it in plan.items}
    objects = [it.name for it in plan.items if it.action == "object"]
    report.not_written = objects
    meta = {"format": "pt", "fastema.merge": json.dumps({"style": report.style, "weights": list(report.weights),
                                                         "inputs": report.inputs, "dtype": report.dtype},
                                                        separators=(",", ":"))}
    if report.tied:
        meta["fastema.tied"] = json.dumps(report.tied, separators=(",", ":"))
    donor = sources[plan.copy_from]
    bar = Progress(plan.bytes_read, options.progress)
    engine = Engine(sources, donor, weights, wide=options.accumulate == "float64",
                    stochastic=options.stochastic_rounding, seed=options.seed, read=options.read)
    peak = [anon_bytes()]

    def sample() -> None:
        now = anon_bytes()
        if now is not None and (peak[0] is None or now > peak[0]):
            peak[0] = now

    written = {}
    try:
        for file, names in files:
            names = names if names is not None else [it.name for it in plan.items if it.action != "object"]
            tensors = [(n, items[n].out_dtype, items[n].shape, items[n].nbytes) for n in names]
            label = os.path.join(target.given, file) if target.as_folder else target.given
            writer = SafetensorsWriter(target.path(file), tensors, meta, crc=options.verify, label=label)
            try:
                engine.write_items([items[n] for n in names], writer.write, bar, sample)
                writer.close()
            except BaseException:
                writer.abandon()
                raise
            written[file] = (names, writer.crcs)
        if target.as_folder:
            for name, path, _ in extra:
                why = copy_small(path, target.path(name))
                if why:
                    report.not_copied[name] = why
            if len(files) > 1 or (donor.layout is not None and os.path.exists(
                    os.path.join(donor.folder, "model.safetensors.index.json"))):
                index = {"metadata": {"total_size": plan.bytes_written},
                         "weight_map": {n: f for f, names in files for n in names}}
                with open(target.path("model.safetensors.index.json"), "x") as fh:
                    json.dump(index, fh, indent=2)
        report.files = sorted(os.listdir(target.folder)) if target.as_folder else [os.path.basename(target.out)]
    finally:
        bar.close()
    if options.verify:
        _verify(target, written, items)
    return peak[0]


def _verify(target: Output, written: dict, items: dict) -> None:
    """Every file written, read back: its header against the plan, each tensor's CRC-32 against the
    one computed while writing."""
    for file, (names, crcs) in written.items():
        path = target.path(file)
        entries, _, offsets, _ = read_safetensors_header(path, f"the output {file!r}")
        if list(entries) != list(names):
            raise MergeError(f"verify: the output {file!r} holds {sorted(entries)[:5]}..., the plan "
                             f"{sorted(names)[:5]}...")
        with open_regular(path) as f:
            for n in names:
                e, it = entries[n], items[n]
                if (e.dtype, tuple(e.shape)) != (it.out_dtype, tuple(it.shape)):
                    raise MergeError(f"verify: tensor {n!r} of {file!r} is {e.dtype} {list(e.shape)}, the plan "
                                     f"says {it.out_dtype} {list(it.shape)}")
                f.seek(offsets[n])
                crc, left = 0, e.nbytes
                while left:
                    data = f.read(min(left, _COPY_BYTES))
                    if not data:
                        raise MergeError(f"verify: {file!r} ends inside tensor {n!r}")
                    crc = zlib.crc32(data, crc)
                    left -= len(data)
                if crc != crcs[n]:
                    raise MergeError(f"verify: tensor {n!r} of {file!r} reads back with CRC-32 {crc:08x}, "
                                     f"{crcs[n]:08x} was written: the disk or file system changed it")
