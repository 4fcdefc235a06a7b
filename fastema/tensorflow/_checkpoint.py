"""How :class:`fastema.tensorflow.EMA` goes into TensorFlow checkpoints: two tensors.

TensorFlow's object-based checkpoints (``tf.train.Checkpoint``, ``CheckpointManager``, the
``variables/`` of a SavedModel) ask each trackable object for a dict of named tensors
(``_serialize_to_tensors``) and hand the same names back on restore
(``_restore_from_tensors``). The EMA answers with two, whatever its variables:

- ``state``: a JSON string, the header of :meth:`fastema.average.Average.state_dict` as the one
  state codec makes it (``fastema._state.to_named``: format, version, plan, settings) plus, for
  every averaged variable in order, its name, shape, shadow dtype and rows;
- ``shadow``: every shadow row of every variable, in that order, as raw bytes (``uint8``): bit
  for bit, bfloat16 and float64 shadows included.

Two fixed names make TensorFlow always find both, so the EMA, not TensorFlow, decides what
loads: a checkpoint of other variables is refused naming them, before anything changes.
"""
from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

from .. import _backends
from .._checkpoint_format import check_header, from_named, load_refused, refuse_load, to_named

STATE, SHADOW = "state", "shadow"


def savedmodel_trace() -> bool:
    """True while ``tf.saved_model.save`` traces an object's save function (TensorFlow names that
    graph ``save_fn``). What is traced there runs again whenever the SavedModel is loaded, in any
    process: it must hold no Python (no ``numpy_function``), and the values it returns are never
    the ones written to the SavedModel's ``variables/`` (those are read eagerly)."""
    return str(getattr(tf.compat.v1.get_default_graph(), "name", "")).startswith("save_fn")


def traced_placeholder(core) -> dict:
    """What a SavedModel's traced save function returns for an EMA: a state that says so, and zeros
    of the shadow's size (the restore function TensorFlow traces from it takes the real shadow's
    shape). Restoring it is refused by name; the SavedModel's own checkpoint holds the real tensors."""
    state = json.dumps({"format": core.format, "version": core.version, "traced": True}).encode()
    nbytes = sum(core.shadow.view(i, None).nbytes for i in range(len(core.names)))
    return {STATE: tf.constant(state), SHADOW: tf.zeros([nbytes], tf.uint8)}


def pack(core) -> tuple[bytes, np.ndarray]:
    """The ``state`` JSON and the ``shadow`` bytes of an :class:`~fastema.average.Average` (one host copy)."""
    header, named = to_named(core.state_dict(), who="fastema.tensorflow.EMA")
    arrays = list(named.values())                       # "averaged/<name>", in core.names' order
    head = {**header, "sources": [[n, list(shape), a.dtype.name, int(a.shape[0])]
                                  for n, shape, a in zip(core.names, core.shapes, arrays)]}
    blob = np.empty(sum(a.nbytes for a in arrays), np.uint8)
    at = 0
    for a in arrays:
        blob[at:at + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        at += a.nbytes
    return json.dumps(head).encode(), blob


def unpack(core, state: bytes, blob: np.ndarray) -> dict:
    """The :meth:`~fastema.average.Average.state_dict` that ``state`` and ``blob`` hold, checked
    against ``core`` (names, shapes, shadow dtypes, rows, sizes); ValueError naming every
    difference, with nothing changed, if they do not fit."""
    fmt = core.format
    try:
        head = json.loads(bytes(state).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:       # (JSON nested past the stack)
        raise load_refused(f"the {fmt} checkpoint's state is not readable JSON ({err}); restore a checkpoint this "
                           f"EMA's class saved.") from None
    check_header(head, fmt, core.version, "restore a checkpoint a fastema.tensorflow.EMA saved")
    if head.get("traced"):
        refuse_load(fmt, ["it was written by the save function of a loaded SavedModel (the object tf.saved_model.load "
                          "returns holds no EMA), so it has no shadow; restore the SavedModel's own "
                          "variables/variables, or a checkpoint of the live EMA"])
    saved = head.get("sources")
    if not isinstance(saved, list):
        refuse_load(fmt, ["no list of averaged variables"])
    refuse_load(fmt, [f"sources[{i}] is not [name, shape (a list), dtype, rows]: {s!r:.80}" for i, s in enumerate(saved)
                      if not (isinstance(s, list) and len(s) == 4 and isinstance(s[1], list))])
    names = [s[0] for s in saved]
    problems: list[str] = []
    core.check_plan_state(head, problems)
    missing = [n for n in core.names if n not in names]
    extra = [n for n in names if n not in core.names]
    if missing:
        problems.append(f"this EMA averages {missing[:5]}{' ...' if len(missing) > 5 else ''}, which the "
                        f"checkpoint does not have")
    if extra:
        problems.append(f"the checkpoint averages {extra[:5]}{' ...' if len(extra) > 5 else ''}, which this EMA "
                        f"does not")
    if not missing and not extra and names != core.names:
        problems.append("the checkpoint has the same variables in another order; make the EMA from the variables "
                        "in the order it was saved with")
    refuse_load(fmt, problems)
    mine = [_backends.to_host(core.shadow.view(i, None)[:0]) for i in range(len(core.names))]   # dtypes, no data
    arrays, at = {}, 0
    for (name, shape, dtype, rows), shape_now, empty in zip(saved, core.shapes, mine):
        expected = (core.shadow.rows, *shape_now)
        if (rows, *shape) != expected:
            problems.append(f"{name} has shape {tuple([rows, *shape])}, expected {expected}")
        elif dtype != empty.dtype.name:
            problems.append(f"{name} has a {dtype} shadow, this EMA a {empty.dtype.name} one (shadow_dtype=); "
                            f"make the EMA with the shadow dtype it was saved with")
        else:
            size = int(np.prod(expected)) * empty.dtype.itemsize
            if at + size <= blob.size:
                arrays[name] = blob[at:at + size].view(empty.dtype).reshape(expected)
            at += size
    if not problems and at != blob.size:
        problems.append(f"the shadow holds {blob.size} bytes, the variables need {at}")
    refuse_load(fmt, problems)
    header = {k: v for k, v in head.items() if k != "sources"}
    return from_named(header, ((f"averaged/{n}", a) for n, a in arrays.items()), fmt, groups=("averaged",))
