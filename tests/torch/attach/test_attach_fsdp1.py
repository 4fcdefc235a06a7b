"""``ema.attach(optimizer)`` under FSDP1 (``FullyShardedDataParallel``, 2 gloo ranks of the
shared world, ``use_orig_params`` True and False): fastema cannot average FSDP1's flat-parameter
pieces (``EMA(FSDP1(model))`` is refused when it is made), so an average made before its model
was wrapped is refused by name at ``attach()``, with nothing hooked, and not at the first step
(where the optimizer would have stepped and the average not); so is an average attached to an
optimizer that steps FSDP1 parameters beside the ones it averages."""
import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs gloo")


def _text(err):
    return torch.tensor(list(str(err).encode()))


def _fsdp1(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from fastema.torch import EMA

    out = {}
    for orig in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).to(torch.bfloat16)
        wrapped = FSDP(nn.Sequential(nn.Linear(8, 5)), use_orig_params=orig,
                       device_id=torch.device("cpu"))
        with pytest.raises(TypeError) as made:     # the wrapped model: refused when made
            EMA(wrapped, 0.9)
        out[f"made{int(orig)}"] = _text(made.value)
        ema = EMA(model, 0.9)                      # made first, then the model wrapped
        fsdp = FSDP(model, use_orig_params=orig, device_id=torch.device("cpu"))
        opt = torch.optim.AdamW(fsdp.parameters(), lr=1e-2)
        with pytest.raises(TypeError) as refused:
            ema.attach(opt)
        out[f"attach{int(orig)}"] = _text(refused.value)
        fsdp(torch.randn(2, 8).to(torch.bfloat16)).float().sum().backward()
        opt.step()                                 # nothing hooked: the step runs, no update
        out[f"hooks{int(orig)}"] = torch.tensor(len(opt._optimizer_step_post_hooks)
                                                + len(opt._optimizer_state_dict_post_hooks)
                                                + len(opt._optimizer_load_state_dict_pre_hooks))
        out[f"updates{int(orig)}"] = torch.tensor(ema.updates)
        head = nn.Linear(1, 1)                     # a plain part, stepped beside FSDP1's
        both = torch.optim.AdamW([*fsdp.parameters(), *head.parameters()], lr=1e-2)
        with pytest.raises(TypeError) as mixed:
            EMA(head, 0.9).attach(both)
        out[f"mixed{int(orig)}"] = _text(mixed.value)
        del fsdp, opt
    return out


def test_fsdp1_is_refused_by_name_at_attach_with_nothing_hooked(tmp_path):
    for r in run_ranks(_fsdp1, tmp_path, 2, pg_timeout=30.0):
        for orig in (0, 1):
            made = bytes(r[f"made{orig}"].tolist()).decode()
            said = bytes(r[f"attach{orig}"].tolist()).decode()
            assert "wrapped by FSDP1" in made
            assert said.startswith("attach() does not take this EMA: its model (or the "
                                   "optimizer's) is wrapped by FSDP1")
            assert "fully_shard" in said
            assert "wrapped by FSDP1" in bytes(r[f"mixed{orig}"].tolist()).decode()
            assert int(r[f"hooks{orig}"]) == 0 and int(r[f"updates{orig}"]) == 0
