"""``ema.attach(optimizer)`` under real trainers on the CPU, with no fastema callback: HF Trainer
(``optimizer.pt``, loaded with ``weights_only=True``) and Lightning (the ``.ckpt``'s optimizer
states) save the average with the optimizer and resume it bit for bit against an uninterrupted
run, a float32 average of bfloat16 weights included (HF)."""
import warnings

import pytest
import torch
from support.attach import regression_data, regressor

from fastema.torch import ATTACH_KEY, EMA

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*loss_type.*")


def same_average(a, b):
    x, y = a.state_dict(), b.state_dict()
    counters = [{k: v for k, v in s.items() if k != "averaged"} for s in (x, y)]
    assert counters[0] == counters[1]
    return all(torch.equal(t, y["averaged"][n]) for n, t in x["averaged"].items())


# ------------------------------------------------------------ HF Trainer


def hf_run(tmp_path, name, resume=None):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_transformers import Tokens, arguments, tiny_gpt2

    transformers.logging.set_verbosity_error()
    model = tiny_gpt2().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.9, shadow_dtype="float32").attach(opt)
    args = arguments(tmp_path / name, max_steps=4, save_strategy="steps", save_steps=2, bf16=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(32, 0),
                                   optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, ema


def test_hf_trainer_saves_and_resumes_the_attached_average_bit_for_bit(tmp_path):
    model, ema = hf_run(tmp_path, "a")
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    avg = saved[ATTACH_KEY]["averaged"]
    assert saved[ATTACH_KEY]["updates"] == 2 and all(t.dtype == torch.float32 for t in avg.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in avg.values())
    resumed_model, resumed = hf_run(tmp_path, "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.updates == ema.updates == 4
    assert same_average(resumed, ema)
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), model.parameters()))


# ------------------------------------------------------------ Lightning


def lightning_run(tmp_path, epochs, ckpt=None, save=False, ema_kw=None, extra=()):
    """A regressor with an EMA (``EMA(self, 0.9, **ema_kw)``) attached in configure_optimizers."""
    pl = pytest.importorskip("pytorch_lightning")
    data = regression_data(32, 0)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    callbacks = ([ckpt_cb] if save else []) + list(extra)
    module = regressor(ema_kw=ema_kw or {})
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=save, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, data, ckpt_path=ckpt)
    return module


def test_lightning_saves_and_resumes_the_attached_average_bit_for_bit(tmp_path):
    full = lightning_run(tmp_path / "full", 2)
    first = lightning_run(tmp_path / "a", 1, save=True)
    ckpt = torch.load(tmp_path / "a" / "ck" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0][ATTACH_KEY]["updates"] == first.ema.updates == 4
    resumed = lightning_run(tmp_path / "b", 2, ckpt=tmp_path / "a" / "ck" / "last.ckpt")
    assert resumed.ema.updates == full.ema.updates == 8
    assert same_average(resumed.ema, full.ema)


def test_lightning_reads_gather_attached_before_the_optimizers_state(tmp_path):
    """What ``fastema.lightning.GatherAttached`` relies on, in Lightning's own ``dump_checkpoint``:
    every callback's ``state_dict()`` before ``optimizer.state_dict()``; and ``"ema"`` found on
    the module (made in ``configure_optimizers``, after the callback's ``setup``)."""
    from fastema.lightning import GatherAttached

    order: list = []

    class Spy(GatherAttached):
        def state_dict(self):
            order.append("callback")
            ema = getattr(self.module, self.ema)
            assert ema.attached is not None        # the attribute is found: the attached average
            return super().state_dict()

    module = lightning_run(tmp_path, 1, extra=[Spy("ema")])
    module.ema.attached.register_state_dict_pre_hook(lambda opt: order.append("optimizer"))
    module.trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert order == ["callback", "optimizer"]
