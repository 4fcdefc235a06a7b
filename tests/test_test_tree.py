"""The test tree's own rules. pytest (its default ``prepend`` import mode, no ``__init__.py`` here)
puts the folder of every test file on ``sys.path``, and ``pythonpath = ["."]`` the repository's
root, so each folder below one of those is importable by its name, as a namespace package. A
namespace package loses to an installed package, so such a folder named like an optional dependency
hides only its absence: ``pytest.importorskip`` of it then passes (and ``find_spec`` finds it), and
the test fails at the next import instead of skipping. ``tests/torchtitan`` did that on a machine
without torchtitan (``No module named 'torchtitan.components'``): it is ``tests/titan``."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

#: names whose folders stay, and why none of them hides an absence
KEPT = {"torch": "every run of the tests has torch (CI pins it), so tests/torch never stands in for it",
        "fastema": "the package under test, a regular package: found before any folder",
        "build": "the build's output folder (ignored by git); tests/test_wheel.py asks for build.__main__, "
                 "which that folder has not"}


def _skipped_without() -> set:
    """The top-level names of every module the tests skip or stop without:
    ``pytest.importorskip("name...")`` and ``importlib.util.find_spec("name...")``."""
    names = set()
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("importorskip", "find_spec")
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value.split(".")[0])
    return names


def _importable_folders() -> dict:
    """Every folder importable by its name while the tests run: ``{name: [paths]}``."""
    on_path = {ROOT} | {p.parent for p in TESTS.rglob("*.py")
                        if p.name.startswith("test_") or p.name == "conftest.py"}
    found: dict = {}
    for folder in on_path:
        for sub in folder.iterdir():
            if sub.is_dir() and sub.name.isidentifier():
                found.setdefault(sub.name, []).append(sub.relative_to(ROOT).as_posix())
    return found


def test_no_test_folder_is_named_like_a_module_the_tests_skip_without():
    clashes = {name: where for name, where in _importable_folders().items()
               if name in _skipped_without() and name not in KEPT}
    assert not clashes, clashes


def test_the_rule_sees_the_folder_it_was_written_for_and_keeps_only_what_it_names():
    assert "torchtitan" in _skipped_without() and "titan" in _importable_folders()
    assert {"torch", "fastema", "build"} <= _skipped_without()
