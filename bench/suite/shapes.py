"""Parameter shapes of the benchmark scenarios."""
import os

#: The "many small tensors" scenario: 3000 tensors of 4096, a tenth of them in quick mode (CI: its rows are
#: printed, never judged; the full suite and the GPU plan time 3000), named as what it holds.
MANY = 300 if os.environ.get("FASTEMA_BENCH_QUICK") == "1" else 3000
MANY_NAME = f"{MANY}x4096"


def gpt2_small():
    """The 148 parameter tensors of GPT-2 small (124M parameters)."""
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def many_small(count=None, numel=4096):
    return [(numel,)] * (MANY if count is None else count)


#: RL target-network scenarios: hidden 256x256 layers (weight + bias each) plus a 256 -> 1 head.
RL_TAU = 0.005
RL_SCENARIOS = {"mlp 6 tensors": 2, "mlp 30 tensors": 14}


def rl_networks(layers: int):
    """An online MLP and its target (a deep copy), seeded: the target-network benchmarks' models."""
    import copy

    import torch
    from torch import nn

    torch.manual_seed(0)
    mods = [m for _ in range(layers) for m in (nn.Linear(256, 256), nn.ReLU())] + [nn.Linear(256, 1)]
    online = nn.Sequential(*mods)
    return online, copy.deepcopy(online)
