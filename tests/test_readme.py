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
