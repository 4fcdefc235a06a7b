"""The weight styles of fastema.merge: closed forms, hypothesis properties (sum to 1, monotone
where they should be, reverse, scramble), Megatron-LM's weights reproduced from its source, and
one real run beside Megatron's and fairseq's merges of a small torch model."""
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastema.merge import merge_checkpoints, merge_weights

# ---------------------------------------------------------------- Megatron-LM, reimplemented from its source
# NVIDIA/Megatron-LM tools/checkpoint/weighted_merge.py (PR 5114; read at commit 30e10fd6b1):
# _schedule_linear_decay(x) = 1 - x, _schedule_minus_sqrt_decay(x) = 1 - sqrt(x),
# _schedule_to_merge_coefficients (n <= 1: [1.0] * n; decay_i = f(i / n); c[-1] = decay[-1];
# c[i] = decay[i] - decay[i + 1] for 0 < i < n - 1; c[0] = 1 - sum(c)), _apply_modifier ("reverse":
# reversed, "scramble": random.Random(seed).shuffle), --coefficient-seed default 0.


def megatron(style: str, n: int, seed: int = 0) -> list:
    base, _, modifier = style.partition("__")
    f = {"linear": lambda x: 1 - x, "minus-sqrt": lambda x: 1 - math.sqrt(x)}[base]
    if n <= 1:
        c = [1.0] * n
    else:
        decay = [f(i / n) for i in range(n)]
        c = [0.0 for _ in range(n)]
        c[-1] = decay[-1]
        for i in range(1, n - 1):
            c[i] = decay[i] - decay[i + 1]
        c[0] = 1 - sum(c)
    if modifier == "reverse":
        c = list(reversed(c))
    elif modifier == "scramble":
        c = list(c)
        random.Random(seed).shuffle(c)
    return c


MEGATRON = ["linear", "minus-sqrt", "linear__reverse", "minus-sqrt__reverse", "linear__scramble",
            "minus-sqrt__scramble"]


@given(n=st.integers(1, 200), style=st.sampled_from(MEGATRON), seed=st.integers(0, 2**31))
def test_megatron_styles_are_megatrons_weights(n, style, seed):
    got = merge_weights(style, n, seed=seed)
    assert got.raw == tuple(megatron(style, n, seed))         # exactly, before normalising
    assert np.allclose(got.values, megatron(style, n, seed), rtol=0, atol=1e-15)


@given(n=st.integers(2, 200))
def test_minus_sqrt_decreases_reverse_reverses_linear_is_uniform(n):
    w = merge_weights("minus-sqrt", n).values
    assert all(a >= b for a, b in zip(w, w[1:]))
    assert merge_weights("minus-sqrt__reverse", n).values == w[::-1]
    assert np.allclose(merge_weights("linear", n).values, 1 / n)
    assert sorted(merge_weights("minus-sqrt__scramble", n, seed=5).values) == sorted(w)


STYLES = ["uniform", "linear", "minus-sqrt", "minus-sqrt__reverse", "ema:0.9", "ema:37", "wsm:linear", "wsm:cosine",
          "wsm:1-sqrt"]


@given(style=st.sampled_from(STYLES), gaps=st.lists(st.integers(1, 500), min_size=0, max_size=40))
def test_every_style_sums_to_one_and_is_not_negative(style, gaps):
    steps = np.cumsum([100] + gaps).tolist()
    w = merge_weights(style, len(steps), steps=steps).values
    assert abs(math.fsum(w) - 1) < 1e-12 and min(w) >= -1e-15


@given(n=st.integers(2, 60), decay=st.floats(0.5, 0.999), gap=st.integers(1, 50))
def test_ema_weights_are_an_ema_of_the_checkpoints_and_grow_with_recency(n, decay, gap):
    steps = [gap * (i + 1) for i in range(n)]
    w = merge_weights(f"ema:{decay}", n, steps=steps).values
    coef = np.zeros(n)                                      # run the EMA on unit vectors
    coef[0] = 1
    for i in range(1, n):
        d = decay ** gap
        coef *= d
        coef[i] += 1 - d
    assert np.allclose(w, coef, rtol=1e-10, atol=1e-14)
    assert all(a <= b * (1 + 1e-12) for a, b in zip(w[1:], w[2:]))


