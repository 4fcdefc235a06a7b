"""What varies is injected (docs/architecture.md, rules): no library module assigns another
module's attributes, and no test patches a name of ``fastema`` or ``kernels`` (a module's, or a
class's or function's of one): none of ``fastema._launch``, and of the rest only what
:data:`STILL_PATCHED` lists, each with its owner. Checked from the AST.

A module that lets something vary owns how: a setter or a ``with`` block of its own
(``fastema._launch.config.tuned``, ``drivers.using``, ``compiler.using``, ``device_code.afresh``,
``cpu.serial_twins``, ``kernels._store.files.set_report``, ``kernels._cache.set_trust``,
``kernels._cache.using`` / ``afresh``, ``torch._placement.offload_ring.pipeline``,
``torch._placement.folds.watched``, ``_backends.streams_from``, ``_backends.using``,
``_backends.torch.streamed_layout_checks``, ``torch._face.compiled.afresh``); a test that needs to
see a library function's calls watches them (``tests/support/calls.py``)."""
from __future__ import annotations

import ast
import functools
import pathlib
import textwrap

ROOT = pathlib.Path(__file__).parents[1]

# Patches of a fastema name left in place, each with its owner (the rule fails on one that is gone,
# so this only shrinks). Empty since issue 72: every name the tests varied has its seam.
STILL_PATCHED: dict = {}
"""(test file, the dotted name it replaces) -> who owns the seam that replaces the patch."""

ASSIGNED_ELSEWHERE = {
    ("fastema/_launch/cuda/kernel_refs.py", "_cuda_jit.CACHE"):
        "kernels/_cuda_jit.py is part of the shipped device code's identity (kernels/_store/"
        "identity.py's CUDA_SOURCES): a setter there means rebuilding both shipped sets; "
        "add it at the next rebuild",
}


def _module_of(path: pathlib.Path) -> list:
    """The dotted name of a library file as a list (kernels/ is fastema.kernels)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = (["fastema"] if rel.parts[0] == "kernels" else []) + list(rel.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _is_module(parts: list) -> bool:
    """Whether the dotted fastema name ``parts`` is a module or package of the source tree."""
    if parts[:1] != ["fastema"]:
        return False
    base = ROOT / "kernels" if parts[1:2] == ["kernels"] else ROOT / "fastema"
    path = base.joinpath(*(parts[2:] if parts[1:2] == ["kernels"] else parts[1:]))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_names(tree: ast.AST | list, package: list) -> dict:
    """``name -> dotted module`` (a list) of every name ``tree`` binds to a module: ``import a.b``
    (``a``), ``import a.b as m``, ``from pkg import mod`` of a fastema module (relative imports
    resolved against ``package``), ``m = pytest.importorskip("a.b")``; and every name imported
    from outside fastema (``from numba import config``: a module or not, it is another package's
    object, never this module's to set)."""
    out: dict = {}
    for node in tree if isinstance(tree, list) else ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                out[a.asname or top] = (a.name if a.asname else top).split(".")
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            source = base + (node.module.split(".") if node.module else [])
            for a in node.names:
                if _is_module(source + [a.name]) or source[:1] != ["fastema"] and not node.level:
                    out[a.asname or a.name] = source + [a.name]
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "attr", None) == "importorskip" and node.value.args and \
                isinstance(node.value.args[0], ast.Constant):
            out.update({t.id: node.value.args[0].value.split(".") for t in node.targets
                        if isinstance(t, ast.Name)})
    return out


def _path(expr: ast.AST, names: dict) -> list | None:
    """The dotted path ``expr`` reaches (``m.sub.X`` -> its module's path plus the attributes), when
    it starts at a module name."""
    if isinstance(expr, ast.Name):
        return names.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _path(expr.value, names)
        return None if base is None else base + [expr.attr]
    return None


def _namespace(expr: ast.AST, names: dict) -> list | None:
    """The module's path when ``expr`` is a module's namespace: ``m.__dict__`` or ``vars(m)``."""
    if isinstance(expr, ast.Attribute) and expr.attr == "__dict__":
        return _path(expr.value, names)
    if isinstance(expr, ast.Call) and getattr(expr.func, "id", None) == "vars" and \
            len(expr.args) == 1:
        return _path(expr.args[0], names)
    return None


_DICT_WRITES = ("update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__")
_CONTAINER_WRITES = _DICT_WRITES + ("append", "extend", "insert", "remove", "add", "discard")


