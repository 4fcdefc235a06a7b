"""fastema.transformers.EMACallback in real ``transformers.Trainer`` runs on the CPU (a tiny GPT-2 built
from a config, synthetic token ids): the shadow against a float64 reference of the post-step weights,
gradient accumulation, evaluation with the average, checkpoint and bit-exact resume, export with
``save_pretrained``; and the EMA under accelerate's ``register_for_checkpointing``."""
import importlib
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from fastema.schedules import BEMA, PowerWarmup  # noqa: E402
from fastema.transformers import STATE_FILE, EMACallback  # noqa: E402

warnings.filterwarnings("ignore", ".*loss_type.*")
transformers.logging.set_verbosity_error()

GUIDE = pathlib.Path(__file__).parents[2] / "docs" / "guides" / "transformers.md"
VOCAB, SEQ = 64, 8


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out, **kw):
    opts = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2, report_to=[],
                use_cpu=True, logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    opts.update(kw)
    return TrainingArguments(str(out), **opts)


def raw(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Recorder(TrainerCallback):
    """The weights when training begins and after every optimizer step, micro-batches, evaluations."""

    def __init__(self, ema_callback=None):
        self.ema_callback, self.begin, self.steps, self.substeps, self.evals = ema_callback, None, [], 0, []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.begin = {n: p.detach().double().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps.append((state.global_step, raw(model)))

    def on_substep_end(self, args, state, control, **kw):
        self.substeps += 1

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        self.evals.append((metrics["eval_loss"], raw(model), self.ema_callback.ema.averaged_state_dict()))


def power_decay(step, decay, after):
    """``PowerWarmup(decay, update_after_step=after)`` (inv_gamma 1, power 2/3) as the EMA's plan defines it,
    for the reference."""
    s = step - after - 1
    return 0.0 if s <= 0 else min(decay, 1.0 - (1.0 + s) ** (-2 / 3))


def plain_eval_loss(state, tmp_path, data):
    """The eval loss of a model holding ``state``, from a Trainer with no callback."""
    model = tiny_gpt2(seed=1)
    result = model.load_state_dict(state, strict=False)       # named_parameters() leaves out the tied lm_head
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    return Trainer(model=model, args=arguments(tmp_path / "plain"), eval_dataset=data).evaluate()["eval_loss"]


def test_shadow_follows_optimizer_steps_with_delayed_start_and_exports(tmp_path):
    """Gradient accumulation 2: one update per optimizer step (5), not per micro-batch (10), with the
    power warm-up counted in optimizer steps; the shadow matches a float64 reference of the recorded
    post-step weights; save_ema_model writes a model from_pretrained loads with the averaged weights,
    and the trained model is left as it was."""
    model = tiny_gpt2()
    ema_cb = EMACallback(decay=PowerWarmup(0.9, update_after_step=2), save_ema_model=tmp_path / "ema")
    rec = Recorder(ema_cb)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=5, gradient_accumulation_steps=2),
                      train_dataset=Tokens(64, 0), callbacks=[ema_cb, rec])
    trainer.train()
    ema = ema_cb.ema
    assert [s for s, _ in rec.steps] == [1, 2, 3, 4, 5] and rec.substeps == 5     # 10 micro-batches
    assert ema.calls == ema.updates == 5
    ref = dict(rec.begin)
    for step, weights in rec.steps:
        d = power_decay(step, 0.9, 2)
        ref = {n: d * ref[n] + (1 - d) * weights[n].double() for n in ref}
    averaged = ema.averaged_state_dict()
    for n in ref:
        np.testing.assert_allclose(averaged[n].double().numpy(), ref[n].numpy(), rtol=1e-5, atol=1e-6, err_msg=n)
    assert not torch.equal(averaged["transformer.h.0.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight)
    final = rec.steps[-1][1]
    assert all(torch.equal(p, final[n]) for n, p in model.named_parameters())   # the export left it alone
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "ema")
    assert type(loaded) is GPT2LMHeadModel
    for n, t in loaded.state_dict().items():
        assert torch.equal(t, averaged[n]), n
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()      # still tied


def test_evaluate_and_predict_with_the_average(tmp_path):
    """eval_with_ema: evaluation during training and trainer.evaluate()/predict() after it run on the
    averaged weights (the loss equals a plain evaluation of the averaged model) and the raw weights
    are back bit for bit afterwards."""
    data = Tokens(16, 1)
    model = tiny_gpt2()
    ema_cb = EMACallback(decay=0.8, eval_with_ema=True)
    rec = Recorder(ema_cb)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
                      train_dataset=Tokens(32, 0), eval_dataset=data, callbacks=[ema_cb, rec])
    trainer.train()
    assert len(rec.evals) == 2
    steps = dict(rec.steps)
    for (loss, after, averaged), step in zip(rec.evals, (2, 4)):
        assert all(torch.equal(after[n], steps[step][n]) for n in after)           # raw weights back, bitwise
        assert loss == plain_eval_loss(averaged, tmp_path, data)
        assert loss != plain_eval_loss(steps[step], tmp_path, data)               # not the raw model's loss
    averaged = ema_cb.ema.averaged_state_dict()
    assert trainer.evaluate()["eval_loss"] == plain_eval_loss(averaged, tmp_path, data)
    logits = trainer.predict(data).predictions[0]
    plain = tiny_gpt2(seed=1)
    plain.load_state_dict(averaged)
    plain_logits = Trainer(model=plain, args=arguments(tmp_path / "p")).predict(data).predictions[0]
    np.testing.assert_array_equal(logits, plain_logits)
    assert all(torch.equal(p, steps[4][n]) for n, p in model.named_parameters())
    assert not ema_cb.ema.swapped


