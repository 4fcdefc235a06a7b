"""``python -m fastema warm`` (issue 54 item 4, issue 64 W1): fills the CPU kernel cache so that a fresh
process's first uses of a model average (update, swap in and back, copy_to) compile nothing; run again,
it compiles nothing; where the kernels cannot be cached it says why and what to do, and exits 1."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
from compile_count import COUNT_COMPILES

from fastema.__main__ import _help
from fastema.kernels import _cache

# A fresh process's first uses of a bfloat16 model's averages (float32, bfloat16, bfloat16 with stochastic
# rounding), on a model large enough for the parallel kernels and on a small one (the serial kernels): an
# update, a swap in and back, a copy_to; prints the fastema kernels numba compiled, by use (its compile
# event fires only where nothing was loaded from the cache).
FIRST_USES = COUNT_COMPILES + r"""
import json
import torch
from torch import nn
from fastema.torch import EMA
big = nn.Sequential(nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.Linear(512, 64)).to(torch.bfloat16)
small = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).to(torch.bfloat16)
seen = {}
for size, model in (("big", big), ("small", small)):
    for options in ({}, {"shadow_dtype": "bfloat16"}, {"shadow_dtype": "bfloat16", "rounding": "stochastic"}):
        ema = EMA(model, **options)
        for use, run in (("update", ema.update), ("swap", ema.swap), ("swap back", ema.swap),
                         ("copy_to", ema.copy_to)):
            before = len(compiled)
            run()
            if len(compiled) > before:
                seen[f"{size} {options} {use}"] = compiled[before:]
print(json.dumps(seen))
"""


def _warm(env, *args):
    return subprocess.run([sys.executable, "-m", "fastema", "warm", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_warm_is_a_command():
    assert "warm" in _help()


@pytest.mark.skipif(not _cache.SHARED, reason="this numba's cache internals are unknown: no shared cache")
def test_warm_fills_the_cache_a_fresh_first_update_and_swap_then_compile_nothing(tmp_path):
    """The bfloat16 model's averages only (``--dtypes bfloat16``: what CI can afford; the other dtypes'
    first uses are the same calls, :func:`test_warm_makes_the_first_uses_of_every_dtype_pair`). Before
    issue 64, warm swapped a float32 model only: this child's first swap compiled 6 swap kernels."""
    pytest.importorskip("torch")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS="2")
    done = _warm(env, "--cpu-only", "--dtypes", "bfloat16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel(s) compiled in" in done.stdout and str(tmp_path) in done.stdout, done.stdout
    assert "bfloat16 only" in done.stdout and "float32 model" not in done.stdout, done.stdout
    assert "EMA, bfloat16 model, float32 average, parallel" in done.stdout
    first = subprocess.run([sys.executable, "-c", FIRST_USES], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1]) == {}
    again = _warm(env, "--cpu-only", "--dtypes", "bfloat16")
    assert again.returncode == 0 and "nothing to compile" in again.stdout, again.stdout + again.stderr[-3000:]


def test_warm_makes_the_first_uses_of_every_dtype_pair():
    """Every supported model / average dtype pair's first update, swap in and back and copy_to, and
    ``--dtypes`` keeps the chosen model dtypes' (no compile: the list and the calls it makes)."""
    from fastema.cli import warm

    pairs = {(d, o.get("shadow_dtype", "float64" if d == "float64" else "float32"), o.get("rounding", "nearest"))
             for d, o in warm.AVERAGES}
    assert pairs == {("float32", "float32", "nearest"), ("bfloat16", "float32", "nearest"),
                     ("float16", "float32", "nearest"), ("bfloat16", "bfloat16", "nearest"),
                     ("bfloat16", "bfloat16", "stochastic"), ("float32", "bfloat16", "nearest"),
                     ("float32", "bfloat16", "stochastic"), ("float64", "float64", "nearest")}

    calls: list = []

    class Recorded:                                   # fastema.torch.EMA's calls, recorded
        def __init__(self, model, **options):
            calls.append(("EMA", model, options))

        def update(self):
            calls.append("update")

        @contextlib.contextmanager
        def average_parameters(self):
            calls.append("swap in")
            yield
            calls.append("swap back")

        def copy_to(self):
            calls.append("copy_to")

    warm._first_uses("model", Recorded, {"shadow_dtype": "bfloat16"})
    assert calls == [("EMA", "model", {"shadow_dtype": "bfloat16"}), "update", "swap in", "swap back",
                     "copy_to"]
    names = [name for name, _ in warm._updates(print, ("bfloat16",))]
    assert names == [warm._average_name(d, o) for d, o in warm.AVERAGES if d == "bfloat16"]
    names = [name for name, _ in warm._updates(print)]
    assert len(names) == len(list(warm._numpy_updates())) + len(warm.AVERAGES) + 4
    assert "EMA, float32 model, plan on the device" in names          # device_step=True's kernels


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


def test_warm_with_an_unknown_dtype_names_the_known_ones_and_exits_2(capsys):
    from fastema.cli import warm

    for bad in ("bfloat16,int8", ","):
        assert warm.main(["--dtypes", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "float32, bfloat16, float16, float64" in err, err


@pytest.mark.parametrize("args, says", [
    (["--cpu-only", "--set", "cu12", "--arch", "sm_90"], "--set and --arch go with --into DIR"),
    (["--jobs", "4"], "--jobs go with --into DIR"),
    (["--into", "{dir}", "--set", "cu12", "--dtypes", "float32"], "--dtypes warm this machine's caches"),
    (["--into", "{dir}", "--set", "cu12", "--cpu-only"], "--cpu-only warm this machine's caches"),
    (["--into", "{dir}", "--set", "cu12", "--jobs", "-5"], "--jobs: must be an int >= 1, got '-5'"),
])
def test_warm_options_of_the_other_mode_are_a_usage_error_before_anything_runs(capsys, tmp_path, args, says):
    # taken and ignored: --set/--arch/--jobs without --into warmed the caches (exit 0), --jobs -5 was taken
    from fastema.cli import warm

    assert warm.main([a.format(dir=tmp_path / "store") for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "store").exists()


def test_warm_reads_only_a_missing_numba_cuda_as_no_gpu(monkeypatch):
    """numba-cuda missing: no GPU to compile for (exit 0). A failure of its own (here a TypeError
    from ``cuda.is_available``) is raised, never read as "no GPU visible" (issue 72, item 5: the
    broad catch turned any error into a warm that compiled nothing and said all was well)."""
    import numba
    from numba import cuda

    from fastema.cli.warm import _warm_cuda

    said: list = []
    monkeypatch.setattr(cuda, "is_available", lambda: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        _warm_cuda(said.append)
    monkeypatch.delattr(numba, "cuda")
    monkeypatch.setitem(sys.modules, "numba.cuda", None)           # import numba.cuda fails
    assert _warm_cuda(said.append) == 0
    assert said == ["CUDA: no GPU visible, nothing to compile"]
