"""``python -m fastema warm`` (issue 54 item 4): fills the CPU kernel cache so that a fresh process's first
update compiles nothing; run again, it compiles nothing; where the kernels cannot be cached it says why
and what to do, and exits 1."""
import json
import os
import subprocess
import sys

import pytest
from compile_count import COUNT_COMPILES

from fastema.__main__ import _help
from fastema.kernels import _cache

# A fresh process's first updates: a float32 model large enough for the parallel kernels, a bfloat16 one,
# two decays and skip_nonfinite; prints how many fastema kernels numba compiled (its compile event fires
# only where nothing was loaded from the cache).
FIRST_UPDATE = COUNT_COMPILES + r"""
import json
import torch
from torch import nn
from fastema.torch import EMA
big = nn.Sequential(nn.Linear(1024, 512), nn.GELU(), nn.Linear(512, 64))
EMA(big).update()
EMA(big.to(torch.bfloat16)).update()
EMA(nn.Linear(64, 64), decay=(0.99, 0.999), skip_nonfinite=True).update()
print(json.dumps(compiled))
"""


def _warm(env, *args):
    return subprocess.run([sys.executable, "-m", "fastema", "warm", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_warm_is_a_command():
    assert "warm" in _help()


@pytest.mark.skipif(not _cache.SHARED, reason="this numba's cache internals are unknown: no shared cache")
def test_warm_fills_the_cache_a_fresh_first_update_then_compiles_nothing(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS="2")
    done = _warm(env, "--cpu-only")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel(s) compiled in" in done.stdout and str(tmp_path) in done.stdout, done.stdout
    assert "EMA, bfloat16 model, float32 shadow, parallel" in done.stdout
    first = subprocess.run([sys.executable, "-c", FIRST_UPDATE], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1]) == []
    again = _warm(env, "--cpu-only")
    assert again.returncode == 0 and "nothing to compile" in again.stdout, again.stdout + again.stderr[-3000:]


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_warm_where_the_kernels_cannot_be_cached_says_what_to_do_and_exits_1(tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)                                   # others can write it: not used (docs/install.md)
    done = _warm(dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_NUM_THREADS="1"), "--cpu-only")
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    err = done.stderr.strip().splitlines()[-1]
    assert "cannot be cached" in err and str(cache) in err and "NUMBA_CACHE_DIR" in err
    assert "run 'python -m fastema warm' again" in err


def test_warm_with_a_bad_argument_is_one_line_and_exits_2():
    done = _warm(dict(os.environ), "--cuda-please")
    assert done.returncode == 2 and "--help" in done.stderr and "Traceback" not in done.stderr