@pytest.mark.parametrize("flag, dtype", [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_evaluate_after_training_with_a_full_eval_cast_runs_on_the_average_and_leaves_the_raw_weights(
        tmp_path, flag, dtype):
    # Trainer casts the model in place outside training (model.to(bfloat16)) while the average was swapped in:
    # evaluate() raised after the evaluation ran, the model kept the average and the EMA stayed swapped in
    data = Tokens(16, 1)
    model = tiny_gpt2()
    ema_cb = EMACallback(decay=0.8, eval_with_ema=True)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=3, **{flag: True}),
                      train_dataset=Tokens(32, 0), eval_dataset=data, callbacks=[ema_cb])
    trainer.train()
    trained = {n: p.detach().clone() for n, p in model.state_dict().items()}
    averaged = ema_cb.ema.averaged_state_dict()
    loss = trainer.evaluate()["eval_loss"]
    plain = tiny_gpt2(seed=1)
    plain.load_state_dict({**trained, **averaged})
    expected = Trainer(model=plain, args=arguments(tmp_path / "plain", **{flag: True}),
                       eval_dataset=data).evaluate()["eval_loss"]
    assert loss == expected                                   # the average, evaluated in the eval dtype
    assert not ema_cb.ema.swapped
    for n, t in model.state_dict().items():                    # Trainer's cast of the raw weights, as without fastema
        assert t.dtype == (dtype if trained[n].is_floating_point() else trained[n].dtype)
        assert torch.equal(t, trained[n].to(t.dtype)), n
    with pytest.raises(ValueError, match="make a new shadow after changing the model, or change it back"):
        ema_cb.ema.averaged_state_dict()                       # the cast model (Trainer's) is not the averaged one
    model.float()                                              # changed back: the average, as it was
    assert all(torch.equal(a, b) for a, b in zip(ema_cb.ema.averaged_state_dict().values(), averaged.values()))


def test_load_best_model_at_end_brings_back_the_best_steps_ema(tmp_path):
    """With load_best_model_at_end, the Trainer puts the best checkpoint's weights back; the callback
    loads that checkpoint's EMA with them, so evaluating after training gives the best metric again
    (it was measured on the average)."""
    data = Tokens(16, 1)
    ema_cb = EMACallback(decay=0.5, eval_with_ema=True)
    trainer = Trainer(model=tiny_gpt2(), args=arguments(tmp_path, max_steps=4, learning_rate=0.3,
                                                        eval_strategy="steps", eval_steps=1, save_strategy="steps",
                                                        save_steps=1, load_best_model_at_end=True),
                      train_dataset=Tokens(32, 0), eval_dataset=data, callbacks=[ema_cb])
    trainer.train()
    best = trainer.state.best_global_step
    assert best != 4, "pick settings where the last step is not the best"
    assert ema_cb.ema.calls == best
    assert trainer.evaluate()["eval_loss"] == trainer.state.best_metric


