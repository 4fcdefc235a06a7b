"""The one table of other packages' private names fastema relies on (``fastema/_privates.py``,
issue 80 item 5): complete (an AST scan of ``fastema/`` and ``kernels/`` finds no private name of
another package that the table lacks, and every row's files use it), true on the installed
versions, and loud where one moves (the error names it, the files using it, the versions checked
and the version installed). And no frame walk in ``fastema/torch/`` outside the one module that
reads DCP's calls (``_state/dcp_calls.py``)."""
import ast
import functools
import importlib.util
import pathlib
import re
import sys

import pytest

from fastema import _privates

ROOT = pathlib.Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)

#: underscore names that are documented API, not private: namedtuple's methods
DOCUMENTED = {"_replace", "_asdict", "_fields", "_make"}
#: Python's own privates (versioned with Python, which CI pins): not in the table
PYTHON = {"_getframe", "_Unpickler", "_Unframer", "_Stop"}
#: distributions whose import takes seconds (TensorFlow, Keras): their rows are checked in their
#: sources, without an import
HEAVY = {"tensorflow-cpu", "keras", "peft", "transformers"}


@functools.cache
def _sources() -> tuple:
    """``(file, its nodes)`` of every module of fastema and kernels (parsed and walked once)."""
    return tuple((path.relative_to(ROOT).as_posix(), list(ast.walk(ast.parse(path.read_text()))))
                 for package in ("fastema", "kernels")
                 for path in sorted((ROOT / package).rglob("*.py")))


def _third(module: str) -> bool:
    top = module.split(".")[0]
    return bool(top) and top not in STDLIB and top not in ("fastema", "kernels", "testkit")


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _defined(trees) -> set:
    """Every name fastema (and kernels) define or assign: their own privates."""
    out: set = set()
    for _, nodes in trees:
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(n.name)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
                out.add(n.attr)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                out.add(n.id)
            elif isinstance(n, ast.arg):
                out.add(n.arg)
            elif isinstance(n, ast.keyword) and n.arg:
                out.add(n.arg)
            elif isinstance(n, ast.alias) and not _private(n.name.split(".")[-1]):
                out.add(n.asname or n.name.split(".")[0])
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "setattr"
                  and len(n.args) > 1 and isinstance(n.args[1], ast.Constant)):
                out.add(n.args[1].value)      # setattr(x, "_name", ...)
    return out


@functools.cache
def findings() -> list[tuple[str, str]]:
    """``(name, file)`` of every private name of another package the sources reach: a private
    module or name imported from one, an attribute chain on one's alias, and an attribute
    (``x._name``, ``getattr(x, "_name")``) no source of fastema defines."""
    trees = _sources()
    defined = _defined(trees)
    out = []
    for path, nodes in trees:
        aliases: dict = {}
        for n in nodes:
            if isinstance(n, ast.Import):
                for a in n.names:
                    if _third(a.name):
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                            a.name.split(".")[0]
                        if any(map(_private, a.name.split("."))):
                            out.append((a.name, path))
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level and _third(n.module):
                for a in n.names:
                    full = f"{n.module}.{a.name}"
                    aliases[a.asname or a.name] = full
                    if any(map(_private, full.split("."))):
                        out.append((full, path))
        inner = {id(n.value) for n in nodes if isinstance(n, ast.Attribute)}
        seen: set = set()                     # the nodes of a chain on a module's alias
        for n in nodes:
            if isinstance(n, ast.Attribute) and id(n) not in inner:
                chain, v, links = [n.attr], n.value, [id(n)]
                while isinstance(v, ast.Attribute):
                    chain.append(v.attr)
                    links.append(id(v))
                    v = v.value
                if isinstance(v, ast.Name) and v.id in aliases:
                    seen.update(links)
                    if any(map(_private, chain)):
                        out.append((f"{aliases[v.id]}.{'.'.join(reversed(chain))}", path))
        for n in nodes:
            if id(n) in seen:
                continue
            name = None
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and _private(n.attr):
                name = n.attr
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id in ("getattr", "hasattr") and len(n.args) > 1
                  and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)
                  and _private(n.args[1].value)):
                name = n.args[1].value
            if name and name not in defined and name not in DOCUMENTED | PYTHON:
                out.append((name, path))
    return out


def routed() -> list[tuple[str, str, str]]:
    """``(where, attr, file)`` of every lookup made through the table (``_privates.get``,
    ``find``, ``attribute`` with literal arguments)."""
    out = []
    for path, nodes in _sources():
        for n in nodes:
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in ("get", "find", "attribute")
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "_privates"):
                args = [a.value if isinstance(a, ast.Constant) else None for a in n.args]
                out.append((args[0], args[1] if len(args) > 1 else "", path))
    return out


def test_every_lookup_through_the_table_is_a_row_naming_its_file():
    found = routed()
    assert {path for *_, path in found} >= {"fastema/_launch/cuda/drivers.py", "fastema/transformers.py",
                                            "fastema/_backends/torch.py", "fastema/_io/dcp.py"}
    bad = [f"{path}: {where} {attr}" for where, attr, path in found
           if not any(r.where == where and r.attr == attr and path in r.used
                      for r in _privates.TABLE)]
    assert not bad, bad


