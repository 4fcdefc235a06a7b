"""The array functions inside ``torch.compile`` whatever was imported first: their operators
(``fastema.ops.COMPILED``) are registered by the first array function that finds torch loaded, in
eager code or as Dynamo traces it. Before, only ``import fastema.torch`` registered them: a compiled
function that reached one first traced fastema's eager path (numba, the torch road's guard) and
failed. Each case a fresh interpreter (this one registered them long ago)."""
import subprocess
import sys

import pytest

_PRELUDE = """
import sys
{first}
s, x, ref = torch.zeros(16), torch.randn(16), torch.zeros(16)

def step(s, x):
    fastema.ema_update_(s, x, 0.9)
    fastema.ema_update_multi_(s.view(1, 16), x, [0.75])
    return s

def expect(n):
    for _ in range(n):
        ref.lerp_(x, 1 - 0.9)
        ref.lerp_(x, 1 - 0.75)
    assert torch.equal(s, ref), (s, ref)

def compiled(full):
    return torch.compile(step, backend="aot_eager", fullgraph=full)
"""

_FASTEMA_FIRST = "import fastema\nimport torch\n"
_CASES = {
    # isort's order, a compiled function first (before: Dynamo traced fastema's eager path and
    # failed); then a new function
    "fastema first, compiled first": (_FASTEMA_FIRST, """
assert not fastema.ops.COMPILED
compiled(True)(s, x)
expect(1)
assert fastema.ops.COMPILED
torch.compile(lambda s, x: step(s, x), backend="aot_eager", fullgraph=True)(s, x)
expect(1)
"""),
    # isort's order, an eager call first, which keeps the torch road (before: Dynamo traced the
    # road's guard and failed), then the compiled function
    "fastema first, eager first": (_FASTEMA_FIRST, """
step(s, x)
step(s, x)
expect(2)
from fastema._backends import torch_lerp
assert bool(fastema.ops._ROAD_TYPES) == torch_lerp._fma_on_cpu()   # kept where torch's kernels give its bits
compiled(True)(s, x)
expect(1)
"""),
    # without fullgraph: no graph break
    "fastema first, no fullgraph": (_FASTEMA_FIRST, """
import torch._dynamo.utils as u
compiled(False)(s, x)
expect(1)
assert sum(u.counters["graph_break"].values()) == 0, u.counters["graph_break"]
"""),
    # torch first: nothing registered at import (no framework imported), the first call traced
    "torch first": ("import torch\nimport fastema\n", """
assert not fastema.ops.COMPILED and "fastema.torch" not in sys.modules
f = compiled(True)
f(s, x)
expect(1)
with torch.compiler.set_stance("fail_on_recompile"):      # the road kept by the first run's kernel
    f(s, x)
expect(1)
"""),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_array_functions_compile_whatever_was_imported_first(case):
    first, body = _CASES[case]
    code = _PRELUDE.format(first=first) + body + "\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], out.stderr[-4000:]


def test_the_mark_dynamo_calls_for_real_is_torchs_own():
    """``ops._loaded`` is marked as ``torch.compiler.assume_constant_result`` marks a function
    (set without importing torch), and Dynamo's reader of the mark is a row of
    ``fastema._privates``."""
    import torch

    from fastema import _privates, ops

    marked = torch.compiler.assume_constant_result(lambda: 0)
    added = set(vars(marked))
    assert added == {"_dynamo_marked_constant"} and set(vars(ops._loaded)) >= added
    assert all(getattr(ops._loaded, a) == getattr(marked, a) for a in added)
    assert any(row.attr == "_dynamo_marked_constant" for row in _privates.TABLE)


_UNAVAILABLE = """
import sys, warnings
import numpy as np
{block}
import fastema
a, b = np.zeros(4, np.float32), np.ones(4, np.float32)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    fastema.ema_update_(a, b, 0.5)
    fastema.ema_update_(a, b, 0.5)
assert np.array_equal(a, np.full(4, 0.75, np.float32)), a
print(len(seen), *[str(w.message) for w in seen], sep="\\n")
"""


@pytest.mark.parametrize("block, warned", [("sys.modules['torch'] = None", 0),
                                           ("import torch\nsys.modules['fastema.torch'] = None", 1),
                                           ("import torch\ntorch.__version__ = '2.9.1'", 1)],
                         ids=["torch blocked", "fastema.torch blocked", "torch older than the floor"])
def test_array_functions_run_where_torch_is_blocked_or_fastema_torch_cannot_load(block, warned):
    """A blocked torch (``sys.modules["torch"] = None``) is not loaded; a fastema.torch that
    cannot be imported (an older torch, say) is said once in a warning, and the calls run eagerly
    (before: every array call raised ModuleNotFoundError)."""
    code = _UNAVAILABLE.format(block=block)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.splitlines()
    assert int(lines[0]) == warned and all("fastema.torch could not be imported" in w for w in lines[1:])
    if "__version__" in block:                        # the warning carries the refusal: what to do
        assert "fastema.torch needs torch >= " in out.stdout and "pip install -U 'torch>=" in out.stdout