def run(tmp_path, name, resume=None, model=None, **callback_kw):
    model = model if model is not None else tiny_gpt2()
    ema_cb = EMACallback(decay=PowerWarmup(0.9, update_after_step=1), **callback_kw)
    trainer = Trainer(model=model, args=arguments(tmp_path / name, max_steps=6, save_strategy="steps", save_steps=2,
                                                  save_total_limit=2), train_dataset=Tokens(64, 0),
                      callbacks=[ema_cb])
    trainer.train(resume_from_checkpoint=resume)
    return model, ema_cb


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run with checkpoints every 2 steps (at most 2 kept): ``(folder, model, callback)``."""
    tmp = tmp_path_factory.mktemp("hf")
    model, ema_cb = run(tmp, "a")
    return tmp / "a", model, ema_cb


def test_checkpoint_and_bit_exact_resume(tmp_path, uninterrupted):
    """Every checkpoint folder holds the EMA's file (rotated away with its folder); a run resumed from
    checkpoint-4 ends with the uninterrupted run's model and shadow, bit for bit, and its counters."""
    out, model, ema_cb = uninterrupted
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-4" / STATE_FILE).is_file() and (out / "checkpoint-6" / STATE_FILE).is_file()
    assert not any(p.suffix in (".pkl", ".pt", ".bin") and "fastema" in p.name for p in out.rglob("*"))
    resumed_model, resumed = run(tmp_path, "resumed", resume=str(out / "checkpoint-4"))
    assert resumed.ema.calls == ema_cb.ema.calls == 6 and resumed.ema.updates == ema_cb.ema.updates
    assert resumed.ema.plan.state() == ema_cb.ema.plan.state()
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(resumed_model.named_parameters())[n]), n
    mine, theirs = ema_cb.ema.state_dict(), resumed.ema.state_dict()
    for n, t in mine["averaged"].items():
        assert torch.equal(t, theirs["averaged"][n]), n
    shutil.copytree(out, tmp_path / "last")
    _, last = run(tmp_path, "last", resume=True)       # True: the Trainer's last checkpoint, checkpoint-6
    assert last.ema.calls == 7                         # its 6 calls, and the one step a Trainer resumed at
                                                       # max_steps still takes
    # a run resumed without loading the EMA (restart) ends elsewhere: the comparison above can fail
    shutil.copytree(out / "checkpoint-4", tmp_path / "bare" / "checkpoint-4")
    os.remove(tmp_path / "bare" / "checkpoint-4" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match="missing_state='restart'"):
        run(tmp_path, "b", resume=str(tmp_path / "bare" / "checkpoint-4"))
    with pytest.warns(UserWarning, match="starts over"):
        _, restarted = run(tmp_path, "c", resume=str(tmp_path / "bare" / "checkpoint-4"), missing_state="restart")
    assert restarted.ema.calls == 2
    assert not torch.equal(restarted.ema.state_dict()["averaged"]["transformer.wte.weight"],
                           mine["averaged"]["transformer.wte.weight"])


