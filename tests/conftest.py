"""pytest set-up for every test folder: hypothesis profiles, the Keras backend, fixtures.

References and helpers are in ``reference.py``."""
import os

# Keras picks its backend when first imported, by whichever test module gets there first
# (TensorFlow may import it); the in-process Keras tests run on torch, others use subprocesses.
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
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
