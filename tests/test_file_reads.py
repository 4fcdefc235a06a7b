"""Every file fastema reads is opened by the one regular-file reader (docs/architecture.md, rules;
issue 85, item 3): ``fastema/_io/safe_files.py``'s ``open_regular`` (``regular_fd`` for a
descriptor) opens without blocking and refuses a FIFO, a device, a socket or a folder by name
before a byte is read. A FIFO named like a checkpoint hung the post-hoc reader and its command
line (review 1c) and the ema-pytorch drop-in's synthesis (issue 85 M2), each through a reader of
its own. Checked from the AST of every module of ``fastema/`` (deferred imports and aliases
resolved), the reader's own module excepted:

- the roads: ``open`` / ``io.open`` / ``os.fdopen`` / ``os.open`` (and the compressed ``open``\\ s)
  for reading (a mode or flags that write are no read); ``pathlib``'s ``read_text`` /
  ``read_bytes``; the readers that take a path or a file (``torch.load``, ``numpy.load``,
  ``zipfile.ZipFile``, ``tarfile.open``) unless given the reader's file (a name bound by
  ``with open_regular(...) as f`` or ``f = open_regular(...)``, or an expression that calls it);
  the readers that take a path only (``safetensors``' ``safe_open`` / ``load_file``, DCP's
  ``load``, Keras's ``load_model`` / ``H5IOStore``, ``h5py.File``, ``numpy.fromfile`` /
  ``memmap`` / ``loadtxt``) and any ``from_pretrained`` (another library's loader of a folder);
- each road in a module of ``fastema/`` is listed in ``READ_ELSEWHERE`` under its function with
  the reason it is not the reader (and what checks the file instead); the rule fails on a road
  not listed and on a listed one that is gone;
- every ``torch.load`` passes ``weights_only=True``;
- a literal ``/proc/...`` or ``/sys/...`` path is the kernel's own file, never a user's: no listing.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
READER = "fastema/_io/safe_files.py"
OPENERS = {"open_regular", "regular_fd"}

OPEN = {"open", "builtins.open", "io.open", "os.fdopen", "codecs.open", "gzip.open", "bz2.open", "lzma.open"}
TAKES_A_FILE = {"torch.load", "numpy.load", "zipfile.ZipFile", "tarfile.open"}
PATH_ONLY = {"safetensors.safe_open", "safetensors.torch.load_file", "torch.distributed.checkpoint.load",
             "keras.saving.load_model", "keras.models.load_model", "keras.src.saving.saving_lib.H5IOStore",
             "h5py.File", "numpy.fromfile", "numpy.memmap", "numpy.loadtxt", "numpy.genfromtxt"}
METHODS = {"read_text", "read_bytes", "from_pretrained"}

# (file, the function holding it) -> {road: why it is not the reader}. The rule fails on a road not
# listed here and on a listed one that is gone.
READ_ELSEWHERE = {
    ("fastema/_io/files.py", "_sync_folder"): {
        "os.open": "a folder opened to fsync it (its new entries made durable); nothing is read from it"},
    ("fastema/_io/dcp.py", "dcp_reader.read"): {
        "torch.distributed.checkpoint.load": "DCP's FileSystemReader opens the data files by path; each "
        "was checked regular (check_dcp_metadata) when the metadata was loaded through open_regular"},
    ("fastema/merge/_torch_inputs.py", "DcpSource._tensor"): {
        "torch.distributed.checkpoint.load": "the same DCP read, for the merge: its metadata loaded "
        "through open_regular and its data files checked regular (check_dcp_metadata)"},
    ("fastema/merge/_torch_inputs.py", "TorchFileSource.__init__"): {
        "torch.load": "mmap=True takes a path only (torch refuses a file object); checked regular by "
        "regular() and its magic read through open_regular just before; weights_only=True"},
    ("fastema/_callback_files.py", "_safe_open"): {
        "safetensors.safe_open": "safetensors opens and maps the file itself from a path; regular() "
        "refuses a FIFO, device or folder by name just before"},
    ("fastema/keras/_saving.py", "_open_store"): {
        "keras.src.saving.saving_lib.H5IOStore": "Keras's H5IOStore takes a path (or bytes in memory) "
        "only; regular() refuses a FIFO, device or folder by name just before (a .keras archive is "
        "read from open_regular's file)"},
    ("fastema/keras/_saving.py", "load_model"): {
        "keras.saving.load_model": "Keras's own loader of the user's model, called after "
        "_read_averages read the same file through the reader (a FIFO is refused there first)"},
    ("fastema/torch/compat/diffusers.py", "EMAModel.from_pretrained"): {
        "from_pretrained": "diffusers' EMAModel.from_pretrained, kept as diffusers has it: the user's "
        "model class loads its own folder (config and weights) through diffusers"},
}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the module or object it names (absolute imports; deferred ones included)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _name(func: ast.expr, aliases: dict) -> str | None:
    """The dotted name a call calls, its root resolved through the imports; for a method of
    something not a name (``self.x.f``, ``g().f``): None."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name) or func.id == "self":
        return None
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def _calls_opener(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and (getattr(n.func, "id", None) in OPENERS or
                                            getattr(n.func, "attr", None) in OPENERS) for n in ast.walk(node))