def test_ema_half_life_and_uneven_steps():
    w = merge_weights("ema:100", 3, steps=[0, 100, 300]).values
    assert np.allclose(w, [0.5 * 0.25, 0.5 * 0.25, 0.75])         # 2**-(200/100) = 1/4 of the middle one


def test_wsm_weights_emulate_their_decay():
    # equal intervals, linear decay: the trapezoid rule (half weights at the ends)
    assert np.allclose(merge_weights("wsm:linear", 5).values, [0.125, 0.25, 0.25, 0.25, 0.125])
    # the decay the merge applies to the gradient between checkpoints i-1 and i is sum_{j >= i} c_j (WSM's
    # theorem): the decay's mean over that interval, integrated numerically here
    n = 41
    for decay, f in (("cosine", lambda x: (1 + np.cos(np.pi * x)) / 2), ("1-sqrt", lambda x: 1 - np.sqrt(x)),
                     ("linear", lambda x: 1 - x)):
        c = np.array(merge_weights(f"wsm:{decay}", n).values)
        applied = np.cumsum(c[::-1])[::-1][1:]
        means = [np.mean(f(np.linspace(i / (n - 1), (i + 1) / (n - 1), 200001))) for i in range(n - 1)]
        assert np.allclose(applied, means, atol=1e-5), decay
    # uneven steps: positions follow the steps
    uneven = merge_weights("wsm:linear", 3, steps=[0, 100, 400]).values
    assert uneven[1] > uneven[0] and np.isclose(sum(uneven), 1)


def test_explicit_lists_are_normalised():
    assert merge_weights("1,1,2", 3).values == (0.25, 0.25, 0.5)
    assert merge_weights([2, 6], 2).values == (0.25, 0.75)


def _train(tmp_path, n_ckpt=4):
    """A small MLP trained with a constant learning rate, checkpointed every 10 steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(256, 8)
    y = x.sum(1, keepdim=True)
    paths = []
    for step in range(1, 10 * n_ckpt + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            paths.append(tmp_path / f"checkpoint_{step}.pt")
            torch.save({"model": model.state_dict(), "optimizer_history": [{"num_updates": step}]}, paths[-1])
    return paths


def test_a_real_run_beside_megatron_and_fairseq(tmp_path):
    from safetensors.torch import load_file

    paths = _train(tmp_path)
    states = [torch.load(p, weights_only=True)["model"] for p in paths]
    # Megatron-LM: fp32 accumulators on the CPU, accumulator.add_(tensor.float(), alpha=weight), then the dtype
    coefficients = megatron("minus-sqrt", len(paths))
    merge_checkpoints(paths, tmp_path / "minus-sqrt.safetensors", weights="minus-sqrt")
    ours = load_file(tmp_path / "minus-sqrt.safetensors")
    for name in states[0]:
        acc = torch.zeros_like(states[0][name], dtype=torch.float32)
        for s, c in zip(states, coefficients):
            acc.add_(s[name].float(), alpha=c)
        assert torch.allclose(ours[name], acc, rtol=4e-7, atol=1e-7), name
    # fairseq scripts/average_checkpoints.py: the first state cloned, the others added, divided by their number
    merge_checkpoints(paths, tmp_path / "uniform.safetensors")
    ours = load_file(tmp_path / "uniform.safetensors")
    params = {}
    for s in states:
        for k, p in s.items():
            params[k] = p.clone() if k not in params else params[k] + p
    for k, v in params.items():
        assert torch.allclose(ours[k], v / len(states), rtol=4e-7, atol=1e-7), k
    assert set(ours) == set(params)


@pytest.mark.parametrize("style", ["ema:0", "ema:1", "ema:x", "wsm:step", "linear__twice", "1,,2"])
def test_malformed_styles_say_what_they_take(style):
    with pytest.raises(ValueError, match="weights"):
        merge_weights(style, 3, steps=[1, 2, 3])
