"""Arguments every array-level update checks, whatever it is given to write: a device weight in
memory the update writes (read while written), and the arguments of a call with nothing to write."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastema

SHARED = "weight shares memory with the shadow"


@pytest.mark.parametrize("make", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_ema_update_many_refuses_a_weight_inside_any_shadow_and_writes_nothing(make):
    """ema_update_many_ read a device weight that is part of a shadow while the kernel wrote it: the
    shadows came back 0.75 and 0.875 where 0.75 is right (the weight read before and after its own
    update to 0.75)."""
    shadows = [make(np.full(1 << 15, 0.5, np.float32)) for _ in range(3)]
    sources = [make(np.ones(1 << 15, np.float32)) for _ in range(3)]
    for w in (shadows[0][:1], shadows[1][100:101], shadows[2][-1:]):
        with pytest.raises(ValueError, match=SHARED):
            fastema.ema_update_many_(shadows, sources, weight=w)
    assert all((np.asarray(s) == 0.5).all() for s in shadows)
    fastema.ema_update_many_(shadows, sources, weight=sources[1][:1] * 0.5)     # a source's copy: taken
    assert all((np.asarray(s) == 0.75).all() for s in shadows)
    fastema.ema_update_many_(shadows, sources, weight=sources[0][:1] - 0.5)     # memory no pair writes
    assert all((np.asarray(s) == 0.875).all() for s in shadows)


def test_ema_update_many_takes_a_weight_in_a_source_it_only_reads():
    """Read by the update and read as the weight: nothing is written there, so it is taken (the
    bisection of the shadows' spans finds no shadow around it)."""
    shadows = [torch.zeros(8), torch.zeros(4)]
    weights_then_values = torch.tensor([0.25, 1.0, 1.0, 1.0])
    fastema.ema_update_many_(shadows, [torch.ones(8), weights_then_values], weight=weights_then_values[:1])
    assert torch.equal(shadows[0], torch.full((8,), 0.25))
    assert torch.equal(shadows[1], torch.lerp(torch.zeros(4), weights_then_values, 0.25))


def test_flat_shadow_refuses_a_weight_in_its_own_buffer():
    """FlatShadow.update(weight=) took a view of the shadow's own buffer, read while written (0.75
    and 0.875 where 0.75 is right)."""
    fs = fastema.FlatShadow([np.full(1 << 15, 1.0, np.float32)])
    fs.view(0)[...] = 0.5
    with pytest.raises(ValueError, match=SHARED):
        fs.update(weight=fs.view(0)[:1])
    assert (fs.view(0) == 0.5).all()
    fs.update(weight=np.array([0.5], np.float32))
    assert (fs.view(0) == 0.75).all()


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, TypeError, "exactly one of decay= and weight="),
    ({"decay": 5.0}, ValueError, r"decay must be in \[0, 1\]"),
    ({"weight": [0.1, 0.2]}, ValueError, "expected 1 decay value"),
    ({"decay": 0.9, "rounding": "bogus"}, ValueError, "rounding must be 'nearest' or 'stochastic'"),
    ({"weight": torch.tensor([0.1], dtype=torch.float64)}, ValueError, r"1 element\(s\) of float32, got 1 of float64"),
    ({"weight": torch.tensor([0.1, 0.2])}, ValueError, r"1 element\(s\) of float32, got 2 of float32"),
    ({"weight": "abc"}, TypeError, "weight must be a NumPy array"),
])
def test_ema_update_many_with_no_pairs_checks_its_arguments(kwargs, error, match):
    """With no pairs the checks ran per group, so none ran: ema_update_many_([], [], rounding="bogus")
    returned, where the same call with a pair raises."""
    with pytest.raises(error, match=match):
        fastema.ema_update_many_([], [], **kwargs)
    with pytest.raises(error, match=match):
        fastema.ema_update_many_([torch.zeros(2, dtype=torch.bfloat16)], [torch.ones(2)], **kwargs)


def test_ema_update_many_with_no_pairs_and_good_arguments_does_nothing():
    fastema.ema_update_many_([], [], 0.9)
    fastema.ema_update_many_([], [], weight=torch.tensor([0.1]))
    fastema.ema_update_many_([], [], 0.9, rounding="stochastic", seed=3, step=7)
    with pytest.raises(ValueError, match="seed and step must be integers"):       # (checked before too)
        fastema.ema_update_many_([], [], 0.9, rounding="stochastic", seed=-1)


@pytest.mark.parametrize("kwargs", [{"decays": []}, {"weights": []}, {}])
def test_ema_update_multi_of_no_rows_names_what_it_needs(kwargs):
    """A (0, 5) shadow (or no decays) read as ema_update_'s one average: the error said the shadow
    must have shape (5,), which is ema_update_'s, not this function's."""
    shadow, src = np.zeros((0, 5), np.float32), np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"ema_update_multi_ needs 1 to 8 averages .* got none"):
        fastema.ema_update_multi_(shadow, src, **kwargs)


def test_a_jax_weight_or_flag_is_refused_saying_what_to_pass_and_writes_nothing():
    """weight= a float32 JAX array on the CPU was refused with "weight must be a NumPy array or a tensor of
    float32 on cpu, got ArrayImpl", which it was: the message names the JAX array and what to pass."""
    jnp = pytest.importorskip("jax.numpy")
    shadow, source = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match=r"weight must be .*got a JAX array \(.*ArrayImpl\), which is not read here: "
                                        r"pass np\.asarray\(weight\), a host copy"):
        fastema.ema_update_(shadow, source, weight=jnp.asarray([0.25], jnp.float32))
    with pytest.raises(TypeError, match=r"flag must be .*got a JAX array .*not written in place here: pass a NumPy"):
        fastema.flag_nonfinite_(jnp.zeros(1, jnp.int32), source)
    assert (shadow == 0).all()
    fastema.ema_update_(shadow, source, weight=np.asarray(jnp.asarray([0.25], jnp.float32)))
    np.testing.assert_array_equal(shadow, np.float32(0.25))
