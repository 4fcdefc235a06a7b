"""One keeper of launches (issue 80, the round-9 structure review's done-when), as rules on the source:

- a prepared launch is kept by its launch group (``group.launch(op, **fixed)``) and read by name: no
  code of fastema/ calls or reads a kept record's field by position (``bound[4](...)``, ``kept[1]()``,
  ``entry[2]`` of a ``.get(...)``);
- the table-identity guard lives in one place: no ``.tables`` identity test outside ``fastema/_launch``
  (the launches, which follow their group's tables) and ``fastema/_layout.py``;
- capture bookkeeping is the CUDA launch's: ``note_capture`` has no caller outside ``fastema/_launch``;
- one address-keyed LRU (``fastema._backends.kept.KeptLRU``) for the array functions and the pairs;
- ``prepare`` returns a ``Launch``;
- no block of six or more lines of code stands twice in the modules the review named
  (``tests/support/repeats.py``; the known pairs listed with why), where the workplace's ``duplicates
  --change --base aef4f53`` held them before.

Each rule is also shown to see what it forbids (the round-8 code's shapes)."""
import ast
import inspect
import keyword
import pathlib
import re
import textwrap

from support import repeats

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


# The repeated blocks the reviewed modules held when this rule left the workplace's tool (each pair
# named by its two functions or classes, wherever they move): a new one fails.
KNOWN_REPEATS = {
    ("using", "using"): "compiler.using and drivers.using: the context stacks issue 87 item 1 folds into "
                        "one typed Switch",
    ("FlatShadow.__init__", "WindowShadow.__init__"): "the two shadows' argument checks, each naming its "
                                                      "own arguments",
    ("FlatShadow.copy_to_sources", "WindowShadow.copy_to_sources"): "the refusals before a copy out, one "
                                                                    "method of each shadow",
    ("Smoother.ema", "Smoother.sma"): "the two properties' refusals, each naming what it keeps",
    ("CudaLaunch.__call__", "CudaLerp.__call__"): "the kept launch, one Python frame by design (issue 86 "
                                                  "item 3): a helper both called would be a second frame",
}


def _new_repeats(files: list[tuple[str, str]]) -> list[str]:
    return [f"{r}" for r in repeats.repeats(files) if r.names not in KNOWN_REPEATS]


def test_no_block_is_written_twice_in_the_reviewed_modules():
    """No run of six or more lines of code stands twice in the modules the review named (names,
    strings and numbers read alike: ``tests/support/repeats.py``), beyond the known pairs. It held
    the modules to the workplace's ``duplicates --change`` before, which a user's machine lacks."""
    new = _new_repeats(repeats.in_tree(ROOT, REVIEWED))
    assert not new, f"blocks written twice (share the code, or name the pair in KNOWN_REPEATS with why): {new}"


def test_the_repeats_rule_sees_a_planted_block():
    """A function of a reviewed module written again with every name changed is found where it
    came from; an exact copy is found too; five lines alike are not a block, six are."""
    files = repeats.in_tree(ROOT, REVIEWED)
    path, text = files[0]
    fn = next(n for n in ast.walk(ast.parse(text))
              if isinstance(n, ast.FunctionDef) and (n.end_lineno or 0) - n.lineno >= 10)
    block = textwrap.dedent("\n".join(text.splitlines()[fn.lineno - 1:fn.end_lineno]))
    renamed = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: m[0] if keyword.iskeyword(m[0]) else m[0] + "_again", block)
    found = _new_repeats(files + [("fastema/planted.py", renamed)])
    assert any(f"{path}:" in f and "fastema/planted.py:" in f for f in found), found
    assert not _new_repeats(files)

    exact = repeats.repeats([("a.py", block), ("b.py", f"x = 1\n\n{block}\n")])
    assert len(exact) == 1 and exact[0].one.first == 1 and exact[0].other.first == 3, exact
    five = "\n".join(f"    v{i} = f(v{i - 1}, {i})" for i in range(1, 6))
    assert not repeats.repeats([("a.py", f"def f():\n{five}\n"), ("b.py", f"def g(x):\n{five}\n    return 0\n")])
    six = five + "\n    v6 = f(v5, 6)"
    pair = repeats.repeats([("a.py", f"def f():\n{six}\n"), ("b.py", f"def g(x):\n{six.replace('v', 'w')}\n")])
    assert [(r.one.first, r.one.last, r.other.first, r.other.last, r.names) for r in pair] == [(2, 7, 2, 7, ("f", "g"))]


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
