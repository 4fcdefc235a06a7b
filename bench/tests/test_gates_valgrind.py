"""The valgrind process's environment (bench/gates/instructions.py): what torch's Inductor does inside it."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gates import instructions


@pytest.mark.parametrize("flags, march", [({"avx2", "fma", "bmi2", "avx512f"}, "x86-64-v3"),
                                          ({"sse4_2", "avx"}, None)])
def test_inductor_in_the_valgrind_process_keeps_a_cache_of_its_own_and_builds_what_valgrind_decodes(
        tmp_path, flags, march):
    """Its loops are written for the CPU valgrind shows (no AVX-512); a shared cache handed them to
    ordinary processes, which built them for AVX-512 and wrote past every tensor (2026-11-28, a Zen 5
    EPYC), and gcc's -march=native built instructions valgrind cannot decode. torch reads the two
    variables as this environment sets them."""
    env = instructions.compiler_env(str(tmp_path), flags)
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent == tmp_path
    if platform.machine() not in ("x86_64", "AMD64"):
        march = None
    assert env.get("TORCHINDUCTOR_CPP_MARCH") == march
    code = ("import torch._inductor.runtime.cache_dir_utils as c, torch._inductor.cpp_builder as b; "
            "print(c.cache_dir()); print(b._get_cpu_arch_cflags('g++'))")
    done = subprocess.run([sys.executable, "-c", code], env=instructions.child_env(**env),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cache, cflags = done.stdout.split("\n")[:2]
    assert cache == env["TORCHINDUCTOR_CACHE_DIR"]
    assert cflags == (f"['march={march}']" if march else "['march=native']")
