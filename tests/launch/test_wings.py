"""``fastema/_launch`` is a common top and three wings (issue 87 item 1): the top holds at most six
modules, the CPU, CUDA and shipped-code wings hold the rest, and ``import fastema`` loads no module of the
CUDA wing (it is imported at the first CUDA buffer, after the fork check)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[2]
LAUNCH = ROOT / "fastema" / "_launch"


def test_the_top_holds_at_most_six_modules_and_the_three_wings():
    top = sorted(p.name for p in LAUNCH.glob("*.py"))
    assert len(top) <= 6, top
    wings = sorted(p.name for p in LAUNCH.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert wings == ["cpu", "cuda", "shipped"], wings


def test_importing_fastema_loads_nothing_of_the_cuda_wing():
    code = ("import sys, fastema\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('fastema._launch'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.split()
    assert "fastema._launch.cpu.launch" in loaded, loaded          # the test sees what was loaded
    assert not [m for m in loaded if m.startswith(("fastema._launch.cuda", "fastema._launch.shipped"))], loaded


def test_no_two_classes_of_the_launch_layer_share_a_name():
    """One meaning per name (issue 87 item 2): two class names once named a CPU and a CUDA class
    each (the lerp's launch and the others'); now every class defined under ``fastema/_launch`` has a
    name of its own."""
    import ast

    where: dict = {}
    for path in sorted(LAUNCH.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(path.relative_to(ROOT).as_posix())
    assert len(where) > 30, sorted(where)                           # the walk sees the wings' classes
    shared = {name: files for name, files in where.items() if len(files) > 1}
    assert not shared, shared