def test_a_damaged_or_mismatched_state_file_is_refused_before_training(tmp_path, uninterrupted):
    """Options that differ from the checkpoint's, or a file that is not the callback's, stop the resume
    with the reason."""
    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(uninterrupted[0] / "checkpoint-6", ckpt)
    with pytest.raises(ValueError, match="decay"):
        trainer = Trainer(model=tiny_gpt2(), args=arguments(tmp_path / "x", max_steps=8), train_dataset=Tokens(64, 0),
                          callbacks=[EMACallback(decay=[0.9, 0.99])])
        trainer.train(resume_from_checkpoint=str(ckpt))
    # one decay or update_every of its own: the load took the file's in place of the callback's, silently
    for other, said in ((dict(decay=PowerWarmup(0.95, update_after_step=1)), "saved with decays"),
                        (dict(decay=PowerWarmup(0.9, update_after_step=1), update_every=2),
                         "saved with update_every=1 where this callback's is 2")):
        with pytest.raises(ValueError, match=f"{said}.*give EMACallback the options it was saved with"):
            Trainer(model=tiny_gpt2(), args=arguments(tmp_path / "z", max_steps=8), train_dataset=Tokens(64, 0),
                    callbacks=[EMACallback(**other)]).train(resume_from_checkpoint=str(ckpt))
    from safetensors.torch import save_file

    ema_cb = EMACallback(decay=PowerWarmup(0.9, update_after_step=1))
    trainer = Trainer(model=tiny_gpt2(), args=arguments(tmp_path / "y", max_steps=7), train_dataset=Tokens(64, 0),
                      callbacks=[ema_cb])
    trainer.train(resume_from_checkpoint=str(ckpt))
    before, state = ema_cb.ema, ema_cb.ema.state_dict()
    assert state["calls"] == 7
    save_file({"w": torch.zeros(2)}, str(ckpt / STATE_FILE), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not an EMACallback state file"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert ema_cb.ema is before and ema_cb.ema.calls == 7          # the refused resume kept the callback's EMA
    assert all(torch.equal(t, state["averaged"][n]) for n, t in ema_cb.ema.state_dict()["averaged"].items())


def test_a_truncated_emptied_or_replaced_state_file_is_refused_naming_the_file(tmp_path, uninterrupted):
    """A state file that safetensors cannot read (cut short, emptied, overwritten with other bytes)
    stops the resume with an error that names the file and says what to do, not safetensors' bare
    header error; the callback keeps the EMA it had."""
    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(uninterrupted[0] / "checkpoint-6", ckpt)
    path = ckpt / STATE_FILE
    whole = path.read_bytes()
    ema_cb = EMACallback(decay=PowerWarmup(0.9, update_after_step=1))
    trainer = Trainer(model=tiny_gpt2(), args=arguments(tmp_path / "y", max_steps=7), train_dataset=Tokens(64, 0),
                      callbacks=[ema_cb])
    trainer.train(resume_from_checkpoint=str(ckpt))
    before, state = ema_cb.ema, ema_cb.ema.state_dict()
    for damaged in (whole[: len(whole) // 2], whole[:-1], whole[:5], b"", b"\x07" * 300, b"not safetensors\n" * 20):
        path.write_bytes(damaged)
        with pytest.raises(ValueError) as info:
            trainer.train(resume_from_checkpoint=str(ckpt))
        message = str(info.value)
        assert repr(str(path)) in message and "damaged" in message, message
        assert "another checkpoint" in message and "missing_state='restart'" in message, message
        assert "Nothing was loaded" in message, message
        assert ema_cb.ema is before and ema_cb.ema.calls == 7
        assert all(torch.equal(t, state["averaged"][n]) for n, t in ema_cb.ema.state_dict()["averaged"].items())


def test_a_bit_flipped_in_any_tensor_of_the_state_file_is_refused_naming_the_file_and_the_tensor(tmp_path,
                                                                                                   uninterrupted):
    """A state file whose tensor bytes changed on disk (one mantissa bit) loaded silently. The file carries
    the CRC-32 of every tensor (as a post-hoc snapshot does): the resume is refused naming the file and the
    tensor, and says what to do; the callback keeps its EMA. A file without its checksums is refused too."""
    import json
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(uninterrupted[0] / "checkpoint-6", ckpt)
    path = ckpt / STATE_FILE
    whole = path.read_bytes()
    n = struct.unpack("<Q", whole[:8])[0]
    layout = {k: v["data_offsets"] for k, v in json.loads(whole[8:8 + n]).items() if k != "__metadata__"}
    ema_cb = EMACallback(decay=PowerWarmup(0.9, update_after_step=1))
    trainer = Trainer(model=tiny_gpt2(), args=arguments(tmp_path / "y", max_steps=7), train_dataset=Tokens(64, 0),
                      callbacks=[ema_cb])
    trainer.train(resume_from_checkpoint=str(ckpt))
    before, state = ema_cb.ema, ema_cb.ema.state_dict()
    assert any(k.startswith("averaged/") for k in layout)
    for key, (begin, end) in layout.items():
        if begin == end:
            continue
        flipped = bytearray(whole)
        flipped[8 + n + begin] ^= 0x01                    # the lowest bit of its first element
        path.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=re.escape(f"{str(path)!r}: tensor {key!r} fails its checksum") +
                           r".*Resume from another checkpoint folder, or delete the file and pass "
                           r".*missing_state='restart'.*Nothing was loaded"):
            trainer.train(resume_from_checkpoint=str(ckpt))
        assert ema_cb.ema is before and ema_cb.ema.calls == 7
        assert all(torch.equal(t, state["averaged"][k]) for k, t in ema_cb.ema.state_dict()["averaged"].items())
    with safe_open(str(uninterrupted[0] / "checkpoint-6" / STATE_FILE), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k != "checksums"})
    with pytest.raises(ValueError, match=r"has no readable 'checksums' metadata .*damaged.*Nothing was loaded"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert ema_cb.ema is before and ema_cb.ema.calls == 7


def test_finding_the_trainer_keeps_nothing_of_the_callers_alive(tmp_path):
    """The callback looks for its Trainer among its callers' frames. On Python 3.10-3.12 reading a
    frame's ``f_locals`` snapshots its variables into a dict the frame keeps: a tensor the caller
    deletes after ``Trainer(...)`` or after ``train()`` must be freed then, not when the caller returns."""
    def build_then_free():
        big = torch.zeros(1 << 20)                  # 4 MiB held by this frame only
        freed = weakref.ref(big)
        trainer = Trainer(model=tiny_gpt2(), args=arguments(tmp_path, max_steps=1), train_dataset=Tokens(8, 0),
                          callbacks=[EMACallback(decay=0.9, eval_with_ema=True)])
        del big
        after_init = freed() is None
        big = torch.zeros(1 << 20)
        freed = weakref.ref(big)
        trainer.train()
        del big
        return after_init, freed() is None

    assert build_then_free() == (True, True)


def test_bema_equals_trl_bemacallback_on_the_same_run(tmp_path):
    """EMACallback(decay=BEMA(...)) and TRL's BEMACallback in one Trainer run (the same weights at every
    step) end with the same averaged weights: theta_0 and the EMA start from the weights training
    begins with, and tau counts optimizer steps from 0 (TRL's update_after=0), TRL's update_freq
    being update_every; with TRL's defaults and with other values of every schedule parameter.
    TRL's update_after=a (theta_0 taken at step a, tau still counted from 0) is a fastema EMA
    whose updates start at step a with lag + multiplier * a, as the guide says."""
    trl = pytest.importorskip("trl")
    from fastema.torch import EMA

    other = dict(ema_power=0.7, bias_power=0.4, lag=3, multiplier=0.5, min_ema_multiplier=0.2)

    class Later(TrainerCallback):                 # TRL's update_after=3 with update_freq=2, by hand
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.ema = EMA(model, BEMA(**{**other, "lag": 3 + 0.5 * 3}), update_every=2)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 3:
                self.ema.update(step=state.global_step)

    pairs = [(trl.BEMACallback(update_freq=1), EMACallback(decay=BEMA())),
             (trl.BEMACallback(update_freq=3, **other), EMACallback(decay=BEMA(**other), update_every=3)),
             (trl.BEMACallback(update_freq=2, update_after=3, **other), Later())]
    model = tiny_gpt2()
    Trainer(model=model, args=arguments(tmp_path, max_steps=7, learning_rate=0.05), train_dataset=Tokens(64, 0),
            callbacks=[cb for pair in pairs for cb in pair]).train()
    for theirs, ours in pairs:
        assert ours.ema.updates == len(range(theirs.update_after, 8, theirs.update_freq))    # the first: a copy
        expected = theirs.running_model.state_dict()
        averaged = ours.ema.averaged_state_dict()
        assert not torch.equal(averaged["transformer.wte.weight"], model.transformer.wte.weight)
        for name, value in averaged.items():
            # float32 on both sides, in different orders of operations: 2 ulps of 1.0 seen (2.4e-7); 2.5e-2
            # before theta_0 was the weights training begins with
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bema_resumes_bit_exact_and_a_restart_starts_from_the_resumed_weights(tmp_path):
    """BEMA's copy at the start of training is in its checkpoints: a run resumed from checkpoint-4
    ends with the uninterrupted run's BEMA bit for bit (no second copy); missing_state="restart"
    takes theta_0 from the weights it resumes with, and counts tau from that step."""
    def bema_run(name, resume=None, **kw):
        ema_cb = EMACallback(decay=BEMA(), update_every=2, **kw)
        Trainer(model=tiny_gpt2(), args=arguments(tmp_path / name, max_steps=6, save_strategy="steps", save_steps=2),
                train_dataset=Tokens(64, 0), callbacks=[ema_cb]).train(resume_from_checkpoint=resume)
        return ema_cb.ema

    whole = bema_run("a")
    resumed = bema_run("b", resume=str(tmp_path / "a" / "checkpoint-4"))
    assert whole.calls == resumed.calls == 7 and whole.plan.state() == resumed.plan.state()
    for n, t in whole.state_dict()["averaged"].items():             # every row: output, EMA, theta_0
        assert torch.equal(t, resumed.state_dict()["averaged"][n]), n
    os.remove(tmp_path / "a" / "checkpoint-4" / STATE_FILE)
    with pytest.warns(UserWarning, match="starts over"):
        restarted = bema_run("c", resume=str(tmp_path / "a" / "checkpoint-4"), missing_state="restart")
    assert restarted.calls == 3 and restarted.plan.first_time == 4
    at4 = GPT2LMHeadModel.from_pretrained(tmp_path / "a" / "checkpoint-4").state_dict()
    theta_0 = {n: rows[2] for n, rows in restarted.state_dict()["averaged"].items()}
    assert all(torch.equal(t, at4[n]) for n, t in theta_0.items())


def test_a_lora_model_averages_and_exports_only_its_adapters(tmp_path):
    """A PEFT LoRA model through the Trainer: the EMA's default for PEFT models averages the adapters
    only (the shadow is the adapters' size), and save_ema_model writes PEFT's own format (the
    model's save_pretrained) that PeftModel.from_pretrained loads with the averaged adapters."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    ema_cb = EMACallback(decay=0.5, save_ema_model=tmp_path / "ema")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*PEFT model averages only its trainable parameters.*")
        Trainer(model=model, args=arguments(tmp_path, max_steps=3, learning_rate=0.05), train_dataset=Tokens(32, 0),
                callbacks=[ema_cb]).train()
    averaged = ema_cb.ema.averaged_state_dict()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(ema_cb.ema.state_dict()["averaged"]) == sorted(trainable)
    assert (tmp_path / "ema" / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ema").state_dict()
    for n, p in trainable.items():
        assert torch.equal(loaded[n], averaged[n]) and not torch.equal(p, averaged[n]), n


def test_a_second_emacallback_is_refused_before_training(tmp_path):
    """Two EMACallbacks wrote one fastema_ema.safetensors: the second's took the first's place, and
    at a resume the first callback took the second's average and decay without a word. Refused when
    training begins, before a step, with the one-callback way to keep several decays (a Trainer that
    saves nothing takes several: test_bema_equals_trl_bemacallback_on_the_same_run)."""
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    two = [EMACallback(decay=0.9), EMACallback(decay=0.99)]
    saving = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = Trainer(model=model, args=saving, train_dataset=Tokens(8, 0), callbacks=two)
    with pytest.raises(ValueError, match=r"one EMACallback per Trainer that saves.*decay=\[0.99"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(pathlib.Path(tmp_path).glob("checkpoint-*"))
    one = EMACallback(decay=[0.9, 0.99])                  # the way it names: both decays, one file
    Trainer(model=model, args=arguments(tmp_path / "one", max_steps=2), train_dataset=Tokens(8, 0),
            callbacks=[one]).train()
    assert one.ema.updates == 2 and list(one.ema.decay) == [0.9, 0.99]


def test_bad_options_are_refused_at_construction():
    with pytest.raises(TypeError, match=r"unknown EMA option\(s\) \['decya'\]; the options are update_every, .*"
                                        r"trainable_only"):
        EMACallback(decya=0.9)
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=1.5)
    with pytest.raises(TypeError, match=r"unknown EMA option\(s\) \['warmup'\]"):      # decay=PowerWarmup(...) now
        EMACallback(decay=0.9, warmup="power")
    with pytest.raises(ValueError, match="decay= takes one kind of schedule for every average"):
        EMACallback(decay=[0.9, PowerWarmup(0.99)])
    with pytest.raises(ValueError, match=r"decay=BEMA\(\.\.\.\) keeps one average"):
        EMACallback(decay=BEMA(), debias=True)
    with pytest.raises(ValueError, match="missing_state"):
        EMACallback(missing_state="ignore")
    with pytest.raises(TypeError, match="eval_with_ema"):
        EMACallback(eval_with_ema="yes")


def test_fastema_does_not_import_transformers_and_the_extra_names_its_install(monkeypatch):
    code = ("import sys, fastema, fastema.torch; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'accelerate', 'peft'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "transformers", None)          # import transformers -> ImportError
    monkeypatch.delitem(sys.modules, "fastema.transformers")
    with pytest.raises(ImportError, match=re.escape('pip install "fastema[transformers]"')):
        importlib.import_module("fastema.transformers")


def test_accelerate_register_for_checkpointing(tmp_path):
    """accelerate's save_state/load_state carry the EMA (its state dict also loads with
    torch.load(weights_only=True)); steps replayed after load_state give the same shadow bit for bit."""
    from accelerate import Accelerator

    from fastema.torch import EMA

    accelerator = Accelerator(cpu=True)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, PowerWarmup(0.9))
    accelerator.register_for_checkpointing(ema)
    batches = Tokens(12, 0).ids.split(4)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()

    step(batches[0])
    accelerator.save_state(str(tmp_path / "state"))
    files = [p.name for p in (tmp_path / "state").iterdir()]
    assert "custom_checkpoint_0.pkl" in files, files
    saved = torch.load(tmp_path / "state" / "custom_checkpoint_0.pkl", weights_only=True)
    assert saved["calls"] == 1
    for ids in batches[1:]:
        step(ids)
    first = ema.state_dict()
    accelerator.load_state(str(tmp_path / "state"))
    assert ema.calls == 1
    for ids in batches[1:]:
        step(ids)
    again = ema.state_dict()
    assert again["calls"] == first["calls"] == 3
    for n, t in first["averaged"].items():
        assert torch.equal(t, again["averaged"][n]), n
    buffer = io.BytesIO()
    torch.save(again, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_the_guide_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "guides/transformers.md", "exec"), {})
    out = capsys.readouterr().out
    assert "eval_loss" in out and (tmp_path / "out" / "ema" / "config.json").is_file(), out


def _fsdp2_hooks(rank, world, out):
    """Rank body: the callback's hooks (as the Trainer calls them) on an FSDP2-sharded GPT-2: save at
    step 2, train to 4, export; then the weights of step 2 back, a new callback resumed from the
    folder (no Trainer in sight: its usual ``output_dir/checkpoint-<step>``) and the same 2 steps."""
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    model = tiny_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = arguments(out)
    state = TrainerState()

    def train(callback, first, last):
        for k in range(first, last):
            ids = Tokens(4, k).ids
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            state.global_step = k + 1
            callback.on_step_end(args, state, TrainerControl())

    def local(callback):
        return {f"{n}": v.to_local().clone() for n, v in callback.ema.state_dict()["averaged"].items()}

    first = EMACallback(decay=PowerWarmup(0.9, update_after_step=1), save_ema_model=os.path.join(out, "ema"))
    first.on_train_begin(args, state, TrainerControl(), model=model)
    train(first, 0, 2)
    os.makedirs(os.path.join(out, "checkpoint-2"), exist_ok=True)
    torch.distributed.barrier()
    first.on_save(args, state, TrainerControl())
    at2 = {n: p.to_local().clone() for n, p in model.named_parameters()}
    train(first, 2, 4)
    result = {f"first/{n}": v for n, v in local(first).items()}
    first.on_train_end(args, state, TrainerControl())
    result.update({f"full/{n}": v for n, v in first.ema.full_state_dict().items()})
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.to_local().copy_(at2[n])
    resumed = EMACallback(decay=PowerWarmup(0.9, update_after_step=1))
    state = TrainerState(global_step=2)
    resumed.on_train_begin(args, state, TrainerControl(), model=model)
    train(resumed, 2, 4)
    result.update({f"resumed/{n}": v for n, v in local(resumed).items()})
    result["sharded"] = torch.tensor(first.ema.sharded)
    return result


def test_fsdp2_ranks_save_their_shards_and_resume_bit_exact(tmp_path):
    """2 ranks, gloo, FSDP2: each rank writes its own file into the checkpoint folder and a resumed
    callback ends with the same shards bit for bit; save_ema_model gathers the full averaged model."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs gloo")
    from dist import run_ranks

    out = tmp_path / "out"
    ranks = run_ranks(_fsdp2_hooks, tmp_path / "run", 2, str(out))
    assert sorted(os.listdir(out / "checkpoint-2")) == ["fastema_ema-rank0-of-2.safetensors",
                                                        "fastema_ema-rank1-of-2.safetensors"]
    for r in ranks:
        assert bool(r["sharded"])
        for key in (k for k in r if k.startswith("first/")):
            assert torch.equal(r[key], r[key.replace("first/", "resumed/")]), key
    loaded = GPT2LMHeadModel.from_pretrained(out / "ema").state_dict()
    for key, value in ranks[0].items():
        if key.startswith("full/"):
            assert torch.equal(loaded[key[5:]], value), key


