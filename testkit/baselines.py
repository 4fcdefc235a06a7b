"""Baselines: what users run today, written out where the package cannot be installed here.

``TimmModelEmaV3Reference`` is timm 1.0.31's ``timm.utils.model_ema.ModelEmaV3`` reduced to
its round-to-nearest arithmetic (``stochastic_rounding`` touches bfloat16 EMA tensors only)
(timm itself needs torchvision, which does not import beside the CPU
torch build these machines use). The tests check fastema's compat class against it
bit for bit; the benchmarks time it.
"""
import copy

import torch


class TimmModelEmaV3Reference:
    """timm.utils.model_ema.ModelEmaV3 (timm 1.0), reduced to its arithmetic."""

    def __init__(self, model, decay, min_decay=0.0, update_after_step=0, use_warmup=False, warmup_gamma=1.0,
                 warmup_power=2 / 3, exclude_buffers=False, dtype=None):
        self.module = copy.deepcopy(model).eval()
        if dtype is not None:
            self.module.to(dtype=dtype)
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.exclude_buffers = exclude_buffers

    def get_decay(self, step=None):
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    @torch.no_grad()
    def update(self, model, step=None):
        decay = self.get_decay(step)
        if self.exclude_buffers:                # timm 1.0.31: average the parameters, copy every buffer
            pairs = zip(self.module.parameters(), model.parameters())
            for e, m in zip(self.module.buffers(), model.buffers()):
                e.copy_(m)
        else:
            pairs = zip(self.module.state_dict().values(), model.state_dict().values())
        ema_l, model_l = [], []
        for e, m in pairs:
            if e.is_floating_point():
                ema_l.append(e)
                model_l.append(m)
            else:
                e.copy_(m)
        if ema_l and any(e.dtype != m.dtype for e, m in zip(ema_l, model_l)):
            torch._foreach_mul_(ema_l, decay)                      # timm's mixed-dtype path
            torch._foreach_add_(ema_l, model_l, alpha=1.0 - decay)
            return
        torch._foreach_lerp_(ema_l, model_l, weight=1.0 - decay)



@torch.no_grad()
def timm_bfloat16_stochastic_update(ema_params, model_params, decay):
    """timm's bfloat16 shadow with stochastic rounding: concatenate to float32, lerp, add random
    low 16 bits, truncate, copy back into the bfloat16 tensors."""
    ema32 = torch.cat([e.float().reshape(-1) for e in ema_params])
    cur32 = torch.cat([m.float().reshape(-1) for m in model_params])
    ema32.lerp_(cur32, 1.0 - decay)
    bits = ema32.view(torch.int32)
    bits.add_(torch.randint_like(bits, 0, 1 << 16)).bitwise_and_(-65536)
    rounded = bits.view(torch.float32).bfloat16()               # exact: the low 16 bits are zero
    torch._foreach_copy_(ema_params, [c.view_as(e) for c, e in zip(rounded.split([e.numel() for e in ema_params]),
                                                                   ema_params)])


class TorchSmoother:
    """The smoother's baseline in float64 torch ops: the debiased EMA (non-finite values skipped) and
    an SMA ring with its valid counts (test_bench_smooth.py's and the gates' ratio)."""

    def __init__(self, decay, window, shape, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.d, self.window, self.i = decay, window, 0
        self.num, self.den = z(shape), z(shape)
        self.ring, self.valid = z(window, shape), z(window, shape)

    def update(self, v):
        v = v.double()
        ok = torch.isfinite(v)
        v0 = torch.where(ok, v, torch.zeros_like(v))
        self.num = torch.where(ok, self.d * self.num + v0, self.num)
        self.den = torch.where(ok, self.d * self.den + 1, self.den)
        self.ring[self.i % self.window] = v0
        self.valid[self.i % self.window] = ok.double()
        self.i += 1

    def read(self):
        return self.num / self.den, self.ring.sum(0) / self.valid.sum(0)