def _covers(row: _privates.Private, name: str) -> bool:
    if "." in name:                           # a dotted name: the row's, or a module above it
        return row.name == name or (not row.attr and row.name.startswith(name + "."))
    return name in (row.attr, row.name.rsplit(".", 1)[-1])


def test_the_table_is_complete():
    found = findings()
    assert found, "the scan finds nothing: it is broken"
    missing = [f"{path}: {name}" for name, path in found
               if not any(_covers(r, name) and path in r.used for r in _privates.TABLE)]
    assert not missing, ("private names of other packages not in fastema/_privates.py (add a row "
                         "naming the file): " + "; ".join(sorted(set(missing))))


def test_every_row_names_files_that_use_it():
    stale = [f"{r.name}: {path}" for r in _privates.TABLE for path in r.used
             if not (ROOT / path).is_file()
             or (r.attr or r.name.rsplit(".", 1)[-1]) not in (ROOT / path).read_text()]
    assert not stale, stale


def test_the_scan_sees_what_it_must():
    """The scan's readers on known cases: a private module imported, a private name imported, an
    attribute chain on a module's alias, a foreign object's private attribute."""
    found = findings()
    for name, path in [("torch.distributed.tensor.placement_types._StridedShard",
                        "fastema/torch/_sharding/params.py"),
                       ("numba.core.extending._Intrinsic", "kernels/_cache.py"),
                       ("torch.Tensor._make_wrapper_subclass", "fastema/torch/_state/slices.py"),
                       ("_local_tensor", "fastema/torch/_sharding/params.py"),
                       ("torch.utils._pytree", "fastema/torch/compat/ema_pytorch/_pytree.py"),
                       ("_fsdp_flattened", "fastema/_backends/torch.py")]:
        assert (name, path) in found, name


@pytest.mark.parametrize("dist", sorted({r.dist for r in _privates.TABLE} - HEAVY))
def test_the_table_holds_on_the_installed_versions(dist):
    rows = tuple(r for r in _privates.TABLE if r.dist == dist)
    if _privates._version(dist) is None:
        pytest.skip(f"{dist} is not installed")
    _privates.verify(rows)


@pytest.mark.parametrize("dist", sorted(HEAVY))
def test_heavy_packages_rows_hold_in_their_sources(dist):
    """TensorFlow's, Keras's, PEFT's and transformers' rows, read in their installed sources
    (an import takes seconds)."""
    if _privates._version(dist) is None:
        pytest.skip(f"{dist} is not installed")
    for row in (r for r in _privates.TABLE if r.dist == dist):
        module, _, qual = row.where.partition(":")
        top = importlib.util.find_spec(module.split(".")[0])      # the package, not imported
        base = pathlib.Path(top.submodule_search_locations[0])
        rel = pathlib.Path(*module.split(".")[1:])
        src = base / rel.with_suffix(".py") if (base / rel.with_suffix(".py")).is_file() \
            else base / rel / "__init__.py"
        text = src.read_text()
        for name in [*qual.split(".")[-1:], row.attr]:
            assert not name or name in text, (row.name, src)


def test_a_moved_name_fails_loudly_naming_it_the_files_and_the_versions():
    """The versions named are the table's (checked) and the installed distribution's, read as
    the table reads it: no torch version is written here (a PyPI wheel's ``torch.__version__``
    carries a local tag, ``+cu130``, that its distribution's version does not)."""
    checked = next(r.checked for r in _privates.TABLE if r.dist == "torch")
    installed = _privates._version("torch")
    row = _privates.Private("torch.optim.optimizer:Optimizer", "torch", checked,
                            ("fastema/torch/_face/attach.py",), "the hooks", attr="_gone_hooks")
    gone = _privates.Private("torch._C:_no_such_name", "torch", checked,
                             ("fastema/_backends/torch.py",), "a fast path")
    with pytest.raises(_privates.PrivateNameMoved,
                       match=r"torch\.optim\.optimizer\.Optimizer no longer uses the attribute "
                             r"'_gone_hooks' \(used by fastema/torch/_face/attach\.py: the hooks; "
                             rf"checked with torch {re.escape(checked)}, installed "
                             rf"{re.escape(installed)}\); torch\._C\._no_such_name is gone "
                             r".*Install a version"):
        _privates.verify((row, gone))
    with pytest.raises(KeyError, match="not in fastema's table"):
        _privates.get("torch._C:_no_such_name")


def test_no_frame_walk_in_the_torch_face_outside_dcp_calls():
    """``sys._getframe``, ``f_back``, ``f_locals`` (and ``inspect``'s stack readers) appear in
    one module of ``fastema/torch/``: the one that reads DCP's calls."""
    readers = {"_getframe", "f_back", "f_locals", "currentframe", "stack", "getouterframes"}
    found = set()
    for path in sorted((ROOT / "fastema" / "torch").rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and n.attr in readers and not (
                    n.attr == "stack" and not (isinstance(n.value, ast.Name)
                                               and n.value.id == "inspect")):
                found.add(path.relative_to(ROOT).as_posix())
    assert found == {"fastema/torch/_state/dcp_calls.py"}, found
