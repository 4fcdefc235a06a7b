"""The README's and the documentation's examples run as written.

The README keeps the quick start; the guides under docs/guides/ hold the other examples.
Each runnable example is executed (in its own process where a user would run it that way);
every other Python block of the README and the docs must at least compile.
"""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
               + list(DOCS.glob("*.md")) + list(DOCS.glob("guides/*.md")))


def guide(name: str) -> str:
    return (DOCS / "guides" / f"{name}.md").read_text()


def first_python_block(text: str, after: str = "") -> str:
    """The first ```python block of ``text`` (after the first match of the regex ``after``)."""
    return re.search(after + r".*?```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("text, where", [(README, "README"), ((DOCS / "getting_started.md").read_text(),
                                                              "getting_started.md")])
def test_quick_start_runs(capsys, text, where):
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1) if where == "README" \
        else first_python_block(text)
    exec(compile(block, f"{where} quick start", "exec"), {})
    assert "tensor(" in capsys.readouterr().out


GETTING_STARTED = (DOCS / "getting_started.md").read_text()


def test_getting_started_has_the_three_paths():
    heads = re.findall(r"^## (\d)\. (.*)$", GETTING_STARTED, re.M)
    assert [n for n, _ in heads] == ["1", "2", "3"], heads
    assert ".attach(opt)" in first_python_block(GETTING_STARTED, "## 1\\.")
    assert "pl.Trainer" in first_python_block(GETTING_STARTED, "## 2\\.")
    assert "jax.jit" in first_python_block(GETTING_STARTED, "## 3\\.")


def test_getting_started_trainer_path_runs(capsys, tmp_path, monkeypatch):
    """Path 2: a real Lightning fit with the average attached in configure_optimizers."""
    pytest.importorskip("pytorch_lightning")
    monkeypatch.chdir(tmp_path)
    exec(compile(first_python_block(GETTING_STARTED, "## 2\\."), "getting_started.md path 2", "exec"), {})
    numbers = np.array(re.findall(r"-?\d+\.\d+", capsys.readouterr().out.split("tensor(")[-1]), float)
    assert numbers.size == 8 and np.all(np.abs(numbers - 1.0) < 0.2), numbers


