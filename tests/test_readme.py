"""The README's examples run as written."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_quick_start_runs(capsys):
    block = re.search(r"## Quick start\s+```python\n(.*?)```", README, re.S).group(1)
    exec(compile(block, "README quick start", "exec"), {})
    assert "tensor(" in capsys.readouterr().out


@pytest.mark.parametrize("heading, module", [("### JAX:", "jax"), ("### TensorFlow:", "tensorflow")])
def test_bridge_examples_run(heading, module):
    """Each bridge's README example, in its own process (as a user would run it): the EMA of
    a linear regression approaches the true weights (all 1)."""
    pytest.importorskip(module)
    block = re.search(re.escape(heading) + r".*?```python\n(.*?)```", README, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    numbers = np.array(re.findall(r"-?\d+\.\d+(?:e-?\d+)?", out.stdout), float)
    assert numbers.size == 8 and np.all(np.abs(numbers - 1.0) < 0.05), out.stdout


def test_large_models_example_runs_under_torchrun(tmp_path):
    """The FSDP2 example of "Large models", as the README says to run it: torchrun, 2 ranks, gloo."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    block = re.search(r"### Large models.*?```python\n(.*?)```", README, re.S).group(1)
    (tmp_path / "fsdp_ema.py").write_text(block)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "fsdp_ema.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = re.search(r"sharded=True updates=20 EMA output (-?\d+\.\d+) == plain model (-?\d+\.\d+)", out.stdout)
    assert m and m.group(1) == m.group(2), out.stdout
    assert (tmp_path / "ema.safetensors").exists() and (tmp_path / "ckpt" / "ema").is_dir()


def test_torch_compile_example_runs(capsys):
    block = re.search(r"### torch.compile and CUDA graphs.*?```python\n(.*?)```", README, re.S).group(1)
    exec(compile(block, "README torch.compile", "exec"), {})
    out = capsys.readouterr().out
    loss, updates = re.search(r"loss (\d+\.\d+), EMA updates (\d+)", out).groups()
    assert int(updates) == 200 and float(loss) < 0.05, out


def test_posthoc_example():
    """The "Post-hoc EMA" example runs as written, and its synthesis is what it says."""
    block = re.search(r"### Post-hoc EMA.*?```python\n(.*?)```", README, re.S).group(1)
    scope = {}
    exec(compile(block, "README post-hoc EMA", "exec"), scope)
    assert scope["weights"].solution.error < 1e-2
    assert len([n for n in os.listdir(scope["run_dir"]) if n.endswith(".safetensors")]) == 20
