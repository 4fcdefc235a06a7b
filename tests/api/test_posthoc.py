"""Post-hoc EMA (issue #16), first part: the power-function profile's width <-> exponent
(Karras et al. 2024, EDM2, Eqs. 123 and 126), against the closed form and the paper's values."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fastema.schedules import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma


def _profile_std(gamma: float) -> float:
    """The standard deviation of p(tau) = (gamma+1) tau^gamma on [0, 1], by its moments (float64)."""
    m1 = (gamma + 1) / (gamma + 2)
    m2 = (gamma + 1) / (gamma + 3)
    return math.sqrt(m2 - m1 * m1)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94), (0.15, 3.56), (0.20, 1.83)])
def test_edm2_values(sigma_rel, gamma):
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=5e-3)


@given(st.floats(min_value=1e-3, max_value=1e4))
def test_width_is_the_profiles_standard_deviation_and_the_inverse_round_trips(gamma):
    s = gamma_to_sigma_rel(gamma)
    assert s == pytest.approx(_profile_std(gamma), rel=1e-9)
    assert sigma_rel_to_gamma(s) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_the_width_narrows_as_gamma_grows_and_tends_to_sqrt_one_twelfth():
    gammas = np.geomspace(1e-6, 1e3, 50)
    widths = [gamma_to_sigma_rel(float(g)) for g in gammas]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert widths[0] == pytest.approx(SIGMA_REL_MAX, rel=1e-5)


@pytest.mark.parametrize("bad", [0, -0.1, SIGMA_REL_MAX, 0.3, float("nan"), True, "0.1"])
def test_out_of_range_widths_are_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel must be a number in"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), None])
def test_bad_exponents_are_refused(bad):
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        gamma_to_sigma_rel(bad)
