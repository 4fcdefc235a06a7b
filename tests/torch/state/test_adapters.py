"""Adapter EMA: ``trainable_only`` (the default for PEFT models), ``export_peft``, checkpoints.

Against the real peft: a tiny GPT-2 (from a config, no hub) with LoRA, trained for a few
steps; the shadow against a float64 reference of the adapters; the export loaded back with
``PeftModel.from_pretrained`` and compared with PEFT's own ``save_pretrained`` of the
average swapped in.
"""
import json
import os
import re
import warnings

import pytest
import torch
from torch import nn

from fastema.torch import EMA, WindowAverage

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

DECAY = 0.8
DEFAULT_SAYS = r"PEFT model averages only its trainable parameters"


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def lora(seed: int = 0, **extra) -> nn.Module:
    """A LoRA'd tiny GPT-2; lora_B starts non-zero (init_lora_weights=False) so every adapter tensor moves
    from the start."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(gpt2(seed), config)
    torch.manual_seed(seed + 1)                       # the adapters' values vary with the seed too
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def batches(steps: int):
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(steps)]


def train(model, ema, steps: int = 5, reference: dict | None = None):
    """A real training loop: AdamW on the trainable parameters, the EMA updated after each step; the
    float64 reference of the trainable parameters follows the same formula."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for ids in batches(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        if reference is not None:
            for n, p in model.named_parameters():
                if n in reference:
                    reference[n] = DECAY * reference[n] + (1 - DECAY) * p.detach().double()


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema = EMA(model, DECAY, **kw)
    return ema, [str(w.message) for w in caught if re.search(DEFAULT_SAYS, str(w.message))]


def test_a_peft_model_averages_its_adapters_by_default_and_says_so_once():
    model = lora()
    adapters = trainable(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema = EMA(model, DECAY)
        train(model, ema, steps=3)
        with ema.average_parameters():
            pass
        ema.state_dict()
    said = [str(w.message) for w in caught if re.search(DEFAULT_SAYS, str(w.message))]
    assert len(said) == 1 and [w.category for w in caught if DEFAULT_SAYS[:20] in str(w.message)] == [UserWarning]
    assert ema.trainable_only is True and sorted(ema._avg.names) == sorted(adapters)
    # Memory measured: the shadow's bytes are the adapters' bytes (float32 adapters, float32 shadow)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.values())
    assert ema._avg.nbytes == adapter_bytes
    assert f"{len(adapters)} tensors, {adapter_bytes} bytes of weights, a {adapter_bytes}-byte shadow" in said[0]
    assert "trainable_only=False" in said[0]
    every_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert adapter_bytes * 10 < every_bytes                  # what the default leaves out

    explicit, said = make(lora(), trainable_only=True)       # asked for: nothing to say
    assert said == [] and explicit._avg.nbytes == adapter_bytes
    full, said = make(lora(), trainable_only=False)          # today's EMA: every parameter
    assert said == [] and full._avg.nbytes == every_bytes and full.trainable_only is False
    with pytest.raises(TypeError, match=r"trainable_only must be True, False or None.*got 'yes'"):
        EMA(lora(), DECAY, trainable_only="yes")
    with pytest.raises(ValueError, match=r"trainable_only \(True by default for a PEFT model\): no parameter"):
        EMA(lora().requires_grad_(False), DECAY)


def test_the_adapters_average_matches_a_float64_reference_in_a_training_loop():
    model = lora()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ema, _ = make(model)
    reference = {n: p.detach().double().clone() for n, p in trainable(model).items()}
    train(model, ema, steps=6, reference=reference)
    for n, want in reference.items():
        torch.testing.assert_close(ema._avg.view(n).double(), want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(reference[n].float(), p) for n, p in trainable(model).items())   # it moved
    averaged = ema.averaged_state_dict()
    for n, t in frozen.items():                              # the frozen base: its own values, untouched
        assert torch.equal(averaged[n], t) and torch.equal(model.get_parameter(n), t)


def test_window_average_takes_trainable_only_too():
    model = lora()
    with pytest.warns(UserWarning, match=DEFAULT_SAYS):
        window = WindowAverage(model, 3)
    assert sorted(window._avg.names) == sorted(trainable(model))


def test_export_peft_loads_with_from_pretrained_as_the_average(tmp_path):
    model = lora()
    ema, _ = make(model)
    train(model, ema, steps=4)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.export_peft(tmp_path / "ema")
    assert sorted(os.listdir(tmp_path / "ema")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())    # the model is not changed

    # PEFT's own save of the average swapped in writes the same files
    model.eval()                                              # no dropout: outputs to compare
    with ema.average_parameters(), torch.no_grad():
        model.save_pretrained(tmp_path / "peft")
        ids = batches(1)[0]
        want_logits = model(input_ids=ids).logits
    from safetensors.torch import load_file

    ours, theirs = load_file(tmp_path / "ema" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) == sorted(peft.get_peft_model_state_dict(model))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "ema" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    # loaded by PEFT on a fresh base model: exactly the averaged adapters, the same outputs
    loaded = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ema")
    got = dict(loaded.named_parameters())
    averaged = ema.averaged_state_dict()
    for n in trainable(model):
        assert torch.equal(got[n], averaged[n]), n
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, want_logits)


