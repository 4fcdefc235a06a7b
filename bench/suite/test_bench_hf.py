"""The Hugging Face Trainer callback's overhead per optimizer step (issue #26).

``fastema.transformers.EMACallback.on_step_end`` (what the Trainer calls after every optimizer
step: one ``fastema.torch.EMA.update(step=global_step)``) against a hand-written
``TrainerCallback`` whose ``on_step_end`` is one ``torch._foreach_lerp_`` of a shadow list over
the parameter list (the usual hand-written EMA callback, at its fastest: the lists are made once
at ``on_train_begin``, the update runs under ``no_grad``). Both callbacks are set up by their own
``on_train_begin`` on the same GPT-2 (built from a config) and timed in the same run; the Trainer
would call exactly these hooks. Target: fastema no slower (ratio >= 1.0x in the table's speed-up
column, i.e. overhead <= 1.0x the baseline's). The baseline's update is checked against fastema's
EMA of the same start before it is timed (``bench/suite/checked.py``).

Scenarios: a 4-layer GPT-2 (d=256, vocab 8192, 5.2M parameters, 52 tensors) in quick and full
mode, and GPT-2 small (124M parameters, 148 tensors; lm_head tied) in full mode only.
"""
import pytest

from .conftest import QUICK, ema_check, scenario_rounds

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DECAY = 0.999
SCENARIOS = {"gpt2 4x256": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256),
             "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)}


class ForeachLerpEMA(transformers.TrainerCallback):
    """The hand-written baseline: ``shadow <- lerp(shadow, param, 1 - decay)`` with one foreach call."""

    def __init__(self, decay):
        self.decay = decay

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.decay)


@pytest.mark.parametrize("impl", ["fastema EMACallback", "hand-written _foreach_lerp_ callback"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_trainer_callback_step(run, benchmark, tmp_path, impl, scenario):
    from fastema.transformers import EMACallback

    rounds = scenario_rounds(scenario)
    benchmark.group = "HF Trainer EMA callback, on_step_end (cpu)"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SCENARIOS[scenario], bos_token_id=0,
                                                                          eos_token_id=0))
    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback = EMACallback(decay=DECAY) if impl.startswith("fastema") else ForeachLerpEMA(DECAY)
    callback.on_train_begin(args, state, control, model=model)
    n = sum(p.numel() for p in model.parameters())

    def step():
        state.global_step += 1
        callback.on_step_end(args, state, control, model=model)

    check = None if impl.startswith("fastema") else ema_check(      # lm_head.weight: the tied embedding
        impl, step, lambda: callback.shadow, model, DECAY, pick=lambda name: name != "lm_head.weight")
    run(step, "cpu", impl=impl, case=f"{scenario} ({n / 1e6:.1f}M)", nbytes=12 * n, elements=n,
        rounds=rounds if rounds is not None else (10 if QUICK else 50), check=check)
