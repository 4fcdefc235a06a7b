"""The array functions' kept paths refuse what the full call refuses (no decays, a rounding that is no
string), and ema_update_many_ refuses a shadow that is another pair's source."""
import pytest
import torch

import fastema


def test_no_decays_after_a_kept_call_is_the_full_calls_error():
    # ema_update_multi_(s, x, []) after ema_update_(s, x, d) found ema_update_'s kept launch (the same
    # key) and handed numba no weights: a TypingError after a compile, where a fresh pair's is a ValueError
    # (that no decays make no averages, tests/array/test_ops_arguments.py)
    s, x = torch.zeros(16), torch.ones(16)
    fastema.ema_update_(s, x, 0.3)
    before = s.clone()
    with pytest.raises(ValueError, match=r"ema_update_multi_ needs 1 to 8 averages"):
        fastema.ema_update_multi_(s, x, [])
    assert torch.equal(s, before)


@pytest.mark.parametrize("rounding", [["nearest"], {"mode": "nearest"}])
def test_a_rounding_that_is_no_string_is_the_full_calls_error(rounding):
    s, x = torch.zeros(16), torch.ones(16)
    for _ in range(2):                                    # fresh, then kept
        with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
            fastema.ema_update_(s, x, 0.3, rounding=rounding)
        fastema.ema_update_(s, x, 0.3)


def test_ema_update_many_refuses_a_shadow_that_is_another_pairs_source():
    # shadows [A, B], sources [B, C]: B is written while A's update reads it; the parallel CPU kernel
    # averaged A with B's old values, its new ones or a mix, from run to run
    a, b, c = torch.zeros(4096), torch.ones(4096), torch.full((4096,), 2.0)
    kept = [t.clone() for t in (a, b, c)]
    with pytest.raises(ValueError, match=r"shadows\[1\] shares memory with sources\[0\], another pair's source"):
        fastema.ema_update_many_([a, b], [b, c], 0.9)
    with pytest.raises(ValueError, match="another pair's source"):
        fastema.ema_update_many_([a[:2048], b[:2048]], [b[1024:3072], c[:2048]], 0.9)   # a part of it
    assert all(torch.equal(t, k) for t, k in zip((a, b, c), kept))
    fastema.ema_update_many_([a, b], [c, c], 0.9)         # one source read by two: fine
    assert torch.allclose(a, torch.full_like(a, 0.2)) and torch.allclose(b, torch.full_like(b, 1.1))
