"""The wheel as a user gets it: built from a clean copy of the tree (``python -m build``: the sdist, then
the wheel from the sdist), holding every package and module of ``fastema/`` and ``kernels/`` (installed as
``fastema.kernels``; ``[tool.setuptools] packages`` in pyproject.toml is a hand-kept list), installed into
a fresh venv that cannot see the tree, where every public module imports and each face that venv has
makes one update, checked against a value computed by hand. The floor of ``[build-system] requires``
builds it too, without build isolation (as the GPU run's set-up installs).

Offline but for one step: the floor venv's setuptools comes from the package index (skipped where that
fails, outside CI). The fresh venv borrows the test venv's third-party packages through a ``.pth`` file
(every site directory of this interpreter, and its ``.pth`` files but fastema's editable one), so
nothing else is downloaded. About 25 s on 2 cores, most of it the frameworks' imports and the cold
Numba compiles in the fresh venv.
"""
import ast
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# The first setuptools release satisfying pyproject.toml's `setuptools>=77` (77.0.0 was never published):
# the oldest one a build without isolation may meet.
SETUPTOOLS_FLOOR = "77.0.1"

# What a clean clone would not have: the venv, caches, build outputs (paths from the root; the patterns anywhere).
_SKIP_PATHS = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", ".benchmarks", "build",
               "dist", ".whl", "docs/_build"}
_SKIP_PATHS |= {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
                if line.startswith("/")}       # .gitignore's rooted paths (the tooling's outputs)
_SKIP_PATHS |= {"kernels/device/.cu12-entries", "kernels/device/.cu13-entries"}   # a build's staging
_SKIP_ANY = ("__pycache__", "*.egg-info", "*.pyc")