def _split_hooks(rank, world, out):
    """Rank body: the callback's hooks on a GPT-2 replicated over the ranks (the same weights and steps
    everywhere, as DDP keeps them), with EMACallback(shard_replicas=True): save at step 2 (a file a
    rank, its pieces), train to 4; the weights of step 2 back, a resumed callback and the same 2 steps;
    and an unsplit callback beside it all along, for the averages' bits."""
    from transformers import TrainerControl, TrainerState

    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = arguments(out)
    state = TrainerState()

    def train(callbacks, first, last):
        for k in range(first, last):
            ids = Tokens(4, k).ids
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            state.global_step = k + 1
            for callback in callbacks:
                callback.on_step_end(args, state, TrainerControl())

    split = EMACallback(decay=PowerWarmup(0.9), shard_replicas=True)
    whole = EMACallback(decay=PowerWarmup(0.9))
    for callback in (split, whole):
        callback.on_train_begin(args, state, TrainerControl(), model=model)
    train([split, whole], 0, 2)
    os.makedirs(os.path.join(out, "checkpoint-2"), exist_ok=True)
    torch.distributed.barrier()
    split.on_save(args, state, TrainerControl())
    at2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    train([split, whole], 2, 4)
    result = {f"split/{n}": v for n, v in split.ema.full_state_dict().items()}
    result.update({f"whole/{n}": v for n, v in whole.ema.full_state_dict().items()})
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(at2[n])
    resumed = EMACallback(decay=PowerWarmup(0.9), shard_replicas=True)
    state = TrainerState(global_step=2)
    resumed.on_train_begin(args, state, TrainerControl(), model=model)
    train([resumed], 2, 4)
    result.update({f"resumed/{n}": v for n, v in resumed.ema.full_state_dict().items()})
    result["held"] = torch.tensor([split.ema.nbytes, whole.ema.nbytes])
    return result


