"""Checkpoints of one small model in every input format, a float64 reference of their merge, and a
fingerprint of files (to show a merge changed no input)."""
import errno
import hashlib
import json
import os

import numpy as np
import torch

from fastema._io import files
from fastema.kernels import _bits
from fastema.kernels.kinds import BF16, F16, F32, F64

NAMES = ("embed.weight", "block.0.attn.weight", "block.0.norm.weight", "block.0.mlp.bias", "head.h16", "head.f64")


def model_state(i: int, seed: int = 0) -> dict:
    """Checkpoint ``i`` of a run: floating tensors of every dtype, an integer step, a bool mask,
    Transformer Engine's _extra_state and an FP8 scale (both copied, never averaged)."""
    g = torch.Generator().manual_seed(seed * 1000 + i)
    return {
        "embed.weight": torch.randn(61, 17, generator=g),
        "block.0.attn.weight": torch.randn(23, 19, generator=g).bfloat16(),
        "block.0.norm.weight": 1 + 0.1 * torch.randn(19, generator=g),
        "block.0.mlp.bias": torch.randn(7, generator=g),
        "head.h16": torch.randn(5, 3, generator=g).half(),
        "head.f64": torch.randn(4, generator=g, dtype=torch.float64),
        "block.0.mask": torch.rand(9, generator=g) > 0.5,
        "block.0.attn._extra_state": torch.randint(0, 255, (12,), generator=g, dtype=torch.uint8),
        "block.0.attn.weight_scale_inv": torch.rand(3, generator=g) + 0.5,
        "tokens_seen": torch.tensor(1000 * (i + 1)),
    }