def _namespace_writes(node: ast.AST, names: dict):
    """(line, what, module) of a write into a module's namespace: ``vars(m)[k] = ...``, ``del
    m.__dict__[k]``, ``m.__dict__.update(...)`` and the other writing methods of a dict."""
    for t in _targets(node):
        if isinstance(t, ast.Subscript) and (module := _namespace(t.value, names)) is not None:
            yield node.lineno, ast.unparse(t), module
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
            node.func.attr in _DICT_WRITES and \
            (module := _namespace(node.func.value, names)) is not None:
        yield node.lineno, ast.unparse(node)[:100], module


def _targets(node: ast.AST) -> list:
    """What ``node`` assigns or deletes, tuples unpacked."""
    if isinstance(node, (ast.Assign, ast.Delete)):
        found = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        found = [node.target]
    else:
        return []
    out = []
    while found:
        t = found.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            found += t.elts
        else:
            out.append(t.value if isinstance(t, ast.Starred) else t)
    return out


def _module_attributes_set(source: str, package: list):
    """(line, what) of each attribute of a module that ``source`` sets or deletes: an assignment
    (``mod.X = ...``, ``pkg.mod.X += ...``, ``del mod.X``, in tuples too) or a ``setattr`` /
    ``delattr`` of a module, or a write into its namespace (``vars(mod)[k] = ...``,
    ``mod.__dict__.update(...)``)."""
    tree = ast.parse(source)
    names = _module_names(tree, package)
    for node in ast.walk(tree):
        yield from (found[:2] for found in _namespace_writes(node, names))
        for t in _targets(node):
            if isinstance(t, ast.Attribute) and _path(t.value, names) is not None:
                yield node.lineno, ast.unparse(t)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") \
                and node.args and _path(node.args[0], names) is not None:
            yield node.lineno, ast.unparse(node)


