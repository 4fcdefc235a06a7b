"""What the torchtitan tests share: a small model with a trainable part, a frozen part and buffers, the
config with every field set, a deterministic training step, an ulp distance. No torchtitan import (the
CUDA test file that uses it is collected by the simulator's run too)."""
import torch
from torch import nn

FIELDS = dict(decays=[0.9, 0.75], half_life_fractions=[0.05, 0.5], start_step=3, step_bias=2,
              update_every_n_steps=2, buffer_patterns=[r"running_mean$"])


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 6).to(dtype)
        self.norm = nn.LayerNorm(6).to(dtype)
        self.frozen = nn.Linear(6, 2).to(dtype).requires_grad_(False)
        self.register_buffer("running_mean", torch.zeros(6, dtype=dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def _train_step(models, step):
    """The same deterministic change of every trainable tensor and the matched buffer of each model."""
    with torch.no_grad():
        for m in models:
            trainable = [p for p in m.parameters() if p.requires_grad]
            for i, p in enumerate(trainable):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 31 + i)).to(p.dtype))
            m.running_mean.add_(torch.rand(6, generator=torch.Generator().manual_seed(step)).to(m.running_mean.dtype))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units of the last place between ``a`` and ``b`` (same float dtype)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    ia = torch.where(ia < 0, -(ia & (2 ** (8 * a.element_size() - 1) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & (2 ** (8 * a.element_size() - 1) - 1)), ib)
    return int((ia - ib).abs().max())
