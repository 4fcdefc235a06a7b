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


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