def write(state: dict, folder, fmt: str, i: int, step: int | None = None) -> str:
    """``state`` saved as ``fmt``; returns the input's path."""
    from safetensors.torch import save_file

    folder = str(folder)
    step = (i + 1) * 100 if step is None else step
    if fmt == "safetensors":
        path = os.path.join(folder, f"ckpt-{i}.safetensors")
        save_file(state, path, metadata={"format": "pt", "step": str(step)})
    elif fmt in ("hf", "hf-sharded"):
        path = os.path.join(folder, f"checkpoint-{step}")
        os.makedirs(path)
        if fmt == "hf":
            save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        else:
            names = sorted(state)
            parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
            for file, part in parts.items():
                save_file({n: state[n] for n in part}, os.path.join(path, file), metadata={"format": "pt"})
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": 0}, "weight_map": {n: f for f, p in parts.items() for n in p}},
                          f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "toy", "checkpoint": i}, f)
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump({"vocab": {"a": i}}, f)
        torch.save({"state": {}}, os.path.join(path, "optimizer.pt"))
    elif fmt == "pt":
        path = os.path.join(folder, f"ckpt-{i}.pt")
        torch.save({"model": state, "step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}}, path)
    else:
        raise ValueError(fmt)
    return path


def checkpoints(folder, fmt: str, count: int = 3, seed: int = 0) -> tuple:
    """``count`` checkpoints in ``fmt`` under ``folder``: (paths, states)."""
    os.makedirs(folder, exist_ok=True)
    states = [model_state(i, seed) for i in range(count)]
    return [write(s, folder, fmt, i) for i, s in enumerate(states)], states


def reference(states: list, weights, name: str) -> np.ndarray:
    """The float64 weighted sum of tensor ``name``."""
    return sum(float(w) * s[name].double().numpy() for w, s in zip(weights, states))


def assert_float32_close(got, ref, count: int, dtype):
    """``got`` equals the float64 ``ref`` to float32 rounding (``count`` terms) and the output dtype's."""
    got = np.asarray(got.double().numpy() if hasattr(got, "double") else got, np.float64)
    ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
           torch.float64: 2.0 ** -24}[dtype]
    scale = np.abs(ref) + 1e-30
    tol = ulp * scale + (count + 2) * 2.0 ** -24 * (np.abs(ref) + 4)
    assert np.all(np.abs(got - ref) <= tol), np.max(np.abs(got - ref) / tol)


def fingerprint(paths) -> dict:
    """path -> (size, mtime, sha256) of every file under ``paths`` (files or folders)."""
    out = {}
    for p in paths:
        p = str(p)
        files = [p] if os.path.isfile(p) else [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
        for f in files:
            st = os.stat(f)
            with open(f, "rb") as fh:
                out[f] = (st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def leftovers(folder) -> list:
    """Files or folders a merge left in ``folder`` (temporary ones included)."""
    return sorted(n for n in os.listdir(folder) if ".fastema-merge-" in n)


UINT = {F32: np.uint32, BF16: np.uint16, F16: np.uint16, F64: np.float64}   # a kind's storage (its bits)


def bits_of(values, kind):
    """``values`` as the bits of storage kind ``kind`` (rounded to nearest even)."""
    v = np.asarray(values, np.float32)
    if kind == F64:
        return np.asarray(values, np.float64)
    if kind == F32:
        return v.view(np.uint32)
    return np.array([_bits.encode(b, kind) for b in v.view(np.uint32)], np.uint16)


def tree_state(paths) -> dict:
    """path -> what is there, links not followed and nothing but regular files opened: ``("link",
    target)``, ``("file", size, mtime, sha256)`` or ``("other", mode)`` (a FIFO, a device), for every
    entry under ``paths`` (files, folders or links). Unlike :func:`fingerprint`, safe on folders
    holding FIFOs and links to ``/proc``."""
    import stat

    out = {}
    todo = [str(p) for p in paths]
    while todo:
        p = todo.pop()
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[p] = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            todo += [os.path.join(p, n) for n in os.listdir(p)]
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as fh:
                out[p] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
        else:
            out[p] = ("other", st.st_mode)
    return out


def run_python(code: str, *args, env: dict | None = None, timeout: float = 60):
    """``python -c code args...`` in a child process (its environment: ours plus ``env``); the
    CompletedProcess, text output captured."""
    import subprocess
    import sys

    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full)


def crafted(path, header: str, data: bytes = b"") -> str:
    """A safetensors file written byte by byte: its header's length, ``header`` (JSON text, padded with
    spaces to 8 bytes) and ``data``; for files no writer makes (a name twice, overlapping spans, a gap,
    bytes after the last tensor, a dimension past 2^63). Returns the path."""
    head = header.encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + data)
    return str(path)


def temporary_entries(folder) -> list:
    """What a merge may leave beside its output in ``folder``: names with ``.fastema-merge`` or ending
    ``.tmp``."""
    return sorted(n for n in os.listdir(folder) if ".fastema-merge" in n or n.endswith(".tmp"))


class System(files.FileSystem):
    """This file system as another (``way``): as it is (``"renameat2"``), one without renameat2
    (``"link"``: a hard link then an unlink), one without hard links either (``"claim"``: the name
    claimed first). ``at_publish(folder)``, given, runs once at the first sync of a staging folder
    (``*.tmp``): a publish begins, the staged output whole (another writer wins the race there, a
    signal arrives). ``synced``, given, records the folders synced instead of syncing them."""

    def __init__(self, way: str = "renameat2", at_publish=None, synced: list | None = None):
        if way not in ("renameat2", "link", "claim"):
            raise ValueError(f"System(way=) is renameat2, link or claim, got {way!r}")
        self.way, self.at_publish, self.synced = way, at_publish, synced

    def rename_noreplace(self, src: str, dst: str) -> bool:
        return self.way == "renameat2" and super().rename_noreplace(src, dst)

    def link(self, src: str, dst: str) -> None:
        if self.way == "claim":
            raise OSError(errno.EPERM, "Operation not permitted")
        super().link(src, dst)

    def sync_folder(self, folder: str) -> None:
        if self.at_publish is not None and folder.endswith(".tmp"):
            run, self.at_publish = self.at_publish, None
            run(folder)
        if self.synced is not None:
            self.synced.append(folder)
        else:
            super().sync_folder(folder)
