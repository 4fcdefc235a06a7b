"""A training step with and without the EMA update, on a GPT-2-size model (the headline figures of
``bench/gpu/headline.py``, issue 63).

:class:`GPT2`: GPT-2 small written out in torch (124M parameters in GPT-2's 148 tensors: token and
position embeddings, 12 blocks of two layer norms, attention's qkv and projection, the MLP's two
layers, a final norm, the head tied to the token embedding), so nothing is downloaded and no
package beyond torch is needed; in the simulator a tiny one on the CPU (plumbing only).

:func:`step_row`: one training step (forward, cross-entropy, backward, AdamW) of that model, in
float32 or bfloat16, three ways taken in turn round after round: the step alone, the step and
fastema's ``EMA.update()`` (a float32 shadow), the step and the baseline (``torch._foreach_lerp_``
of a float32 shadow for float32 weights; for bfloat16 weights timm's mixed update,
``_foreach_mul_`` + ``_foreach_add_`` into float32 copies), checked once against fastema's result
before the steps (``bench/suite/checked.py``). Per way: the step's time (a sync after
each step; the median over the rounds), the update's device time inside the step (CUDA events
around it) and its host time (None where the GPU had run the step's work before an update returned: the
host may have waited for it; ``update_host_waited`` such updates), each with its min and max. The
update's cost in a step is ``step + update - step alone``; the
ratio of the baseline's to fastema's is the end-to-end figure the ``gpu-summary`` line names
``step_gpt2_*_vs_foreach`` (> 1: fastema's update costs the step less).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from bench.gpu import common as G
from bench.suite.figures import spread

SIZES = {"gpu": dict(vocab=50257, ctx=1024, d=768, layers=12, heads=12, batch=4, seq=256),
         "sim": dict(vocab=64, ctx=16, d=8, layers=1, heads=2, batch=2, seq=8)}


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (a.view(b, t, self.heads, d // self.heads).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 (small by default): see the module docstring."""

    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int, **_):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()


def _updates(model, dtype) -> dict:
    """``name -> update()`` of fastema's EMA and the baseline (see the module docstring), the
    baseline checked against fastema's result once before it is timed (``bench.suite.checked``; the
    shadows are copies: ``p.detach().float()`` of a float32 parameter is the parameter itself)."""
    from bench.suite.checked import checked
    from fastema.torch import EMA

    params = list(model.parameters())
    ema = EMA(model, 0.999)
    shadows = [p.detach().to(torch.float32, copy=True) for p in params]
    if dtype == torch.float32:
        def baseline():
            torch._foreach_lerp_(shadows, params, 0.001)
        name = "torch._foreach_lerp_"
    else:
        def baseline():
            torch._foreach_mul_(shadows, 0.999)
            torch._foreach_add_(shadows, params, alpha=0.001)
        name = "torch._foreach_mul_+_foreach_add_"

    def moved():
        for p in params:
            p.add_(torch.randn_like(p), alpha=0.01)

    fns = {"fastema EMA.update": ema.update, name: baseline}
    with torch.no_grad():
        return checked(fns, {"fastema EMA.update": lambda: list(ema.averaged_state_dict().values()),
                             name: lambda: shadows}, ours="fastema EMA.update", inputs=params,
                       move=moved)


def step_row(dtype, rounds: int = 7, steps: int = 4) -> dict:
    """The figures of the three ways (see the module docstring) for a model of ``dtype``
    (torch.float32 or torch.bfloat16): ``{way: figures}``; ``rounds`` of ``steps`` steps each way
    (2 of 1 in the simulator)."""
    size = SIZES["sim" if G.SIM else "gpu"]
    if G.SIM:
        rounds, steps = 2, 1
    dev = G.torch_device()
    torch.manual_seed(0)
    model = GPT2(**size).to(dev, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=dev)
    y = torch.roll(x, -1, dims=1)
    ways = {"step alone": None, **_updates(model, dtype)}
    marks: dict = {name: [] for name in ways}

    def train(update, log):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).float().view(-1, size["vocab"]), y.view(-1))
        loss.backward()
        opt.step()
        if update is not None:
            with torch.no_grad():
                a, b = G.event(), G.event()
                a.record()
                t0 = time.perf_counter()
                update()
                host = time.perf_counter() - t0
                waited = a.query()                         # the step's work had run: the GPU caught up
                b.record()
                if log is not None:
                    log.append((a, b, host, waited))

    for update in ways.values():                           # warm: allocations, first launches
        for _ in range(1 if G.SIM else 2):
            train(update, None)
    G.sync()
    step_s: dict = {name: [] for name in ways}
    for _ in range(rounds):
        for name, update in ways.items():
            G.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                train(update, marks[name])
            G.sync()
            step_s[name].append((time.perf_counter() - t0) / steps)
    out: dict = {"params": sum(p.numel() for p in model.parameters()),
                 "tensors": len(list(model.parameters())), "rounds": rounds, "steps_a_round": steps}
    alone = statistics.median(step_s["step alone"])
    for name in ways:
        s = step_s[name]
        row = {"step_ms": statistics.median(s) * 1e3, "step_ms_min": min(s) * 1e3,
               "step_ms_max": max(s) * 1e3}
        if marks[name]:
            dev = spread([a.elapsed_time(b) * 1e-3 for a, b, _, _ in marks[name]])
            host = spread([h for _, _, h, _ in marks[name]])
            waited = sum(bool(w) for *_, w in marks[name])
            row.update(update_device_us=dev["median"], update_device_us_min=dev["min"],
                       update_device_us_max=dev["max"], update_host_waited=waited,
                       update_host_us=None if waited else host["median"],
                       update_host_us_min=None if waited else host["min"],
                       update_host_us_max=None if waited else host["max"],
                       update_in_step_us=(statistics.median(s) - alone) * 1e6)
        out[name] = row
    return out