def test_getting_started_jax_path_runs():
    """Path 3, in its own process as a user would run it: the average inside the jitted step."""
    pytest.importorskip("jax")
    out = subprocess.run([sys.executable, "-c", first_python_block(GETTING_STARTED, "## 3\\.")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    numbers = np.array(re.findall(r"-?\d+\.\d+(?:e-?\d+)?", out.stdout), float)
    assert numbers.size == 8 and np.all(np.abs(numbers - 1.0) < 0.05), out.stdout


def test_array_example_runs(capsys):
    exec(compile(first_python_block(guide("array")), "guides/array.md", "exec"), {})
    shadow, pair = capsys.readouterr().out.split(" ", 1)
    assert abs(float(shadow) - 0.1) < 1e-6 and "0.01" in pair


@pytest.mark.parametrize("page, module", [("jax", "jax"), ("tensorflow", "tensorflow")])
def test_bridge_examples_run(page, module):
    """Each bridge's example, in its own process (as a user would run it): the EMA of
    a linear regression approaches the true weights (all 1)."""
    pytest.importorskip(module)
    block = first_python_block(guide(page))
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    numbers = np.array(re.findall(r"-?\d+\.\d+(?:e-?\d+)?", out.stdout), float)
    assert numbers.size == 8 and np.all(np.abs(numbers - 1.0) < 0.05), out.stdout


def test_large_models_example_runs_under_torchrun(tmp_path):
    """The FSDP2 example of "Large models", as the guide says to run it: torchrun, 2 ranks, gloo."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    (tmp_path / "fsdp_ema.py").write_text(first_python_block(guide("large_models")))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "fsdp_ema.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = re.search(r"sharded=True updates=20 EMA output (-?\d+\.\d+) == plain model (-?\d+\.\d+)", out.stdout)
    assert m and m.group(1) == m.group(2), out.stdout
    assert (tmp_path / "ema.safetensors").exists() and (tmp_path / "ckpt" / "ema").is_dir()


def test_replica_split_example_runs_under_torchrun(tmp_path):
    """The "Splitting the average across replicas" example of "Large models": torchrun, 2 ranks, gloo;
    each rank holds about half of the shadow and reads the unsplit average's output."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    (tmp_path / "ddp_ema.py").write_text(first_python_block(guide("large_models"), "Splitting the average"))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "ddp_ema.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = re.findall(r"rank \d: shadow bytes (\d+) of (\d+), EMA output (-?\d+\.\d+) == unsplit (-?\d+\.\d+)",
                       out.stdout)
    assert len(found) == 2, out.stdout
    for part, whole, val, ref in found:
        assert val == ref and int(part) < 0.6 * int(whole), out.stdout


def test_torch_compile_example_runs(capsys):
    block = first_python_block(guide("compile_and_graphs"))
    exec(compile(block, "guides/compile_and_graphs.md", "exec"), {})
    out = capsys.readouterr().out
    loss, updates = re.search(r"loss (\d+\.\d+), EMA updates (\d+)", out).groups()
    assert int(updates) == 200 and float(loss) < 0.05, out


def test_posthoc_example():
    """The post-hoc EMA example runs as written, and its synthesis is what it says."""
    scope = {}
    exec(compile(first_python_block(guide("posthoc")), "guides/posthoc.md", "exec"), scope)
    assert scope["weights"].solution.error < 1e-2
    assert len([n for n in os.listdir(scope["run_dir"]) if n.endswith(".safetensors")]) == 20


@pytest.mark.slow
def test_merging_example_runs(tmp_path):
    """The checkpoint-merging guide's run, as a user would run it: two HF Trainer runs of a tiny GPT-2,
    three merges of the constant run's checkpoints, the plot (about a minute on 2 cores)."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, "-c", first_python_block(guide("merging"))], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = re.search(r"step 120: constant LR (\S+), decayed (\S+), merged uniform (\S+), merged wsm:1-sqrt (\S+), "
                     r"merged ema:20 (\S+)", out.stdout)
    assert line, out.stdout[-2000:]
    constant, decayed, *merged = (float(v.rstrip(",")) for v in line.groups())
    assert min(merged) < constant and decayed < constant
    assert (tmp_path / "merging.png").stat().st_size > 10_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_compiles(page):
    """Fragments (``...; optimizer.step()``) are not run, but none may be a syntax error."""
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
        compile(textwrap.dedent(block), f"{page.name} block {i}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
    """Links to files of this repository (README -> docs/, docs -> the benchmarks) point at files
    that exist. A link into a top-level folder this checkout does not have (the benchmark tooling,
    which the tests run without) is left to that folder's own tests."""
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        top = (page.parent / target).resolve().relative_to(ROOT.resolve()).parts[:1]
        if top and not (ROOT / top[0]).exists():
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_is_a_landing_page():
    assert len(README.encode()) < 12 * 1024, "README.md is the landing page: keep it under 12 KB (docs/ has room)"


def test_the_readme_shows_the_quick_start_on_its_first_screen_and_keeps_the_two_set_up_commands():
    lines = README.splitlines()
    quick = next(i for i, line in enumerate(lines) if line.startswith("## Quick start"))
    first_code = next(i for i, line in enumerate(lines) if line.startswith("```python"))
    assert quick < 45 and first_code < 45, f"the quick start starts at line {quick + 1}: move it into the first screen"
    intro = " ".join(lines[:quick])
    for named in ("target networks", "checkpoint merging", "`Trainer`"):
        assert named in intro, f"the README's introduction should name {named}"
    setup = README[README.index("## Set up and run"):]
    assert "bash scripts/demo.sh" in setup and "bash scripts/test.sh" in setup
