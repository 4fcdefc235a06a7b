"""Post-hoc EMA: any power-function profile synthesised, after training, from stored snapshots.

Karras et al. 2024 (EDM2, arXiv 2312.02696, Sec. 3 and App. C) track a few power-function EMA
profiles during training (:class:`fastema.torch.PostHocEMA`), store snapshots of them, and
afterwards reconstruct the average of any other profile as the least-squares combination of
the stored ones (:func:`solve`: the maths, numpy only). :func:`synthesize` combines the
snapshots, one tensor at a time, and loads the result into a model (:func:`synthesize_iter` yields
the tensors as they are combined); :func:`plot_profiles` draws the profiles. The snapshot file
format is fastema's own (version 2: :data:`FORMAT`, written by ``write_snapshot``, read and checked
by :func:`read_snapshots`). This ``__init__`` is the package's surface; its modules are private.

Command line: ``python -m fastema posthoc DIR --sigma-rel 0.07 --out ema.safetensors``
(``--plot profiles.png`` draws the profiles; :mod:`fastema.cli.posthoc`).

Snapshot folders are safe to read from anyone: nothing in one is executed (its one kind of
pickle, a DCP snapshot's metadata, is read by a restricted unpickler that builds DCP's metadata
classes only and sets no state outside them: :mod:`fastema._io.dcp_unpickler`), only regular files are
opened, and every file is checked (one run per folder, shapes, checksums, sizes) before a tensor
of it is used. On the writing side, ``check_folder`` keeps one run per folder (a claim file,
created whole and exclusively through :mod:`fastema._io.files`).

Importing this package imports numpy only; torch is imported when a snapshot is written, read or
synthesised (safetensors files are read by fastema's own reader: ``pread`` from a descriptor held
open, never a memory map, so a snapshot truncated while it is read is a ValueError naming it).
"""
# Not in __all__: atomic_write and the sigma_rel maths (importable here before 0.2), VERSION,
# LEGACY_RUN_ID; what the faces' writers and fastema.merge's reader call (check_folder, run_owns, write_snapshot,
# add_kept, valid_run_id, the tensor keys, snapshot_at, tensor_reader; SynthesisPlan, PostHocEMA.iter_weights'
# synthesis; pyplot, matplotlib asked for before the command line writes).
from .._io.files import atomic_write  # noqa: F401
from ..schedules import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma  # noqa: F401
from ._folder import check_folder, run_owns  # noqa: F401
from ._plot import plot_profiles, pyplot  # noqa: F401
from ._profiles import MAX_ERROR, Solution, profile, profile_dot, solve
from ._snapshots import (  # noqa: F401
    FORMAT,
    LEGACY_RUN_ID,
    VERSION,
    Snapshot,
    SnapshotError,
    SnapshotMeta,
    add_kept,
    kept_key,
    profile_key,
    read_snapshots,
    same_run,
    snapshot_at,
    tensor_reader,
    valid_run_id,
    write_snapshot,
)
from ._synthesis import SynthesisPlan, Synthesized, synthesize, synthesize_iter  # noqa: F401

__all__ = ["FORMAT", "MAX_ERROR", "Snapshot", "SnapshotError", "SnapshotMeta", "Solution", "Synthesized",
           "plot_profiles", "profile", "profile_dot", "read_snapshots", "solve", "synthesize", "synthesize_iter"]

