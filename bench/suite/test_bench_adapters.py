"""Adapter EMA on a LoRA'd model (issue #26): ``EMA(model, trainable_only=True).update()``
against TRL's ``PEFTAdapterEMACallback`` (trl/experimental/sdft/teacher_sync.py).

TRL's callback, at every step: ``get_peft_model_state_dict`` of the student adapter, one new
tensor per adapter tensor (``shadow.data = (1 - a) * shadow.data + a * student``: three
allocations each), then ``set_peft_model_state_dict`` into its "teacher" adapter. Two baselines
of the same run: the whole ``on_step_end`` (what a Trainer step pays), and its averaging loop alone
(state dict + the allocating lerp, without the copy into the teacher adapter). fastema: one kernel
launch per (device, dtype) group over the adapters' flat shadow, nothing allocated. Each baseline
updates once beside fastema's EMA of the same start and must agree with it before it is timed.

The model: GPT-2 built from its config (no hub), LoRA r=16 on every attention and MLP
projection (``c_attn``, ``c_proj``, ``c_fc``). Full mode: GPT-2 small (12 layers, 2.4M adapter
parameters in 96 tensors); quick mode (CI): 2 layers of width 128.
"""
import warnings

import pytest

from .conftest import QUICK, devices, ema_check

UPDATE_RATE = 0.05                       # TRL's default; fastema's decay is 1 - it
SCENARIOS = {"gpt2-small LoRA r=16": dict(n_layer=12, n_embd=768, n_head=12),
             "gpt2-tiny LoRA r=16": dict(n_layer=2, n_embd=128, n_head=4)}
IMPLS = ["fastema", "trl PEFTAdapterEMACallback", "trl PEFTAdapterEMACallback (average only)"]


def _lora_model(device, shape):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257 if shape["n_layer"] == 12 else 1024, n_positions=1024,
                                     **shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                    peft.LoraConfig(r=16, lora_alpha=32, fan_in_fan_out=True,
                                                    target_modules=["c_attn", "c_proj", "c_fc"]))
    return model.to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("device", devices())
def test_adapter_ema_update(run, benchmark, device, scenario, impl):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    if "gpt2-small" in scenario and QUICK:
        pytest.skip("full mode only")
    rounds = 20 if QUICK else 100                            # host-bound calls of micro- to milliseconds
    import torch

    benchmark.group = f"Adapter EMA update, LoRA'd GPT-2 ({device})"
    model = _lora_model(device, SCENARIOS[scenario])
    adapters = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in adapters)
    if impl == "fastema":
        from fastema.torch import EMA

        ema = EMA(model, 1 - UPDATE_RATE, trainable_only=True)
        assert ema._avg.nbytes == 4 * n                      # the shadow holds the adapters only
        fn = ema.update
    else:
        pytest.importorskip("trl")
        from transformers import TrainerControl, TrainerState
        from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback

        callback = PEFTAdapterEMACallback(model, update_rate=UPDATE_RATE)
        callback._initialize_teacher_adapter()
        state, control = TrainerState(), TrainerControl()
        state.global_step = 1
        if "average only" in impl:
            def fn():                                        # on_step_end's averaging, without the teacher copy
                with torch.no_grad():
                    for key, student in callback._get_student_state_dict().items():
                        shadow = callback.shadow_weights[key]
                        shadow.data = (1 - UPDATE_RATE) * shadow.data + UPDATE_RATE * student.data
        else:
            fn = lambda: callback.on_step_end(None, state, control)  # noqa: E731
        with torch.no_grad():                                # TRL starts its shadow at zero: the student's
            for key, student in callback._get_student_state_dict().items():     # here, as fastema's does
                callback.shadow_weights[key].copy_(student)
        check = ema_check(impl, fn, lambda: list(callback.shadow_weights.values()), model, 1 - UPDATE_RATE,
                          pick=lambda name: "lora_" in name and ".default." in name, trainable_only=True)
    run(fn, device, impl=impl, case=scenario, nbytes=12 * n, elements=n, rounds=rounds,
        check=None if impl == "fastema" else check)
