"""The bench tooling's shape (issue 62): a package a product, one import style, every command and
path the docs name exists, and the library's command line points at the suite that runs. Reads
files and imports modules only; nothing is run but ``--help``."""
import ast
import importlib.util
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
PRODUCTS = ("suite", "scripts", "gpu", "gates", "tests")
MAX_LINES = 450                         # per module, as in the library (docs/architecture.md)
TEXTS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", BENCH / "README.md",
                ROOT / "scripts" / "test.sh", BENCH / "gpu" / "run.sh", BENCH / "gpu" / "env.sh",
                *ROOT.glob("docs/*.md"), *ROOT.glob("docs/guides/*.md")])
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in BENCH.rglob("*.py") if p.relative_to(BENCH).parts[0] != "out")


def test_bench_is_a_package_a_product_with_few_top_level_modules():
    top = sorted(p.name for p in BENCH.glob("*.py"))
    assert len(top) <= 12, f"bench/ holds {len(top)} modules at its top: put each in its product"
    assert top == ["__init__.py"], top
    for product in PRODUCTS:
        assert (BENCH / product / "__init__.py").is_file(), f"bench/{product}/ is not a package"
    stray = sorted(str(p.relative_to(ROOT)) for p in _modules()
                   if p.parent != BENCH and p.relative_to(BENCH).parts[0] not in PRODUCTS)
    assert not stray, stray


def test_no_bench_module_over_450_lines():
    """One file, one concern, at most 450 lines: the library's rule
    (``tests/test_architecture.py``) held in ``bench/`` too (``bench/gpu/sass.py`` reached 720
    lines before it became the package ``bench/gpu/sass/``)."""
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"bench modules over {MAX_LINES} lines: {long}; split each by concern"


def _path_changes_and_bare_imports(path: pathlib.Path, siblings: set) -> list[str]:
    where = path.relative_to(ROOT)
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            call = ast.unparse(node.func)
            if call in ("sys.path.insert", "sys.path.append", "sys.path.extend"):
                bad.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            by_path = call.endswith("spec_from_file_location")
            if by_path and re.search(r"bench|gpu_", ast.unparse(node)):
                bad.append(f"{where}:{node.lineno}: a bench module loaded by its path")
        if isinstance(node, ast.Import):
            bad += [f"{where}:{node.lineno}: import {a.name}"
                    for a in node.names if a.name in siblings]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in siblings:
            bad.append(f"{where}:{node.lineno}: from {node.module} import ...")
    return bad


def test_one_import_style_no_path_insertion():
    """``python -m bench....`` from the root: no module changes ``sys.path`` (a child process's
    script, a string the module runs, may: it is not this module's code) and none imports a sibling
    by its bare name (the old ``import gpu_common`` / ``from conftest import`` style)."""
    siblings = {p.stem for p in _modules()} - {"__init__", "__main__"}
    bad = [line for path in _modules() for line in _path_changes_and_bare_imports(path, siblings)]
    assert not bad, bad


