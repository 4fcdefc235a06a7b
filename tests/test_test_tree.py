"""The test tree's own rules. pytest (its default ``prepend`` import mode, no ``__init__.py`` here)
puts the folder of every test file on ``sys.path``, so each folder below one of those is importable
by its name, as a namespace package. A namespace package loses to an installed package, so such a
folder named like an optional dependency hides only its absence: ``pytest.importorskip`` of it then
passes and the test fails at the next import instead of skipping. ``tests/torchtitan`` did that on
a machine without torchtitan (``No module named 'torchtitan.components'``): it is ``tests/titan``."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _skipped_without() -> set:
    """The top-level names of every module the tests import or skip without
    (``pytest.importorskip("name...")``)."""
    names = set()
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(str(node.args[0].value).split(".")[0])
    return names


def _importable_folders() -> dict:
    """Every folder importable by its name while the tests run: ``{name: [paths]}``."""
    on_path = {p.parent for p in TESTS.rglob("*.py") if p.name.startswith("test_") or p.name == "conftest.py"}
    found: dict = {}
    for folder in on_path:
        for sub in folder.iterdir():
            if sub.is_dir() and sub.name.isidentifier():
                found.setdefault(sub.name, []).append(sub.relative_to(ROOT).as_posix())
    return found


def test_no_test_folder_is_named_like_a_module_the_tests_skip_without():
    # torch is every test's: installed wherever the tests run, so tests/torch never hides it
    clashes = {name: where for name, where in _importable_folders().items()
               if name in _skipped_without() - {"torch"}}
    assert not clashes, clashes


def test_the_rule_sees_the_folder_it_was_written_for():
    assert "torchtitan" in _skipped_without() and "titan" in _importable_folders()
