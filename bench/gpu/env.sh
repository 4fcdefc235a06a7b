# Sourced by bench/gpu/run.sh at the start of every command (all, rest), from the repository root: the
# one environment each runs in. Each command may land on a fresh machine (a device machine goes back
# 30 s after a call), so each sets it up again; what a warm machine already has is kept
# (idempotent).
#
#   PY                 python3, or $PYTHON
#   exported           PYTHONUNBUFFERED=1, XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX in one xdist
#                      worker would take 75 % of the card), PYTHONPATH as below
#   numpy              numba-cuda 0.30 registers np.row_stack at its first compile, and numpy 2.5
#                      removed it (the device image has 2.5.2): every kernel compile fails. Where
#                      `numpy` lacks row_stack: a carried .whl/numpy-2.4.*.whl installed with pip
#                      --no-index --no-deps --target $GPU_SITE (/tmp/site), put first on PYTHONPATH;
#                      with nothing carried (or if that fails), a sitecustomize.py on PYTHONPATH
#                      doing numpy.row_stack = numpy.vstack. GPU_NUMPY_FIX says which.
#   fastema            pip install --no-deps --no-build-isolation --no-index -e . only where fastema
#                      does not import from this tree; if that fails, the tree on PYTHONPATH (and
#                      in later commands: $GPU_NO_EDITABLE marks it). GPU_FASTEMA_INSTALL: which,
#                      and setuptools' version (GPU_SETUPTOOLS; the editable build uses it: >= 77 needed).
#   GPU_SIMULATE=1     the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1) and nothing installed: the
#                      tree on PYTHONPATH, the numpy shim only where numpy lacks row_stack (CI).
#
# What pip printed goes to $GPU_SETUP_LOG (default /dev/null; run.sh: run.log); one line a step to
# stdout. The timeouts here count in every command's 480 s (bench/tests/test_gpu_plan.py adds them up).

GPU_ROOT=$(pwd -P)
PY=${PYTHON:-python3}
case "$PY" in /*) ;; */*) PY=$GPU_ROOT/$PY ;; esac      # a relative path still works after a cd
GPU_SITE=${GPU_SITE:-/tmp/site}
GPU_SHIM=${GPU_SHIM:-/tmp/fastema-numpy-shim}
GPU_SETUP_LOG=${GPU_SETUP_LOG:-/dev/null}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "${GPU_SIMULATE:-0}" = 1 ]; then
  export NUMBA_ENABLE_CUDASIM=1
fi

gpu_path_prepend() {   # DIR: first on PYTHONPATH, once
  case ":${PYTHONPATH:-}:" in
    *":$1:"*) ;;
    *) export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
}

gpu_write_numpy_shim() {   # DIR: a sitecustomize.py there giving numpy its row_stack back
  mkdir -p "$1"
  cat >"$1/sitecustomize.py" <<'SHIM'
# Written by fastema's bench/gpu/env.sh: numpy >= 2.5 removed row_stack, which numba-cuda 0.30
# registers (overload(np.row_stack)) at its first kernel compile. vstack is what row_stack was.
try:
    import numpy

    if "row_stack" not in vars(numpy):
        numpy.row_stack = numpy.vstack
except Exception:  # noqa: BLE001 - never stop Python from starting
    pass
SHIM
}

gpu_numpy_ok() {
  "$PY" -c 'import numpy, sys; sys.exit(0 if "row_stack" in vars(numpy) else 1)' 2>/dev/null
}

# ---- numpy
[ -d "$GPU_SITE/numpy" ] && gpu_path_prepend "$GPU_SITE"          # a warm machine: installed before
[ -f "$GPU_SHIM/sitecustomize.py" ] && gpu_path_prepend "$GPU_SHIM"
if gpu_numpy_ok; then
  GPU_NUMPY_FIX="none needed"
  [ -d "$GPU_SITE/numpy" ] && GPU_NUMPY_FIX="carried wheel in $GPU_SITE"
  [ -f "$GPU_SHIM/sitecustomize.py" ] && GPU_NUMPY_FIX="sitecustomize shim in $GPU_SHIM"
else
  GPU_NUMPY_FIX=""
  whl=$(ls .whl/numpy-2.4.*.whl 2>/dev/null | head -n 1)
  if [ -n "$whl" ] && [ "${GPU_SIMULATE:-0}" != 1 ]; then
    echo "gpu_env: numpy lacks row_stack: installing the carried $whl into $GPU_SITE"
    if timeout -k 5 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$GPU_SITE" "$whl" >>"$GPU_SETUP_LOG" 2>&1; then
      gpu_path_prepend "$GPU_SITE"
      gpu_numpy_ok && GPU_NUMPY_FIX="carried wheel $(basename "$whl") in $GPU_SITE"
    fi
  fi
  if [ -z "$GPU_NUMPY_FIX" ]; then
    echo "gpu_env: numpy lacks row_stack and no numpy 2.4 wheel was installed: the sitecustomize shim"
    gpu_write_numpy_shim "$GPU_SHIM"
    gpu_path_prepend "$GPU_SHIM"
    GPU_NUMPY_FIX="sitecustomize shim in $GPU_SHIM"
    gpu_numpy_ok || GPU_NUMPY_FIX="FAILED: numpy still lacks row_stack"
  fi
fi
export GPU_NUMPY_FIX
echo "gpu_env: numpy: $GPU_NUMPY_FIX"

# ---- fastema from this tree
gpu_fastema_here() {
  (cd / && "$PY" -c 'import os, sys, fastema
sys.exit(0 if os.path.realpath(fastema.__file__).startswith(sys.argv[1] + os.sep) else 1)' "$GPU_ROOT") 2>/dev/null
}
GPU_NO_EDITABLE=${GPU_NO_EDITABLE:-/tmp/fastema-gpu-no-editable}    # pip install -e failed once here
if gpu_fastema_here; then
  GPU_FASTEMA_INSTALL="already imports from $GPU_ROOT"
elif [ "${GPU_SIMULATE:-0}" = 1 ]; then
  gpu_path_prepend "$GPU_ROOT"
  GPU_FASTEMA_INSTALL="the tree on PYTHONPATH (simulate: nothing installed)"
elif [ -f "$GPU_NO_EDITABLE" ]; then
  gpu_path_prepend "$GPU_ROOT"
  GPU_FASTEMA_INSTALL="the tree on PYTHONPATH (pip install -e . failed in an earlier command)"
else
  echo "gpu_env: pip install -e . (no index, no dependencies, no build isolation)"
  if timeout -k 5 30 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      >>"$GPU_SETUP_LOG" 2>&1 && gpu_fastema_here; then
    GPU_FASTEMA_INSTALL="pip install -e . (editable)"
  else
    gpu_path_prepend "$GPU_ROOT"
    : >"$GPU_NO_EDITABLE"
    GPU_FASTEMA_INSTALL="pip install -e . failed (see setup.log): the tree on PYTHONPATH"
  fi
fi
# setuptools: pip install -e . above builds with the installed one (no build isolation), and pyproject.toml's
# PEP 639 license needs >= 77. Its version goes into GPU_FASTEMA_INSTALL, so env.txt's fastema_install has it.
GPU_SETUPTOOLS=$("$PY" -c 'import importlib.metadata as m; print(m.version("setuptools"))' 2>/dev/null) \
  || GPU_SETUPTOOLS="not installed"
GPU_FASTEMA_INSTALL="$GPU_FASTEMA_INSTALL; setuptools $GPU_SETUPTOOLS"
export GPU_FASTEMA_INSTALL GPU_SETUPTOOLS
echo "gpu_env: fastema: $GPU_FASTEMA_INSTALL"
