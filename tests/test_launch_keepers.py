"""One keeper of launches (issue 80, the round-9 structure review's done-when), as rules on the source:

- a prepared launch is kept by its launch group (``group.launch(op, **fixed)``) and read by name: no
  code of fastema/ calls or reads a kept record's field by position (``bound[4](...)``, ``kept[1]()``,
  ``entry[2]`` of a ``.get(...)``);
- the table-identity guard lives in one place: no ``.tables`` identity test outside ``fastema/_launch``
  (the launches, which follow their group's tables) and ``fastema/_layout.py``;
- capture bookkeeping is the CUDA launch's: ``note_capture`` has no caller outside ``fastema/_launch``;
- one address-keyed LRU (``fastema._backends.kept.KeptLRU``) for the array functions and the pairs;
- ``prepare`` returns a ``Launch``;
- ``duplicates --change --base aef4f53`` (a tool of the workplace, where it is on PATH) reports no pair
  in the modules the review named.

Each rule is also shown to see what it forbids (the round-8 code's shapes)."""
import ast
import inspect
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASTEMA = ROOT / "fastema"


def _sources(skip=()) -> list[tuple[str, str]]:
    out = []
    for path in sorted(FASTEMA.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(skip):
            out.append((rel, path.read_text()))
    return out


def _positional_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """``x[i](...)`` (a record's field called by position), and ``x[i]`` of a name bound from a
    ``.get(...)`` in the same function (a kept record read by position)."""
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            continue
        from_get = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                    isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "get":
                from_get |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    isinstance(node.func.slice, ast.Constant) and isinstance(node.func.slice.value, int):
                bad.append((node.lineno, ast.unparse(node.func)))
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in from_get \
                    and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int):
                bad.append((node.lineno, ast.unparse(node)))
    return sorted(set(bad))


def _tables_identity_tests(tree: ast.AST) -> list[tuple[int, str]]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Is, ast.IsNot)) for o in node.ops):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "tables" for s in sides):
                bad.append((node.lineno, ast.unparse(node)))
    return bad


def _calls_named(tree: ast.AST, name: str) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == name) or
        (isinstance(node.func, ast.Attribute) and node.func.attr == name))]


# Where launches and what keeps them (groups, shadows, pair caches) are kept and used: the shadows' layer,
# the LRU, the engine, the torch face's placements and pairs, and the drop-ins (their pair caches).
KEEPERS = ("fastema/_steps.py", "fastema/_chunks.py", "fastema/_layout.py", "fastema/_sources.py", "fastema/_shadow.py",
           "fastema/flat.py", "fastema/flat_window.py", "fastema/ops.py", "fastema/pairs.py", "fastema/smooth.py",
           "fastema/track.py", "fastema/_backends/kept.py", "fastema/average/", "fastema/torch/_placement/",
           "fastema/torch/_tensors/pairs.py", "fastema/torch/compat/", "fastema/torch/target.py")


def test_no_code_reads_a_kept_launch_by_position():
    bad = [f"{rel}:{line} {what}" for rel, text in _sources() if rel.startswith(KEEPERS)
           for line, what in _positional_reads(ast.parse(text))]
    assert not bad, bad


def test_the_table_identity_guard_lives_in_the_launches():
    bad = [f"{rel}:{line} {what}" for rel, text in _sources(skip=("fastema/_launch/", "fastema/_layout.py"))
           for line, what in _tables_identity_tests(ast.parse(text))]
    assert not bad, bad


def test_capture_bookkeeping_is_the_cuda_launchs():
    bad = [f"{rel}:{line}" for rel, text in _sources(skip=("fastema/_launch/",))
           for line in _calls_named(ast.parse(text), "note_capture")]
    assert not bad, bad


