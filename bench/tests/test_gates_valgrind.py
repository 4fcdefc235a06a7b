"""The valgrind process's environment (bench/gates/instructions.py): what torch's Inductor does
inside it."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gates import instructions

X86 = platform.machine() in ("x86_64", "AMD64")
V3 = set(instructions.X86_64_V3)


@pytest.mark.skipif(not X86, reason="x86-64's levels (elsewhere only the cache is set)")
@pytest.mark.parametrize("flags, takes, march", [
    (V3 | {"avx512f"}, True, "x86-64-v3"),                 # an AVX-512 CPU: never native
    (V3, False, "x86-64"),                                 # gcc 9 or 10: no -march=x86-64-v3
    (V3 - {"movbe"}, True, "x86-64"),                      # a VM hiding one of the level's features
    ({"sse4_2", "avx"}, True, "x86-64")])
def test_inductor_in_the_valgrind_process_keeps_a_cache_of_its_own_and_builds_what_valgrind_decodes(
        tmp_path, flags, takes, march):
    """Its loops are written for the CPU valgrind shows (no AVX-512); a shared cache handed them
    to ordinary processes, which built them for AVX-512 and wrote past every tensor (2026-11-28,
    a Zen 5 EPYC), and gcc's -march=native built instructions valgrind cannot decode. torch
    reads the two variables as this environment sets them."""
    asked: list = []
    env = instructions.compiler_env(str(tmp_path), flags, lambda m: asked.append(m) or takes)
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent == tmp_path
    assert env["TORCHINDUCTOR_CPP_MARCH"] == march
    assert asked == (["x86-64-v3"] if V3 <= flags else [])
    code = ("import torch._inductor.runtime.cache_dir_utils as c, "
            "torch._inductor.cpp_builder as b; "
            "print(c.cache_dir()); print(b._get_cpu_arch_cflags('g++'))")
    done = subprocess.run([sys.executable, "-c", code], env=instructions.child_env(**env),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cache, cflags = done.stdout.split("\n")[:2]
    assert cache == env["TORCHINDUCTOR_CACHE_DIR"] and cflags == f"['march={march}']"


def test_the_valgrind_process_is_started_with_that_environment(tmp_path):
    env = instructions.valgrind_env("client.so", str(tmp_path))
    assert env["GATES_CLIENT"] == "client.so" and env["FASTEMA_NUM_THREADS"] == "1"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert ("TORCHINDUCTOR_CPP_MARCH" in env) == X86


@pytest.mark.skipif(not X86, reason="x86-64's levels")
def test_the_compiler_is_asked_whether_it_knows_the_level():
    assert instructions.march_taken("x86-64")
    assert not instructions.march_taken("no-such-cpu-level")