def _opened_names(function: ast.AST) -> set:
    """The names bound to the reader's files in ``function`` (``with open_regular(...) as f``,
    ``f = open_regular(...)``)."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name) and \
                _calls_opener(node.context_expr):
            names.add(node.optional_vars.id)
        elif isinstance(node, ast.Assign) and _calls_opener(node.value):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _writes(call: ast.Call, name: str) -> bool:
    """An ``open`` (``os.open``) that writes: a literal mode with w, x or a (flags with
    O_WRONLY, O_CREAT or O_RDWR)."""
    arg = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg in
                                                         ("mode", "flags")), None)
    if arg is None:
        return False
    if name == "os.open":
        return any(f in ast.unparse(arg) for f in ("O_WRONLY", "O_CREAT", "O_RDWR"))
    return isinstance(arg, ast.Constant) and isinstance(arg.value, str) and bool(set(arg.value) & set("wxa"))


def _kernel_file(call: ast.Call) -> bool:
    first = call.args[0] if call.args else None
    return isinstance(first, ast.Constant) and isinstance(first.value, str) and \
        first.value.startswith(("/proc/", "/sys/"))


def roads(source: str) -> list[tuple[str, str, int]]:
    """``(function, road, line)`` of every read of a file in ``source`` that is not the reader's."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, where: list, opened: set) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = opened | _opened_names(node) if not isinstance(node, ast.ClassDef) else opened
            for child in ast.iter_child_nodes(node):
                visit(child, [*where, node.name], inner)
            return
        if isinstance(node, ast.Call):
            name = _name(node.func, aliases)
            method = node.func.attr if isinstance(node.func, ast.Attribute) else None
            road = None
            if name in OPEN or name == "os.open":
                road = None if _writes(node, name) or _kernel_file(node) else name
            elif name in TAKES_A_FILE:
                first = node.args[0] if node.args else None
                given = first is not None and (_calls_opener(first) or
                                               (isinstance(first, ast.Name) and first.id in opened))
                road = None if given else name
            elif name in PATH_ONLY:
                road = name
            elif method in METHODS:
                road = method
            if road is not None:
                found.append((".".join(where), road, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, where, opened)

    visit(tree, [], set())
    return found


def _modules():
    return [p for p in sorted((ROOT / "fastema").rglob("*.py")) if str(p.relative_to(ROOT)) != READER]


def test_every_file_fastema_reads_is_opened_by_the_one_regular_file_reader():
    found: dict = {}
    for path in _modules():
        rel = str(path.relative_to(ROOT))
        for where, road, line in roads(path.read_text()):
            found.setdefault((rel, where), {}).setdefault(road, []).append(line)
    unlisted = [f"{rel}:{lines[0]} {where}: {road}" for (rel, where), got in found.items()
                for road, lines in got.items() if road not in READ_ELSEWHERE.get((rel, where), {})]
    assert not unlisted, ("a module reads a file by another road than fastema._io.safe_files.open_regular "
                          f"(open it there, or list it in READ_ELSEWHERE with the reason): {unlisted}")
    gone = [f"{key}: {road}" for key, listed in READ_ELSEWHERE.items() for road in listed
            if road not in found.get(key, {})]
    assert not gone, f"READ_ELSEWHERE lists roads that are gone (remove them): {gone}"


def test_every_torch_load_passes_weights_only():
    bad = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func, aliases) == "torch.load" and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


SEEN = '''
import io, os, pathlib, zipfile
import numpy as np
import torch as t
from safetensors import safe_open
import torch.distributed.checkpoint as dcp

def reads(p, model_cls):
    open(p)
    open(p, "rb")
    io.open(p, mode="r")
    os.open(p, os.O_RDONLY)
    os.fdopen(3)
    pathlib.Path(p).read_text()
    pathlib.Path(p).read_bytes()
    t.load(p, weights_only=True)
    np.load(p)
    zipfile.ZipFile(p)
    safe_open(p, framework="pt")
    dcp.load({}, checkpoint_id=p)
    np.fromfile(p)
    model_cls.from_pretrained(p)
    with open(p) as f:
        t.load(f, weights_only=True)

class C:
    def method(self, p):
        return open(p, "r+b")
'''

NOT_SEEN = '''
import os
import torch
from fastema._io.safe_files import open_regular
from .._io import safe_files

def fine(p, q):
    open(p, "wb")
    open(p, mode="x")
    os.open(p, os.O_WRONLY | os.O_CREAT)
    open("/proc/self/status")
    with open_regular(p) as f:
        torch.load(f, weights_only=True)
    g = safe_files.open_regular(q)
    torch.load(g, weights_only=True)
    import zipfile
    zipfile.ZipFile(safe_files.open_regular(q))
    q.open()                     # an object's own open(), not a file's
    self_like = object()
    return self_like
'''


def test_the_rule_sees_what_it_forbids():
    """Each road in ``SEEN`` is found, in its function (a method too); none of the writes, the kernel's
    files or the reader's files in ``NOT_SEEN``."""
    got = roads(SEEN)
    assert [r for _, r, _ in got] == [
        "open", "open", "io.open", "os.open", "os.fdopen", "read_text", "read_bytes", "torch.load", "numpy.load",
        "zipfile.ZipFile", "safetensors.safe_open", "torch.distributed.checkpoint.load", "numpy.fromfile",
        "from_pretrained", "open", "torch.load", "open"]
    assert {w for w, _, _ in got} == {"reads", "C.method"}
    assert roads(NOT_SEEN) == []