def test_the_rules_see_what_they_forbid():
    """The round-8 keepers' shapes, each caught."""
    old = '''
def update(self, g, gi):
    bound = self._lerps.get(gi)
    if bound is None or bound[0] is not g.tables:
        bound = self._bind(gi)
    bound[4](w, key)

def keep(key):
    kept = launches.get(key)
    if kept is None or kept[0] is not g.tables:
        kept = launches[key] = (g.tables, prepare("copy", g))
    kept[1]()
    _launch.note_capture(group)
'''
    tree = ast.parse(old)
    assert [w for _, w in _positional_reads(tree)] == ["bound[0]", "bound[4]", "kept[0]", "kept[1]"]
    assert len(_tables_identity_tests(tree)) == 2
    assert _calls_named(tree, "note_capture") == [13]


def test_one_address_keyed_lru_keeps_for_the_array_functions_and_the_pairs():
    import fastema.ops as ops
    import fastema.pairs as pairs
    from fastema._backends.kept import KeptLRU

    assert all(isinstance(c, KeptLRU) for c in (ops._KEPT, ops._GROUPS, pairs._PAIRS))
    bad = []
    for rel, text in _sources(skip=("fastema/_backends/kept.py",)):
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "popitem" \
                    and any(k.arg == "last" for k in node.keywords):
                bad.append(f"{rel}:{node.lineno} an LRU of its own (popitem(last=False))")
        if rel in ("fastema/ops.py", "fastema/pairs.py") and ("OrderedDict" in text or "lru_cache" in text):
            bad.append(f"{rel}: keeps by an OrderedDict or lru_cache of its own")
    assert not bad, bad


def test_prepare_and_a_groups_launch_return_a_launch():
    from fastema import _launch

    assert inspect.signature(_launch.prepare).return_annotation == "Launch"
    assert inspect.signature(_launch.Launches.launch).return_annotation == "Launch"
    assert {"__call__", "once"} <= set(vars(_launch.Launch))


REVIEWED = ("fastema/_steps.py", "fastema/flat.py", "fastema/flat_window.py", "fastema/_layout.py",
            "fastema/_chunks.py", "fastema/ops.py", "fastema/pairs.py", "fastema/smooth.py", "fastema/_launch/",
            "fastema/_backends/kept.py")


def test_duplicates_finds_no_pair_the_change_wrote_in_the_reviewed_modules():
    tool = shutil.which("duplicates")
    if tool is None:
        pytest.skip("the duplicates tool is not on PATH")
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "aef4f53^{commit}"], capture_output=True)
    if known.returncode:
        pytest.skip("this checkout does not hold aef4f53")
    out = subprocess.run([tool, "--change", "--base", "aef4f53", "--repo", str(ROOT), "--most", "200",
                          "--seconds", "120"], capture_output=True, text=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("D") and any(r in line for r in REVIEWED)]
    assert not rows, out


def _annotations(path: pathlib.Path) -> dict:
    """``target -> annotation`` of every annotated assignment of a module (``self.x: T = ...``, ``x: T``)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.AnnAssign):
            out.setdefault(ast.unparse(node.target), []).append(ast.unparse(node.annotation))
    return out


def test_the_engines_parts_are_typed_so_mypy_follows_an_update_to_the_launch():
    """Issue 80 item 6: the engine's shadow and adapter, and every shadow's layout, are protocols
    (not ``Any``): mypy follows ``EMA.update()`` through ``Average`` and ``Updatable.update_checked``
    to ``StepLaunches`` and the ``Launch`` a group keeps."""
    core = _annotations(FASTEMA / "average" / "_core.py")
    assert core["self.shadow"] == ["Updatable"] and core["self.adapter"] == ["ModelAdapter | None"]
    assert _annotations(FASTEMA / "_steps.py")["layout"] == ["LaunchLayout"]
    assert _annotations(FASTEMA / "_shadow.py")["layout"] == ["Layout"]
    from fastema._shadow import LaunchGroup, Updatable

    assert inspect.signature(LaunchGroup.launch).return_annotation == "Launch"
    assert isinstance(vars(Updatable)["layout"], property)          # read-only: every layout a Layout
