"""The build of the shipped device code: the store filled ahead of time
(``python -m fastema warm --into kernels/device --set cu12|cu13``).

Every variant the launchers ask for (:func:`.variants.every_variant`) is compiled by the set's
compiler (:mod:`.cuda.compiler`: :class:`.cuda.compiler.NumbaCuda` for ``cu13``,
:class:`.cuda.compiler.Cu12` for ``cu12``) for every image of the set (:data:`SETS`), in spawned
worker processes (a CUDA 12 worker activates the CUDA 12.0 toolchain before anything uses NVVM),
each entry written as it is made into a node store beside the shipped one
(``<into>/.<set>-entries``, ignored by git: a build that stops goes on where it stopped, and a
variant whose sources, toolchain and launch bounds are unchanged is never compiled again), then
packed into the shipped set (``kernels._store.store.write_set``), with what built it. The same
compile and the same entry format as a run-time miss (:mod:`.cuda.device_code`), which writes one
image into the node store.
"""
from __future__ import annotations

import importlib.metadata as md
import multiprocessing
import os
import time
from typing import Any

from ...kernels import _bounds
from ...kernels._store import entry as E
from ...kernels._store import store as S
from ...kernels._store.files import write_whole
from ...kernels._store.identity import VARIANTS

SETS: dict[str, dict[str, Any]] = {
    "cu13": {"driver": 13000, "images": {"sm_80": 13000, "sm_90": 13000, "sm_100": 13000,
                                         "sm_120": 13000, "compute_80": 13000}},
    "cu12": {"driver": 12000, "images": {"sm_70": 12000, "sm_75": 12000, "sm_80": 12000,
                                         "sm_86": 12000, "sm_89": 12000, "sm_90": 12000,
                                         "sm_100": 12080, "sm_120": 12080, "compute_70": 12000}},
}
"""The shipped sets: the driver (``cuDriverGetVersion``) each needs, and each image's: the CUDA 12
set's Blackwell cubins are assembled by ptxas 12.8, the first to know them."""


def compiler_of(name: str, cu12_roots: tuple = (None, None)):
    """The compiler of set ``name`` (the CUDA 12 one's toolchains under ``cu12_roots``, default
    ``.toolchains/cu12-12.0`` and ``-12.8``)."""
    from ..cuda import compiler

    if name == "cu12":
        return compiler.Cu12(*cu12_roots)
    if name == "cu13":
        return compiler.NumbaCuda(base=(8, 0))
    raise ValueError(f"no compiled set {name!r}; the sets are {', '.join(SETS)}")


def _start(name: str, cu12_roots: tuple) -> None:
    """A worker's start: the CUDA 12 toolchain loaded before anything uses NVVM."""
    if name == "cu12":
        from ...kernels import _toolchain_cu12 as T

        T.activate(compiler_of(name, cu12_roots).tc)


def _work(job: tuple) -> int:
    """Compile the entries of ``keys`` missing from the staging store; returns how many variants
    were compiled."""
    name, staging, keys, images, cu12_roots = job
    from .variants import every_variant

    compiler = compiler_of(name, cu12_roots)
    identity = S.code_identity(compiler.identity())
    node, variants, done = S.Node(staging), every_variant(), 0
    for key in keys:
        dispatcher, types = variants[key]
        bounds = _bounds_of(name, dispatcher, images)
        missing = tuple(i for i in images if not os.path.exists(node.path(key, i, identity, bounds[i])))
        if not missing:
            continue
        t, c = time.perf_counter(), time.process_time()
        for image, (kind, code, entry, figures) in compiler.compile(dispatcher, types, missing).items():
            made = E.Entry(key, image, kind, entry, code, figures, identity, bounds[image])
            write_whole(node.path(key, image, identity, bounds[image]), E.dumps(made))
        done += 1
        print(f"{time.perf_counter() - t:6.1f} s ({time.process_time() - c:5.1f} CPU-s) "
              f"{len(missing)} images  {key[:90]}", flush=True)
    return done


def _bounds_of(name: str, dispatcher, images) -> dict:
    own = dispatcher.targetoptions.get("launch_bounds")
    return {i: _bounds.launch_bounds(name, i, VARIANTS[dispatcher], own) for i in images}


def _versions(name: str, compiler) -> dict:
    out = {}
    for dist in ("numba-cuda", "cuda-core") + (("nvidia-nvjitlink", "nvidia-nvvm") if name == "cu13" else ()):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "unknown"
    out["toolchain"] = compiler.identity().replace("\0", "; ")
    return out


def build(into: str, name: str, images=None, jobs: int = 1, say=print,
          cu12_roots: tuple = (None, None)) -> dict:
    """Fill compiled set ``name`` of the shipped store at ``into`` (see the module docstring) for
    ``images`` (default: every image of the set); returns its index."""
    from ...kernels import _toolchain_cu12 as T
    from .variants import every_variant

    spec = SETS[name]
    images = tuple(images or spec["images"])
    unknown = [i for i in images if i not in spec["images"]]
    if unknown:
        raise ValueError(f"set {name} has no image {', '.join(unknown)}; its images are "
                         f"{', '.join(spec['images'])}")
    compiler = compiler_of(name, cu12_roots)
    if name == "cu12":
        for tc, parts in ((compiler.tc, T.Toolchain.missing(compiler.tc)),
                          (compiler.late, compiler.late.missing(("ptxas",)) if set(images) & set(T.LATE) else None)):
            if parts:
                raise FileNotFoundError(parts)
    staging = os.path.join(into, f".{name}-entries")
    os.makedirs(staging, exist_ok=True)
    variants = every_variant()
    keys = list(variants)
    t0 = time.perf_counter()
    jobs = max(1, min(jobs, len(keys)))
    work = [(name, staging, keys[i::jobs], images, cu12_roots) for i in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_start, initargs=(name, cu12_roots)) as pool:
        compiled = sum(pool.map(_work, work, chunksize=1))
    identity = S.code_identity(compiler.identity())
    node, entries = S.Node(staging), []
    for key, (dispatcher, _) in variants.items():
        bounds = _bounds_of(name, dispatcher, images)
        for image in images:
            got = node.read(node.path(key, image, identity, bounds[image]), key, image, identity)
            if got is None:
                raise RuntimeError(f"the build made no {image} entry for {key}")
            entries.append(got)
    meta = {"driver": spec["driver"], "identity": identity, "toolchain": compiler.identity(),
            "built_by": _versions(name, compiler),
            "images": {i: {"kind": "ptx" if i.startswith("compute_") else "cubin", "driver": spec["images"][i]}
                       for i in images}}
    index = S.write_set(into, name, entries, meta)
    say(f"set {name}: {len(keys)} variants x {len(images)} images ({compiled} variants compiled), "
        f"{time.perf_counter() - t0:.0f} s with {jobs} jobs: {os.path.join(into, name)}")
    return index