def _run(cmd, timeout=300, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{(p.stdout + p.stderr)[-6000:]}"
    return p


def _tree_modules() -> set[str]:
    """Every .py file of the packages, as the wheel should name it."""
    mods = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastema").rglob("*.py") if "__pycache__" not in p.parts}
    mods |= {"fastema/kernels/" + p.relative_to(ROOT / "kernels").as_posix()
             for p in (ROOT / "kernels").rglob("*.py") if "__pycache__" not in p.parts}
    return mods


def _tree_packages() -> set[str]:
    pkgs = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastema").rglob("__init__.py")
            if "__pycache__" not in p.parts}
    kernels = {"fastema." + ".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "kernels").rglob("__init__.py") if "__pycache__" not in p.parts}
    return pkgs | kernels


def _public_modules() -> list[str]:
    """PUBLIC_MODULES of docs/ext/coverage_check.py, read without importing it."""
    tree = ast.parse((ROOT / "docs" / "ext" / "coverage_check.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PUBLIC_MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("docs/ext/coverage_check.py has no PUBLIC_MODULES")


def _venv(path: Path) -> Path:
    """A venv without pip (the test venv's pip installs into it: pip --python): its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], timeout=120)
    return path / "bin" / "python"


def _pip(python: Path, *args, timeout=300):
    return _run([sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check", *args],
                timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel) built by `python -m build` (this venv's setuptools, no isolation: no network) from a
    copy of the tree, so nothing is written into the tree and no stale egg-info there feeds the sdist."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"

    def ignore(folder, names):
        rel = Path(folder).relative_to(ROOT)
        return set(shutil.ignore_patterns(*_SKIP_ANY)(folder, names)) | {
            n for n in names if (rel / n).as_posix() in _SKIP_PATHS}

    assert importlib.util.find_spec("build.__main__"), "python -m build: pip install build (the dev extra has it)"
    shutil.copytree(ROOT, src, ignore=ignore, symlinks=True)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", base / "dist", src], timeout=300)
    sdists, wheels = sorted((base / "dist").glob("*.tar.gz")), sorted((base / "dist").glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(os.listdir(base / "dist"))
    return sdists[0], wheels[0]


def test_wheel_holds_every_package_and_module(built):
    sdist, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    missing_pkgs = sorted(p for p in _tree_packages() if p.replace(".", "/") + "/__init__.py" not in names)
    assert not missing_pkgs, (f"packages of the tree missing from the wheel (pyproject.toml's [tool.setuptools] "
                              f"packages list?): {missing_pkgs}")
    missing = sorted(_tree_modules() - names)
    assert not missing, f"modules of the tree missing from the wheel: {missing}"
    assert "fastema/py.typed" in names
    from fastema._launch.shipped.store import SETS

    shipped = {f"fastema/kernels/device/{s}/{n}" for s, spec in SETS.items()
               for n in ["index.json"] + [f"{i}.xz" for i in spec["images"]]}
    assert shipped <= names, f"the shipped device code missing from the wheel: {sorted(shipped - names)}"
    device = {n for n in names if n.startswith("fastema/kernels/device/")}
    assert device == shipped, f"not shipped files in the wheel (a build's entries?): {sorted(device - shipped)}"
    size = os.path.getsize(wheel)
    assert size < 12 * 1024 * 1024, f"the wheel is {size / 2**20:.1f} MiB, over 12 MiB"
    dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert len(dist_info) == 1, dist_info
    stray = sorted(n for n in names if n.split("/")[0] not in {"fastema"} | dist_info)
    assert not stray, f"files outside the fastema package: {stray}"
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info.pop()}/METADATA").decode()
    assert re.search(r"^License-Expression: MIT$", metadata, re.M), metadata[:800]
    version = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "fastema" / "__init__.py").read_text(), re.M).group(1)
    assert re.search(rf"^Version: {re.escape(version)}$", metadata, re.M), \
        f"the wheel's version is not fastema.__version__ ({version}): pyproject.toml's [project] version?"
    with tarfile.open(sdist) as tar:                       # the sdist the wheel was built from
        top = tar.getnames()[0].split("/")[0]
        in_sdist = {n[len(top) + 1:] for n in tar.getnames()}
    assert {"pyproject.toml", "README.md", "LICENSE", "kernels/__init__.py", "fastema/__init__.py"} <= in_sdist


# Run by the fresh venv's python, from outside the tree: argv[1] is the venv, argv[2] the public modules (JSON),
# argv[3] the tree (which must not be on sys.path). Prints RESULT and a JSON line.
CHECK = r'''
import importlib, importlib.util, json, os, sys

venv, modules, tree = os.path.realpath(sys.argv[1]), json.loads(sys.argv[2]), os.path.realpath(sys.argv[3])
on_path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) in (tree, os.path.join(tree, "fastema"))]
assert not on_path, f"the tree is on sys.path: {on_path}"
import numpy as np

import fastema

where = os.path.realpath(fastema.__file__)
assert where.startswith(venv + os.sep), f"fastema imported from {where}, not from the venv {venv}"
assert os.path.realpath(importlib.import_module("fastema.kernels").__file__).startswith(venv + os.sep)
out = {"fastema": where, "imported": [], "skipped": {}, "faces": []}
for name in modules:
    try:
        importlib.import_module(name)
        out["imported"].append(name)
    except ModuleNotFoundError as e:                     # a framework this venv lacks; never fastema itself
        if not e.name or e.name.split(".")[0] == "fastema":
            raise
        out["skipped"][name] = e.name

if importlib.util.find_spec("numba.cuda"):              # the shipped device code, found and whole
    from fastema._launch.cuda import device_code

    assert device_code.device_dir().startswith(venv + os.sep), device_code.device_dir()
    for name, shipped in device_code.sets().items():     # one entry of every image of every set
        key = next(iter(shipped.index["variants"]))
        for image in shipped.index["images"]:
            assert device_code.entry(name, key, image) is not None, (name, image)
        out["device_code"] = len(shipped.index["variants"])
    out["sets"] = sorted(device_code.sets())

d = 0.75                                                 # every value below is exact in float32
a0 = np.array([1.0, 2.0, 4.0], np.float32)
a1 = np.array([3.0, -2.0, 8.0], np.float32)
want = np.array([1.5, 1.0, 5.0], np.float32)             # d * a0 + (1 - d) * a1

s = a0.copy()
fastema.ema_update_(s, a1, decay=d)
np.testing.assert_array_equal(s, want)
out["faces"].append("ema_update_")

src = a0.copy()
flat = fastema.FlatShadow([src])
src[:] = a1
flat.update(decay=d)
np.testing.assert_array_equal(np.asarray(flat.view(0)), want)
out["faces"].append("FlatShadow")

if importlib.util.find_spec("torch"):
    import torch

    import fastema.torch

    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(a0)[None])
    ema = fastema.torch.EMA(model, decay=d)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(a1)[None])
    ema.update()
    with ema.average_parameters():
        np.testing.assert_array_equal(model.weight.detach().numpy()[0], want)
    np.testing.assert_array_equal(model.weight.detach().numpy()[0], a1)
    out["faces"].append("torch")

if importlib.util.find_spec("jax"):
    import jax.numpy as jnp

    import fastema.jax

    ema = fastema.jax.EMA({"w": jnp.asarray(a0)}, decay=d)
    ema.update({"w": jnp.asarray(a1)})
    np.testing.assert_array_equal(np.asarray(ema.shadow()["w"]), want)
    out["faces"].append("jax")

if importlib.util.find_spec("tensorflow"):
    import tensorflow as tf

    import fastema.tensorflow

    v = tf.Variable(a0)
    ema = fastema.tensorflow.EMA([v], decay=d)
    v.assign(a1)
    ema.update()
    np.testing.assert_array_equal(ema.averages()[0].numpy(), want)
    out["faces"].append("tensorflow")

print("RESULT " + json.dumps(out))
'''


def _borrow_site_packages(venv_python: Path):
    """Let the fresh venv see this venv's third-party packages, never fastema from the tree: a .pth naming
    this interpreter's site directories (after the venv's own, so the installed wheel comes first), and a
    copy of their .pth files (namespace shims, numba-cuda's redirector) but fastema's editable finder."""
    purelib = _run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    target = Path(purelib)
    dirs = [d for d in dict.fromkeys(site.getsitepackages()) if os.path.isdir(d)]
    root = str(ROOT)
    (target / "00-borrowed-site-packages.pth").write_text("".join(d + "\n" for d in dirs))
    for d in dirs:
        for pth in sorted(Path(d).glob("*.pth")):
            text = pth.read_text(errors="replace")
            if "fastema" in pth.name.lower() or "fastema" in text.lower() or root in text:
                continue
            if not (target / pth.name).exists():
                shutil.copyfile(pth, target / pth.name)


def test_wheel_installs_and_works_outside_the_tree(built, tmp_path):
    _, wheel = built
    venv = tmp_path / "venv"
    python = _venv(venv)
    _pip(python, "install", "--no-deps", "--no-index", "--no-compile", wheel)
    _borrow_site_packages(python)
    run = tmp_path / "run"                               # cwd and script folder: no fastema, no tree
    run.mkdir()
    (run / "check_wheel.py").write_text(CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NUMBA_ENABLE_CUDASIM"))}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    modules = _public_modules()
    p = _run([python, "-I", run / "check_wheel.py", venv, json.dumps(modules), ROOT], cwd=run, env=env, timeout=420)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(line[-1][len("RESULT "):])
    # A public module may be skipped only for a framework that this (the test) venv lacks as well.
    wrongly = {m: dep for m, dep in out["skipped"].items() if importlib.util.find_spec(dep.split(".")[0])}
    assert not wrongly, f"public modules that failed in the wheel's venv though their framework is here: {wrongly}"
    assert sorted(out["imported"] + list(out["skipped"])) == sorted(modules)
    expected = ["ema_update_", "FlatShadow"] + [f for f in ("torch", "jax", "tensorflow")
                                                 if importlib.util.find_spec(f)]
    assert out["faces"] == expected, out
    if importlib.util.find_spec("numba.cuda"):
        index = json.loads((ROOT / "kernels" / "device" / "cu13" / "index.json").read_text())
        assert out["device_code"] == len(index["variants"]) and out["sets"] == ["cu12", "cu13"], out


def test_setuptools_floor_builds_the_wheel(built, tmp_path):
    """`pip wheel --no-build-isolation` from the sdist, in a venv holding exactly the oldest setuptools that
    [build-system] requires allows: it builds the same files as the newest."""
    requires = _build_requires()
    assert requires == ["setuptools>=77"], (f"[build-system] requires changed to {requires}: set SETUPTOOLS_FLOOR "
                                            f"in tests/test_wheel.py to its oldest release")
    sdist, wheel = built
    python = _venv(tmp_path / "floor")
    try:
        _pip(python, "install", "--no-deps", "--only-binary=:all:", f"setuptools=={SETUPTOOLS_FLOOR}")
    except AssertionError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"setuptools=={SETUPTOOLS_FLOOR} could not be installed (no package index?): {str(e)[-300:]}")
    version = _run([python, "-c", "import setuptools; print(setuptools.__version__)"]).stdout.strip()
    assert version == SETUPTOOLS_FLOOR
    out = tmp_path / "floor-dist"
    _pip(python, "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", out, sdist)
    floor_wheel, = out.glob("*.whl")
    assert floor_wheel.name == wheel.name

    def files(w):
        return {n for n in zipfile.ZipFile(w).namelist() if ".dist-info/" not in n}

    assert files(floor_wheel) == files(wheel)


def _build_requires() -> list[str]:
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