def _library():
    for package in ("fastema", "kernels"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_library_module_assigns_another_modules_attributes():
    """A module's globals are its own: what varies is injected through the module that owns it (a
    setter, a ``with`` block of its own), never set from outside (``kernels._store.files.REPORT``
    was set by ``fastema._launch.config``; ``python -m fastema warm`` set the launch tunables)."""
    found, allowed = [], set()
    for path in _library():
        module = _module_of(path)
        package = module if path.name == "__init__.py" else module[:-1]
        rel = path.relative_to(ROOT).as_posix()
        for line, what in _module_attributes_set(path.read_text(), package):
            if (rel, what) in ASSIGNED_ELSEWHERE:
                allowed.add((rel, what))
            else:
                found.append(f"{rel}:{line} sets {what}")
    assert not found, "\n".join(found)
    stale = set(ASSIGNED_ELSEWHERE) - allowed
    assert not stale, f"ASSIGNED_ELSEWHERE lists assignments that are gone: {stale}; remove them"


def _code(text: str):
    """``(first line, code)`` of a test file's ``text``: the file, and each string in it that is a
    Python program importing fastema (a child process's script)."""
    yield 0, text
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                "fastema" in node.value and "import" in node.value:
            try:
                ast.parse(textwrap.dedent(node.value))
            except SyntaxError:
                continue
            yield node.lineno - 1, textwrap.dedent(node.value)


def _test_names(nodes: list) -> dict:
    """:func:`_module_names` of a test file, and every name it imports from fastema that is not a
    module (``from fastema.torch._placement.offload import OffloadedShadow``): a class or a function
    of the library, whose attributes are the library's too."""
    names = _module_names(nodes, ["tests"])
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                node.module.split(".")[0] == "fastema":
            for a in node.names:
                names.setdefault(a.asname or a.name, node.module.split(".") + [a.name])
    return names


def _patches(source: str):
    """(line, what, path) of each name of fastema (``kernels/`` is ``fastema.kernels``) that
    ``source`` replaces, ``path`` the dotted name replaced as far as it is known: an assignment or
    ``setattr``/``delattr`` through a fastema module, class or function; ``monkeypatch.setattr`` /
    ``.delattr`` / ``mock.patch.object`` of one or of what is reached through one; a write into a
    module's namespace (``vars(m)[k] = ...``, ``m.__dict__.update(...)``); ``monkeypatch.setitem``
    / ``.delitem`` / ``mock.patch.dict`` of its namespace or of a dict reached through it; or a
    patch named by a string starting with ``fastema.``."""
    nodes = list(ast.walk(ast.parse(source)))
    names = _test_names(nodes)

    def fastema(expr) -> list | None:
        path = _path(expr, names) or _namespace(expr, names)
        return path if path is not None and path[:1] == ["fastema"] else None

    def held(expr) -> list | None:
        """A container a fastema module holds (``m.TABLE``), not its namespace (counted above)."""
        return None if _namespace(expr, names) is not None else fastema(expr)

    for node in nodes:
        yield from ((line, what, module) for line, what, module in _namespace_writes(node, names)
                    if module[:1] == ["fastema"])
        for t in _targets(node):
            if isinstance(t, ast.Attribute) and (path := fastema(t.value)) is not None:
                yield node.lineno, ast.unparse(t), path + [t.attr]
            elif isinstance(t, ast.Subscript) and (path := held(t.value)) is not None:
                yield node.lineno, ast.unparse(t), path           # a container of one: m.TABLE[k] = v
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in _CONTAINER_WRITES and (path := held(node.func.value)) is not None:
            yield node.lineno, ast.unparse(node)[:100], path     # m.RECORD.append(x), m.D.update(...)
        if not (isinstance(node, ast.Call) and node.args):
            continue
        f = node.func
        called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        first = node.args[0]
        if (called in ("setattr", "delattr", "object", "setitem", "delitem") or
                called == "dict" and isinstance(f, ast.Attribute)) and \
                (path := fastema(first)) is not None:
            name = node.args[1] if len(node.args) > 1 else None
            known = isinstance(name, ast.Constant) and isinstance(name.value, str) and \
                called in ("setattr", "delattr", "object")
            yield node.lineno, ast.unparse(node)[:100], path + ([name.value] if known else [])
        elif called in ("setattr", "delattr", "patch", "dict") and isinstance(first, ast.Constant) and \
                isinstance(first.value, str) and first.value.startswith("fastema."):
            yield node.lineno, ast.unparse(node)[:100], first.value.split(".")


def _launch_patches(source: str):
    """(line, what) of each name of a ``fastema._launch`` module that ``source`` replaces
    (:func:`_patches`)."""
    return ((line, what) for line, what, path in _patches(source)
            if path[:2] == ["fastema", "_launch"])


def _test_files():
    folders = [ROOT / "tests", ROOT / "testkit",                 # the fakes the tests share with the tooling
               *sorted(ROOT.glob("*/tests"))]                   # and the tooling's own, if here
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            if path != pathlib.Path(__file__):            # its examples of what the rules find
                yield path


@functools.cache
def _scan() -> tuple:
    """``(file, line, what, path)`` of every patch :func:`_patches` finds in the tests (read once)."""
    found = []
    for path in _test_files():
        rel = path.relative_to(ROOT).as_posix()
        for first, code in _code(path.read_text()):
            found += [(rel, first + line, what, target) for line, what, target in _patches(code)]
    return tuple(found)


def test_no_test_patches_a_name_of_the_launch_layer():
    """The tests reach the launch layer through what it injects (``config.tuned``, the drivers'
    ``using``, ``device_code.afresh``, ``cpu.serial_twins``...) or watch its calls
    (``tests/support/calls.py``): no test, fixture or child process's script replaces one of its
    names, so what the tests run is what the library runs."""
    found = [f"{rel}:{line} {what}" for rel, line, what, target in _scan()
             if target[:2] == ["fastema", "_launch"] and (rel, ".".join(target)) not in STILL_PATCHED]
    assert not found, "\n".join(found)


def test_no_test_patches_a_name_of_fastema():
    """The same beyond the launch layer, over ``fastema/`` and ``kernels/`` whole: what a test
    varies (the offload placement's slots, the file system a merge or a snapshot writes through,
    the kernel cache's folder and trust, the stream a launch goes on...) is set through the module
    that owns it (a ``with`` block, a constructor argument, an injected file system), and what it
    observes (the kernels' vector loads: ``tests/support/vectors.py``) is watched, never by
    replacing one of its names. :data:`STILL_PATCHED` would list what is left, each with its owner;
    it only shrinks (a listed patch that is gone fails until it is removed)."""
    found, seen = [], set()
    for rel, line, what, target in _scan():
        key = (rel, ".".join(target))
        if key in STILL_PATCHED:
            seen.add(key)
        else:
            found.append(f"{rel}:{line} {what} (replaces {'.'.join(target)})")
    assert not found, "\n".join(found)
    stale = set(STILL_PATCHED) - seen
    assert not stale, f"STILL_PATCHED lists patches that are gone: {sorted(stale)}; remove them"


def test_the_rules_see_what_they_forbid():
    """Both readers on known cases: the old tree's assignments and patches, the ways to name a
    module (aliases, relative imports, ``importorskip``, strings), and what they leave alone."""
    config = ("from ..kernels._store import files as _store_files\nfrom . import config\n"
              "_store_files.REPORT = print\nimport numba\nnumba.config.X = 1\n"
              "config.A, config.B = 0, 1\nsetattr(config, 'C', 2)\nlocal = object()\nlocal.x = 1\n"
              "from numba import config as nc\nnc.X = 1\n"          # an outside package's, aliased
              "vars(config)['D'] = 3\nconfig.__dict__['E'] = 4\ndel vars(nc)['G']\n"
              "_store_files.__dict__.update(F=5)\n"                  # its namespace written
              "from .cpu import run\nrun.y = 1\nd = {}\nd['k'] = 1\nvars(local)['z'] = 2\n")
    got = [what for _, what in _module_attributes_set(config, ["fastema", "_launch"])]
    assert got[:1] == ["_store_files.REPORT"] and len(got) == 10, got
    tests = ("import fastema._launch\nfrom fastema import _launch\n"
             "from fastema._launch import cpu as C\n"
             "B = pytest.importorskip('fastema._launch.cuda.launch')\n"
             "monkeypatch.setattr(_launch.config, 'CUDA_CHUNK', 16)\n"
             "monkeypatch.setattr(fastema._launch, 'launch', f)\nmonkeypatch.setattr(C, 'run', f)\n"
             "monkeypatch.setattr(B, 'X', 1)\nmonkeypatch.setattr('fastema._launch.cpu.pool.run', f)\n"
             "mock.patch('fastema._launch.launch')\nC.K = 1\n"
             "monkeypatch.setattr(torch, 'manual_seed', f)\nfrom fastema.kernels import _cache\n"
             "monkeypatch.setattr(_cache, 'TRUST', None)\n"
             "monkeypatch.setitem(C.__dict__, 'run', f)\nmonkeypatch.setitem(vars(B), 'X', 1)\n"
             "mock.patch.dict(_launch.config.__dict__, {'A': 1})\n"
             "mock.patch.dict('fastema._launch.cpu.pool.__dict__', {})\nvars(C)['K'] = 2\n"
             "C.__dict__.update(K=3)\nmonkeypatch.delitem(_launch.cpu.pool.TABLE, 'x')\n"
             "monkeypatch.setitem(sys.modules, 'x', None)\nvars(_cache)['TRUST'] = None\n"
             "monkeypatch.setitem(_cache.__dict__, 'TRUST', None)\n")
    assert len(list(_launch_patches(tests))) == 14, list(_launch_patches(tests))
    whole = [".".join(path) for _, _, path in _patches(tests)]
    assert len(whole) == 17 and "fastema.kernels._cache.TRUST" in whole, whole   # _launch's, the cache's
    beyond = ("from fastema.torch._placement.offload import OffloadedShadow as O\n"
              "from fastema.merge import _core\nimport fastema.merge\n"
              "monkeypatch.setattr(O, '_fold', f)\nO._pack = f\n"          # a class of fastema's
              "monkeypatch.setattr(_core.os, 'link', f)\n"                 # os, reached through it
              "mock.patch('fastema.merge._core.open_input', f)\n"
              "monkeypatch.setattr(fastema.merge, 'merge_checkpoints', f)\n"
              "_core.TABLE['k'] = 1\n_core.RECORD.append(1)\n"                # containers it holds
              "v = dict(_core.TABLE)\nmonkeypatch.setattr(torch, 'x', 1)\nO.x\n_core.TABLE.get(1)\n")   # reads
    assert sorted(".".join(path) for _, _, path in _patches(beyond)) == sorted([
        "fastema.torch._placement.offload.OffloadedShadow._fold",
        "fastema.torch._placement.offload.OffloadedShadow._pack", "fastema.merge._core.os.link",
        "fastema.merge._core.open_input", "fastema.merge.merge_checkpoints", "fastema.merge._core.TABLE",
        "fastema.merge._core.RECORD"]), list(_patches(beyond))
    child = f"SCRIPT = {tests!r}\nNOT_CODE = 'from fastema import x, or not'\n"
    assert [len(list(_launch_patches(code))) for _, code in _code(child)] == [0, 14]