def test_export_peft_refusals_write_nothing_and_change_nothing(tmp_path):
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    plain = EMA(mlp, DECAY)
    with pytest.raises(TypeError, match=r"export_peft\(\) writes a PEFT adapter.*Sequential.*save\(path\)"):
        plain.export_peft(tmp_path / "a")

    model = lora()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    ema, _ = make(model)                            # "other" is frozen: the average holds "default" only
    train(model, ema, steps=2)
    before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"does not hold 2 of adapter 'other'.*frozen when it was made"):
        ema.export_peft(tmp_path / "b", adapter_name="other")
    with pytest.raises(ValueError, match=r"adapter_name='nope' is not one of the model's adapters"):
        ema.export_peft(tmp_path / "c", adapter_name="nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file"):
        ema.export_peft(tmp_path / "file")
    with pytest.raises(IndexError):
        ema.export_peft(tmp_path / "d", row=1)
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match=r"export_peft\(\)"):
            ema.export_peft(tmp_path / "e")
    excluded, _ = make(lora(), exclude=["*lora_B*"])
    with pytest.raises(ValueError, match=r"does not hold .* of adapter 'default'.*exclude="):
        excluded.export_peft(tmp_path / "f")
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "x"
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict()["averaged"].items())
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())

    ema.export_peft(tmp_path / "ok")                          # the active adapter, "default"
    loaded = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ok")
    averaged = ema.averaged_state_dict()
    assert all(torch.equal(p, averaged[n]) for n, p in loaded.named_parameters() if "lora_" in n)