def _resume_elsewhere(rank, world, out, split):
    """Rank body: the weights of step 2 again (the same steps as :func:`_split_hooks`), a callback resumed
    from the folder that 2 ranks wrote, on ``world`` ranks, split over them or not; 2 steps on."""
    from transformers import TrainerControl, TrainerState

    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = arguments(out)
    resumed = None
    for k in range(4):
        if k == 2:
            resumed = EMACallback(decay=PowerWarmup(0.9), shard_replicas=split)
            resumed.on_train_begin(args, TrainerState(global_step=2), TrainerControl(), model=model)
        ids = Tokens(4, k).ids
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if resumed is not None:
            resumed.on_step_end(args, TrainerState(global_step=k + 1), TrainerControl())
    return {n: v for n, v in resumed.ema.full_state_dict().items()}


@pytest.mark.slow
def test_the_average_split_over_replicas_saves_a_file_a_rank_and_resumes_bit_exact(tmp_path):
    """2 ranks, gloo: EMACallback(shard_replicas=True) equals the unsplit callback, each rank writes its
    pieces into the checkpoint folder, and a resumed callback ends with the same average bit for bit: on
    the 2 ranks that wrote the files, on 3 ranks (each cuts its own range from the files that overlap
    it), and on 1, unsplit."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs gloo")
    from dist import run_ranks

    out = tmp_path / "out"
    ranks = run_ranks(_split_hooks, tmp_path / "run", 2, str(out))
    assert sorted(os.listdir(out / "checkpoint-2")) == ["fastema_ema-rank0-of-2.safetensors",
                                                        "fastema_ema-rank1-of-2.safetensors"]
    for r in ranks:
        assert int(r["held"][0]) < int(r["held"][1])
        for key in (k for k in r if k.startswith("split/")):
            assert torch.equal(r[key], r[key.replace("split/", "whole/")]), key
            assert torch.equal(r[key], r[key.replace("split/", "resumed/")]), key
    want = {k[len("whole/"):]: v for k, v in ranks[0].items() if k.startswith("whole/")}
    for world, split in ((3, True), (1, False)):
        for r in run_ranks(_resume_elsewhere, tmp_path / f"resume{world}{split}", world, str(out), split):
            assert list(r) == list(want) and all(torch.equal(r[k], want[k]) for k in want), (world, split)


@pytest.mark.parametrize("pieces", ["not json", '{"averaged/w": [0]}', '{"averaged/w": [-1, 4]}', "[1, 2]"])
def test_damaged_flat_ranges_of_a_split_file_are_refused_by_name(tmp_path, pieces):
    """A per-rank file of a split average names each tensor's flat range in its metadata; a resume on
    another world size reads them, and refuses (nothing loaded) a file whose ranges are unreadable."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastema._callback_files import _ranges

    path = str(tmp_path / "fastema_ema-rank0-of-2.safetensors")
    save_file({"averaged/w": torch.zeros(1, 4)}, path, metadata={"pieces": pieces})
    with safe_open(path, framework="pt") as f, pytest.raises(ValueError, match="damaged.*Nothing was loaded"):
        _ranges(f, path)
    save_file({"averaged/w": torch.zeros(1, 4)}, path, metadata={"pieces": '{"averaged/w": [2, 4]}'})
    with safe_open(path, framework="pt") as f:
        assert _ranges(f, path) == {"averaged/w": [2, 4]}