def _imports_of_the_tests(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """Each absolute import of ``tests`` or ``support`` (``tests/`` on ``sys.path``) in ``path``."""
    where = path.relative_to(root)
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        bad += [f"{where}:{node.lineno}: {ast.unparse(node)}" for name in names
                if name.split(".")[0] in ("tests", "support")]
    return bad


def test_no_bench_module_imports_the_tests():
    """``bench/`` imports nothing from the library's ``tests/`` (issue 72 item 6: the gates, the
    suite, the scripts and the GPU stages imported ``tests.support``'s fake GPU and baselines):
    what both need is the root's ``testkit``, so ``tests/`` is free to change for its own sake."""
    bad = [line for path in _modules() for line in _imports_of_the_tests(path)]
    assert not bad, f"bench modules import the tests (use testkit): {bad}"


def test_the_tests_imports_rule_sees_what_it_forbids(tmp_path):
    (tmp_path / "bench").mkdir()
    seen = tmp_path / "bench" / "m.py"
    seen.write_text("import tests.support\nfrom support.fake_gpu import fake_gpu\n"
                    "def f():\n    from tests.support import fake_gpu as G\n"
                    "import testkit\nfrom testkit.baselines import TorchSmoother\nfrom .tests import x\n")
    found = _imports_of_the_tests(seen, tmp_path)
    assert [line.split(": ", 1)[1] for line in found] == [
        "import tests.support", "from support.fake_gpu import fake_gpu", "from tests.support import fake_gpu as G"]


def test_every_bench_command_and_path_the_docs_name_exists():
    """``python -m bench.X.Y`` names a module of this tree, and every ``bench/...`` path a file or
    folder (``bench/out/`` and ``bench/results/`` files are outputs: not checked)."""
    missing = []
    for page in TEXTS:
        text = page.read_text()
        for module in re.findall(r"python3? -m\s+(bench(?:\.[a-z_]+)*)\b(?!\.[A-Z])", text):
            if importlib.util.find_spec(module) is None:
                missing.append(f"{page.relative_to(ROOT)}: python -m {module}")
        for path in re.findall(r"(?<![\w/.])bench/[\w./*-]*\w", text):
            parts = pathlib.PurePosixPath(path).parts
            if parts[1] in ("out", "results") or "*" in path or "DATE" in path:
                continue
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing


def test_every_link_into_bench_exists():
    """The docs' links into bench/ (tests/test_docs.py leaves them to this test: the library's
    tests run without bench/)."""
    missing = []
    for page in TEXTS:
        for target in LINK.findall(page.read_text()):
            path = (page.parent / target).resolve()
            if "://" not in target and path.is_relative_to(BENCH) and not path.exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, missing


@pytest.mark.parametrize("page", [BENCH / "README.md", BENCH / "results" / "LOG.md"], ids=lambda p: p.name)
def test_bench_readme_blocks_compile_and_its_links_exist(page):
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
        compile(textwrap.dedent(block), f"{page.name} block {i}", "exec")
    for target in LINK.findall(page.read_text()):
        if "://" not in target and not target.startswith("mailto:"):
            assert (page.parent / target).exists(), f"{page.name} links to {target}: not there"


def test_the_library_command_line_points_at_the_suite_and_the_suite_runs(capsys):
    """``python -m fastema bench`` left the package (issue 62): its message names this command,
    which answers ``--help``; each option says its default."""
    from bench.suite import __main__ as suite
    from fastema.__main__ import MOVED

    assert "python -m bench.suite" in MOVED["bench"] and "bench/README.md" in MOVED["bench"]
    run = subprocess.run([sys.executable, "-m", "bench.suite", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage: python -m bench.suite"), run.stdout[:300]
    assert suite.main(["--report"]) == 2 and "error:" in capsys.readouterr().err
    actions = [a for a in suite._parser()._actions if a.option_strings and a.dest != "help"]
    assert actions
    for a in actions:
        assert a.help and "(default: " in a.help, a.option_strings


SCRIPTS = sorted(p.stem for p in (BENCH / "scripts").glob("*.py") if p.stem != "__init__")


def _section(text: str, heading: str) -> str:
    """The Markdown section under ``heading`` (a line ``## heading``), to the next ``## ``."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_each_script_is_marked_live_or_historical_and_listed_where_it_belongs():
    """Issue 87 item 6: a script's docstring says in its first line whether it is live (it runs
    against today's code and answers a current question: listed in bench/README.md, "Scripts") or
    historical (the record of one issue's figures: listed in bench/results/LOG.md, "Historical
    scripts", with the issue and the date or commit of its figures in that first line)."""
    readme = _section((BENCH / "README.md").read_text(), "Scripts")
    log = _section((BENCH / "results" / "LOG.md").read_text(), "Historical scripts")
    bad = []
    for name in SCRIPTS:
        first = ast.get_docstring(ast.parse((BENCH / "scripts" / f"{name}.py").read_text())).splitlines()[0]
        if first.startswith("Live: "):
            if f"| `{name}` |" not in readme:
                bad.append(f"{name}: live, but not in bench/README.md's Scripts table")
        elif first.startswith("Historical: "):
            if not re.search(r"issue \d+", first) or not re.search(r"\d{4}-\d\d-\d\d|\b[0-9a-f]{7,40}\b", first):
                bad.append(f"{name}: historical, but its first line names no issue and date or commit")
            if f"bench/scripts/{name}.py" not in log:
                bad.append(f"{name}: historical, but not in bench/results/LOG.md's Historical scripts")
        else:
            bad.append(f"{name}: its docstring's first line says neither 'Live: ' nor 'Historical: '")
    assert not bad, bad


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_is_a_module_with_a_main_guard(name):
    """Each measurement runs as ``python -m bench.scripts.NAME`` (found, with a ``__main__``
    guard), without importing it (some import DeepSpeed or diffusers at the top)."""
    spec = importlib.util.find_spec(f"bench.scripts.{name}")
    assert spec is not None and spec.origin
    assert 'if __name__ == "__main__":' in pathlib.Path(spec.origin).read_text(), name
