"""The structure's rules, checked from the source: kernels/ imports only NumPy, Numba and
llvmlite (and the standard library); no module-level import cycle in fastema; array types
are recognised only in fastema/_backends."""
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]
ALLOWED_IN_KERNELS = {"numpy", "numba", "llvmlite", "functools", "math", "types", "ctypes", "fractions"}


def _imports(path: pathlib.Path, package: str, module_level_only: bool):
    """(absolute module name, line) of each import; relative ones resolved against ``package``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:                          # from . import a, b: each is a module
                    for a in node.names:
                        yield f"{mod}.{a.name}", node.lineno
                    continue
                yield mod, node.lineno
            else:
                yield node.module, node.lineno


def test_kernels_import_only_numpy_numba_and_llvmlite():
    bad = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for mod, line in _imports(path, "fastema.kernels", module_level_only=False):
            top = mod.split(".")[0]
            if top not in ALLOWED_IN_KERNELS and not mod.startswith("fastema.kernels"):
                bad.append(f"kernels/{path.name}:{line} imports {mod}")
    assert not bad, bad


def _module_graph(deferred: bool) -> dict:
    graph = {}
    base = ROOT / "fastema"
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).with_suffix("")
        name = ".".join(["fastema"] + [p for p in rel.parts if p != "__init__"])
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m, _ in _imports(path, package, module_level_only=not deferred)}
    kernels = {f"fastema.kernels.{p.stem}" if p.stem != "__init__" else "fastema.kernels"
               for p in (ROOT / "kernels").glob("*.py")}
    for name in list(graph):
        # a "from .pkg import name" edge points at a module when one exists, else at the package
        graph[name] = {m if m in graph or m in kernels else m.rpartition(".")[0] for m in graph[name]}
        graph[name] = {m for m in graph[name] if m in graph and m != name}
    return graph


@pytest.mark.parametrize("deferred", [False, True], ids=["module level", "with imports inside functions"])
def test_no_import_cycle_in_fastema(deferred):
    # Deferred imports count too: a lazily imported module that imports its importer back (the
    # old _launch_cuda -> _launch) still ties the two together.
    graph = _module_graph(deferred)
    assert "fastema._launch" in graph and "fastema._backends" in graph
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_array_types_are_recognised_only_in_backends():
    needles = ("_is_torch", "__cuda_array_interface__", "isinstance(x, np.ndarray)", "_is_cudasim")
    found = []
    for path in sorted((ROOT / "fastema").rglob("*.py")):
        if "_backends" in path.parts:
            continue
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {n}" for n in needles if n in text]
    assert not found, found


def test_every_package_is_in_the_wheel():
    # pyproject.toml lists the packages explicitly (kernels/ is mapped to fastema.kernels): a new
    # subpackage missing there works in an editable install and is absent from the wheel.
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("fastema",) + p.parent.relative_to(ROOT / "fastema").parts)
             for p in (ROOT / "fastema").rglob("__init__.py")} | {"fastema.kernels"}
    assert found == listed, (f"in the tree, not in pyproject.toml: {sorted(found - listed)}; "
                             f"listed, not in the tree: {sorted(listed - found)}")


FRAMEWORKS = {"torch", "jax", "jaxlib", "tensorflow", "keras", "cupy", "lightning", "pytorch_lightning", "flax",
              "deepspeed"}


def test_the_model_average_engine_imports_no_framework():
    """fastema/average (options, plans, swap, the update driver, checkpoints) is framework-free:
    no framework import in any of its modules, deferred imports inside functions included."""
    bad = []
    for path in sorted((ROOT / "fastema" / "average").glob("*.py")):
        package = "fastema.average"
        for mod, line in _imports(path, package, module_level_only=False):
            if mod.split(".")[0] in FRAMEWORKS:
                bad.append(f"fastema/average/{path.name}:{line} imports {mod}")
    assert not bad, bad