class Diverge(TrainerCallback):
    """A NaN in a weight at step ``at`` that only the EMA's update of that step reads (``undo``, a
    callback after the EMA's, puts the weight back): with ``skip_nonfinite`` off the average keeps it."""

    def __init__(self, at):
        self.at, self.kept = at, None
        self.undo = TrainerCallback()
        self.undo.on_step_end = self.put_back

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            self.weight = model.transformer.wte.weight
            with torch.no_grad():
                self.kept = self.weight[0, 0].clone()
                self.weight[0, 0] = float("nan")

    def put_back(self, args, state, control, **kw):
        if state.global_step == self.at:
            with torch.no_grad():
                self.weight[0, 0] = self.kept


class Repair(TrainerCallback):
    def __init__(self, ema_cb):
        self.ema_cb, self.repaired = ema_cb, None

    def on_train_begin(self, args, state, control, **kw):
        self.repaired = self.ema_cb.repair_nonfinite()


def test_a_poisoned_average_is_named_at_save_refused_at_the_export_and_resume_and_repaired(tmp_path):
    """The callback's whole road with a NaN in the average (issue 85 item 2): every save names it (a
    warning, the file's header), the end-of-training export and the resume refuse it by name, the
    resume with allow_nonfinite=True takes it, and repair_nonfinite() resets it from the weights."""
    from fastema._callback_files import read

    def trainer(cbs, out, steps=4):
        return Trainer(model=tiny_gpt2(), args=arguments(tmp_path / out, max_steps=steps, save_strategy="steps",
                                                         save_steps=4), train_dataset=Tokens(64, 0), callbacks=cbs)

    ema_cb = EMACallback(decay=0.9, save_ema_model=str(tmp_path / "ema"))
    with pytest.warns(RuntimeWarning, match="'transformer.wte.weight'"), \
            pytest.raises(ValueError, match=r"inf or NaN in 'transformer.wte.weight'.*repair_nonfinite"):
        diverge = Diverge(at=2)
        trainer([diverge, ema_cb, diverge.undo], "a").train()
    assert not (tmp_path / "ema").exists()             # the export refused: nothing written
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert read(str(ckpt / STATE_FILE))["nonfinite"] == ["transformer.wte.weight"]
    with pytest.raises(ValueError, match="'transformer.wte.weight' holds inf or NaN.*allow_nonfinite=True"):
        trainer([EMACallback(decay=0.9)], "b").train(resume_from_checkpoint=str(ckpt))
    resumed = EMACallback(decay=0.9, allow_nonfinite=True, save_ema_model=str(tmp_path / "ema"))
    repair = Repair(resumed)
    with pytest.warns(RuntimeWarning, match="allow_nonfinite"):
        trainer([resumed, repair], "c").train(resume_from_checkpoint=str(ckpt))   # one more step
    assert repair.repaired == ["transformer.wte.weight"]
    saved = GPT2LMHeadModel.from_pretrained(str(tmp_path / "ema"))
    assert all(torch.isfinite(p).all() for p in saved.parameters())
