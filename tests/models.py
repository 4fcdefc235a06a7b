"""Tiny models and real training loops shared by the tests, per framework.

Each helper imports its framework when called, so a Keras subprocess on TensorFlow or JAX
(``bridges/test_keras.py``) can import this module without importing torch. A test that needs
another model states it where it is used: a changed model changes what a test checks.
"""
from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------- torch


def mlp(*widths: int, norm=None, act=None, dtype=None, seed: int = 0):
    """``Linear(widths[0], widths[1]), [norm], act, ..., Linear(widths[-2], widths[-1])``, built
    right after ``torch.manual_seed(seed)`` (so the same call gives the same weights).

    norm: a norm class (``nn.BatchNorm1d``, ``nn.LayerNorm``) after every hidden Linear, or a
    tuple with one class or None per hidden Linear. act: the activation class after each hidden
    layer (default ``nn.ReLU``). dtype: cast the model (``.to(dtype)``) when given."""
    import torch
    from torch import nn

    act = nn.ReLU if act is None else act
    hidden = len(widths) - 2
    norms = norm if isinstance(norm, tuple) else (norm,) * hidden
    assert len(norms) == hidden, (widths, norm)
    torch.manual_seed(seed)
    layers = []
    for i, n in enumerate(norms):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if n is not None:
            layers.append(n(widths[i + 1]))
        layers.append(act())
    layers.append(nn.Linear(widths[-2], widths[-1]))
    model = nn.Sequential(*layers)
    return model if dtype is None else model.to(dtype)


def cnn(seed: int = 0):
    """Conv2d(1, 4) on 8 x 8 images, BatchNorm2d, ReLU, then Linear to 3 classes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


def tied():
    """GPT-2-style tie: ``head.weight`` is ``emb.weight`` (one Parameter under two names)."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    return Tied()


def with_complex_buffer():
    """``lin`` (Linear(3, 3)) and a complex128 buffer ``z`` (a dtype safetensors cannot store)."""
    import torch
    from torch import nn

    class WithComplex(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("z", torch.full((3,), 1 + 2j, dtype=torch.complex128))

    return WithComplex()


def fsdp_mlp(*widths: int, seed: int = 0):
    """``mlp``-like Linear-ReLU stack (no norm), each Linear and the whole ``fully_shard``-ed (FSDP2):
    call inside a process group."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers: list = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    for layer in model[::2]:
        fully_shard(layer)
    fully_shard(model)
    return model


def moved(average, model, by=1.0):
    """Move every weight by ``by``, then ``average.update()``: with decay 0.5 the average of a
    freshly made EMA is then weight - by/2."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)
    average.update()


def batches(model, steps: int, seed: int = 1):
    """``steps`` batches for ``model``: 16 images (1 x 8 x 8) with 3-class labels for a model
    starting with a Conv2d, else 32 rows of 6 features with target ``sin(x[:, 0])``."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if isinstance(model[0], nn.Conv2d):
            x = torch.randn(16, 1, 8, 8, generator=g)
            yield x, torch.randint(0, 3, (16,), generator=g)
        else:
            x = torch.randn(32, 6, generator=g)
            yield x, x[:, :1].sin()


def train(model, steps: int, *averages, seed: int = 1, start: int = 0, record=None):
    """A real loop over ``batches(model, start + steps, seed)``, skipping the first ``start``:
    forward, loss (cross-entropy for a Conv2d model, else MSE), backward, SGD with momentum; then
    every average's ``update()`` and ``record(i)`` (i = 1, 2, ... steps). Returns the optimizer."""
    import torch
    from torch import nn

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss() if isinstance(model[0], nn.Conv2d) else nn.MSELoss()
    for i, (x, y) in enumerate(batches(model, start + steps, seed)):
        if i < start:
            continue
        dtype = next(model.parameters()).dtype
        x = x.to(dtype)
        y = y.to(dtype) if y.is_floating_point() else y
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for a in averages:
            a.update()
        if record is not None:
            record(i + 1 - start)
    return opt


def train_sampled(nets, steps: int, each=None, *, optimizer, seed: int = 1):
    """The same real loop on identical copies ``nets``: 32 rows sampled each step from 256 fixed
    ones (6 features, target ``sin(sum(x))``), MSE, backward, ``optimizer(params)`` per net, and
    ``each(i)`` (i = 1, 2, ... steps) after every step."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    y = x.sum(1, keepdim=True).sin()
    opts = [optimizer([p for p in n.parameters() if p.requires_grad]) for n in nets]
    for i in range(1, steps + 1):
        b = torch.randint(0, 256, (32,), generator=g)
        for n, o in zip(nets, opts):
            loss = nn.functional.mse_loss(n(x[b]), y[b])
            o.zero_grad()
            loss.backward()
            o.step()
        if each is not None:
            each(i)


# ---------------------------------------------------------------------------------------- Keras


def keras_model(batchnorm=False, optimizer="adam", metrics=("mae",)):
    """Dense(16, tanh) [BatchNorm] Dense(1) on 4 features, compiled with MSE and ``metrics``
    (none when empty); Adam(0.01) or SGD(0.05); seeded with ``keras.utils.set_random_seed(0)``."""
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,)), keras.layers.Dense(16, activation="tanh")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    opt = keras.optimizers.SGD(0.05) if optimizer == "sgd" else keras.optimizers.Adam(0.01)
    if metrics:
        model.compile(opt, "mse", metrics=list(metrics))
    else:
        model.compile(opt, "mse")
    return model


def keras_data(n=100, seed=0, noise=0.1):
    """``n`` rows of 4 normal features, target ``sin(x).sum(1)`` plus ``noise`` x normal noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = np.sin(x).sum(1, keepdims=True)
    if noise:
        y = y + noise * rng.normal(size=(n, 1))
    return x, y.astype("float32")


def keras_snapshot(model) -> list:
    """The trainable weights as float64 arrays (on JAX, the newest ones fit keeps in its state)."""
    state = getattr(model, "_jax_state", None)
    if state and not model._jax_state_synced and state.get("trainable_variables"):
        return [np.asarray(v, np.float64) for v in state["trainable_variables"]]
    return [np.asarray(v.numpy(), np.float64) for v in model.trainable_variables]


def keras_probe():
    """A callback recording the weights: ``initial``, after each step (``steps``), those the
    validation runs with (``validated``, once per epoch) and at each epoch's end (``epoch_end``)."""
    import keras

    class Probe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps, self.validated, self.epoch_end = [], [], []

        def on_train_begin(self, logs=None):
            self.initial = keras_snapshot(self.model)

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append(keras_snapshot(self.model))

        def on_test_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.validated.append(keras_snapshot(self.model))

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_end.append(keras_snapshot(self.model))

    return Probe()


def device_step_model():
    """The model of the device-plan tests: float32 and bfloat16 layers around a BatchNorm (seeded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4).to(torch.bfloat16))


def assert_same_averages(a, b, keys=("updates", "calls", "norms"), parts=("averaged",), equal_nan=False):
    """Two torch EMAs' states: the counters ``keys`` equal, the arrays of ``parts`` bit for bit."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    for k in keys:
        assert sa[k] == sb[k], k
    for part in parts:
        for name, t in sb.get(part, {}).items():
            torch.testing.assert_close(sa[part][name], t, rtol=0, atol=0, equal_nan=equal_nan, msg=f"{part} {name}")