def test_checkpoints_carry_the_selection_and_refuse_another_by_name(tmp_path):
    model = lora()
    ema, _ = make(model)
    train(model, ema, steps=3)
    state = ema.state_dict()
    assert sorted(state["averaged"]) == sorted(trainable(model))
    torch.save(state, tmp_path / "ema.pt")

    resumed, _ = make(lora(seed=5))
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert resumed.updates == ema.updates == 3
    for n in ema._avg.names:
        assert torch.equal(resumed._avg.view(n), ema._avg.view(n))

    full, _ = make(lora(seed=5), trainable_only=False)
    full_before = {k: v.clone() for k, v in full.state_dict()["averaged"].items()}
    with pytest.raises(ValueError, match=r"averaged missing \[.*transformer.*\]"):
        full.load_state_dict(state)                           # adapters only into every parameter
    with pytest.raises(ValueError, match=r"averaged unexpected \[.*transformer.*\]"):
        resumed.load_state_dict(full.state_dict())            # every parameter into adapters only
    assert full.updates == 0 and all(torch.equal(v, full_before[k]) for k, v in full.state_dict()["averaged"].items())
    for n in ema._avg.names:
        assert torch.equal(resumed._avg.view(n), ema._avg.view(n))

    ema.save(tmp_path / "model.safetensors")                  # a model checkpoint: frozen base as it is
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    averaged = ema.averaged_state_dict()
    assert sorted(saved) == sorted(model.state_dict()) and all(torch.equal(saved[k], averaged[k]) for k in saved)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))     # frozen: a pretrained backbone
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_plain_model_with_frozen_parameters():
    torch.manual_seed(0)
    net = _Net()
    net.body.requires_grad_(False)
    ema, said = make(net)                                   # not a PEFT model: None means every parameter
    assert said == [] and ema.trainable_only is False and "body.0.weight" in ema._avg.names
    ema, said = make(net, trainable_only=True)
    assert said == [] and sorted(ema._avg.names) == sorted(trainable(net))
    # the head's BatchNorm statistics are copied, its counter too; the frozen body's are left alone
    assert sorted(ema._copy.names) == ["head.1.running_mean", "head.1.running_var"]
    assert list(ema._side.int_buffers) == ["head.1.num_batches_tracked"]
    body_state = {k: v.clone() for k, v in net.body.state_dict().items()}
    reference = {n: p.detach().double().clone() for n, p in trainable(net).items()}
    opt = torch.optim.SGD(trainable(net).values(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 6, generator=g)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        for n, p in trainable(net).items():
            reference[n] = DECAY * reference[n] + (1 - DECAY) * p.detach().double()
    for n, want in reference.items():
        torch.testing.assert_close(ema._avg.view(n).double(), want, rtol=1e-6, atol=1e-7)
    averaged = ema.averaged_state_dict()
    assert torch.equal(averaged["head.1.running_mean"], net.head[1].running_mean)
    for k, v in net.body.state_dict().items():            # the body's statistics moved in training: exported as is
        assert torch.equal(averaged[f"body.{k}"], v)
    assert not torch.equal(net.body[1].running_mean, body_state["1.running_mean"])

    # the tracked set is fixed at construction (as exclude='s): unfreezing the body later does not add it
    net.body.requires_grad_(True)
    ema.update()
    assert "body.0.weight" not in ema._avg.names
    assert torch.equal(ema.averaged_state_dict()["body.0.weight"], net.body[0].weight)

    with pytest.raises(ValueError, match=r"trainable_only: no parameter has requires_grad=True"):
        EMA(nn.Linear(2, 2).requires_grad_(False), DECAY, trainable_only=True)


def test_a_frozen_adapter_added_after_construction_is_not_refused():
    model = lora()
    ema, _ = make(model)
    names = list(ema._avg.names)
    model.add_adapter("later", peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    train(model, ema, steps=1)                              # new frozen tensors: not tracked, not refused
    assert ema._avg.names == names and ema.updates == 1


def test_the_adapters_guide_example_runs(tmp_path, monkeypatch):
    """docs/guides/adapters.md's example, as written (in this process: its imports are loaded already)."""
    text = (__import__("pathlib").Path(__file__).parents[3] / "docs" / "guides" / "adapters.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "guides/adapters.md", "exec"), scope)
    assert os.path.exists(tmp_path / "ema-adapter" / "adapter_model.safetensors")
    assert scope["same"] is True


def test_a_transformers_model_with_an_adapter_is_a_peft_model_too(tmp_path):
    """transformers' own PEFT integration (model.add_adapter / load_adapter, no PeftModel)."""
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                          init_lora_weights=False))
    with pytest.warns(UserWarning, match=DEFAULT_SAYS):
        ema = EMA(model, DECAY)
    assert sorted(ema._avg.names) == sorted(trainable(model)) and len(ema._avg.names) == 2
    train(model, ema, steps=2)
    ema.export_peft(tmp_path)
    fresh = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_adapter(str(tmp_path))
    averaged = ema.averaged_state_dict()
    loaded = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(trainable(model))
    assert all(torch.equal(p, averaged[n]) for n, p in loaded.items())
