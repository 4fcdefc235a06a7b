"""pytest set-up for every test folder: hypothesis profiles, the Keras backend, fixtures; the ``slow``
mark and the files' order from the measured times (``durations.json``, see ``timings.py``); the
distributed tests' long-lived worlds ended with the session (``worlds.py``).

References and helpers are in ``reference.py``."""
import os
import signal
import sys

# Keras picks its backend when first imported, by whichever test module gets there first
# (TensorFlow may import it); the in-process Keras tests run on torch, others use subprocesses.
os.environ.setdefault("KERAS_BACKEND", "torch")
# The test processes share the cores (pytest-xdist's workers, CI's background jobs, spawned ranks,
# subprocesses): an OpenMP thread (torch's, numba's "omp" layer) that spins while it waits for a
# descheduled peer burns a core for nothing (a tiny fused AdamW step took 3-10 ms of CPU instead
# of 0.1-0.2 ms on a loaded 2-core machine). Passive waiting: the same threads and the same work,
# asleep between parallel regions. Read when OpenMP starts, so set before any test imports torch or
# numba; every process the tests start inherits it. A value the caller set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import timings
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _sb3_logs_in_tmp(tmp_path_factory):
    """Stable-Baselines3 learners make a new log folder under the system temp folder at each
    ``learn`` unless ``SB3_LOGDIR`` names one: keep them in pytest's own temp folder."""
    old = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3-logs"))
    yield
    if old is None:
        os.environ.pop("SB3_LOGDIR", None)
    else:
        os.environ["SB3_LOGDIR"] = old


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


_MEASURED = timings.load()
# cuda tests: the shipped device code, no compile; every test: the objects alive when its file starts
# frozen out of the collector's walk (support/frozen.py)
pytest_plugins = ["support.shipped", "support.frozen"]


def pytest_configure(config):
    """Ctrl-C as in a terminal: a run started in the background by a script (``cmd &`` without job
    control, ``nohup``) inherits SIGINT ignored, and Python then leaves it ignored: the tests of what a
    Ctrl-C does (and the processes they start, which inherit an ignored signal) would see none. In a
    pytest-xdist worker: the environment as in a plain pytest run, for the processes the tests start
    (xdist's PYTEST_XDIST_* variables make a child pytest believe it is an xdist worker: pytest-benchmark
    then disables its benchmarks, the GPU plan's benchmark suite among them)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(config, "workerinput"):
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
            os.environ.pop(name, None)


@pytest.hookimpl(tryfirst=True)          # before ``-m`` deselects: the marks below count
def pytest_collection_modifyitems(config, items):
    """``slow``: the tests measured over ~5 s on CI's 2 cores (``durations.json``; a test may carry the
    mark itself too). Under pytest-xdist (``-n``): the files longest first, each file's tests in their
    order, so that the last tests the workers run are short ones and the cores end together."""
    slow = set(_MEASURED.get("slow", ()))
    for item in items:
        if timings.key(item.nodeid) in slow:
            item.add_marker(pytest.mark.slow)
    if not hasattr(config, "workerinput"):
        return
    seconds = _MEASURED.get("files", {})
    files: dict = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = sorted(files, key=lambda f: -seconds.get(f, timings.SLOW_S))      # stable: ties keep their order
    items[:] = [item for f in order for item in files[f]]


def pytest_sessionfinish(session, exitstatus):
    worlds = sys.modules.get("worlds")          # the distributed tests' worlds, if any started
    if worlds is not None:
        worlds.close_all()
