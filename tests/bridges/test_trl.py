"""fastema.trl.RefSyncCallback against TRL's own reference/teacher sync, on the CPU.

- one sync, side by side with TRL's arithmetic (``SyncRefModelCallback._sync_target_model``: ``mul_`` then
  ``add_``) on the same weights: bit-equal at rates 0 and 1, within 1 ulp of the largest operand elsewhere, and
  equal bit for bit to a float32 ``torch.lerp`` (fastema's arithmetic);
- the direction of the rate (SDPO/SDFT's ``teacher_update_rate``, TR-DPO's ``ref_model_mixup_alpha``: the weight
  of the student) against a float64 reference: a test the inverted rate TRL's SDPO review found would fail;
- ``sync_steps`` in optimizer steps, gradient accumulation included, in a real transformers ``Trainer``;
- inside a real TRL ``DPOTrainer`` (TR-DPO, ``sync_ref_model=True``; a tiny LLaMA built from a config, a
  word-level tokenizer built here, no downloads): TRL's callback and this one on the same steps, and
  ``replace_sync`` driving the trainer's own reference;
- DDP, FSDP2 and DeepSpeed ZeRO-3 on 2 gloo ranks (no collective in a sync; ZeRO-3 against TRL's gathered sync);
- the spellings: read from the trainer's arguments, contradictions refused by name;
- the guide's examples (docs/guides/rl_teachers.md) run as written.
"""
import copy
import importlib.util
import pathlib
import re
import types

import pytest
import torch
import torch.distributed as dist
from dist import Counted
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("trl")

from trl.trainer.callbacks import SyncRefModelCallback  # noqa: E402

from fastema.trl import SPELLINGS, RefSyncCallback, replace_sync  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = [pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:trl.*")]

GUIDE = pathlib.Path(__file__).parents[2] / "docs" / "guides" / "rl_teachers.md"
VOCAB = 64
trl_sync = SyncRefModelCallback._sync_target_model         # TRL's arithmetic, as its callbacks run it


# ------------------------------------------------------------------------------------------ helpers

def ulp(x: torch.Tensor) -> torch.Tensor:
    """The float32 spacing at |x| (float64)."""
    x = x.detach().abs().float()
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).double()


def ulps(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, policy: torch.Tensor) -> float:
    """max |ours - theirs| in ulps of max(|ref|, |policy|, |policy - ref|): the largest value either
    arithmetic rounds (TRL's ref * (1 - a) and policy * a; the lerp's policy - ref)."""
    ref, policy = ref.detach().float(), policy.detach().float()
    scale = ulp(torch.stack([ref.abs(), policy.abs(), (policy - ref).abs()]).amax(0))
    return float(((ours.detach().double() - theirs.detach().double()).abs() / scale).max())


def params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def pair(seed=0, spread=1e-2):
    """A policy (an MLP) and a reference near it: every sign, every binade around the weights."""
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(spread * torch.randn_like(p))
    return policy, ref


def state(step):
    from transformers import TrainerState

    return TrainerState(global_step=step)


def tokenizer():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def preferences(n=16, seed=0):
    pytest.importorskip("datasets")
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB - 2, (k,), generator=g))

    return Dataset.from_dict({"prompt": [words(4) + " " for _ in range(n)], "chosen": [words(3) for _ in range(n)],
                              "rejected": [words(3) for _ in range(n)]})


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=1))


ALPHA, SYNC, ACCUM, STEPS = 0.6, 2, 2, 6          # TRL's default rate; syncs at optimizer steps 2, 4, 6


def dpo_trainer(tmp_path, **kw):
    from trl import DPOConfig, DPOTrainer

    opts = dict(per_device_train_batch_size=2, gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=5e-2,
                report_to=[], use_cpu=True, logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0, sync_ref_model=True, ref_model_mixup_alpha=ALPHA,
                ref_model_sync_steps=SYNC)
    opts.update(kw)
    model = tiny_llama()
    return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(str(tmp_path), **opts),
                      train_dataset=preferences(), processing_class=tokenizer())


class Micro(transformers.TrainerCallback):
    """Counts micro-batches (on_substep_end: those that end no optimizer step) and records the optimizer steps
    at which ``ref`` changed."""

    def __init__(self, ref):
        self.ref, self.before, self.micro, self.changed = ref, params(ref), 0, []

    def on_substep_end(self, args, state, control, **kw):
        self.micro += 1

    def on_step_end(self, args, state, control, model=None, **kw):
        self.micro += 1
        now = params(self.ref)
        if any(not torch.equal(now[n], self.before[n]) for n in now):
            self.changed.append(state.global_step)
        self.before = now


# ------------------------------------------------------------------------------------------ one sync

@pytest.mark.parametrize("alpha", [0.6, 0.05, 1 / 3, 0.5, 0.999, 0.0, 1.0])
def test_one_sync_against_trl_within_one_ulp(alpha):
    """The same policy and reference, one sync each: TRL's ``ref.mul_(1 - a).add_(policy, alpha=a)`` and
    RefSyncCallback's lerp agree bit for bit at rates 0 and 1 and on most elements otherwise, and never by
    more than 1 ulp of max(|ref|, |policy|, |policy - ref|); this callback's result is a float32
    torch.lerp bit for bit."""
    policy, ref = pair()
    theirs, ours = copy.deepcopy(ref), copy.deepcopy(ref)
    trl_sync(policy, theirs, alpha)
    args = types.SimpleNamespace(ref_model_mixup_alpha=alpha, ref_model_sync_steps=1)
    RefSyncCallback(ours).on_step_end(args, state(1), None, model=policy)
    p, r, t, o = params(policy), params(ref), params(theirs), params(ours)
    equal = sum(int((o[n] == t[n]).sum()) for n in o) / sum(v.numel() for v in o.values())
    worst = max(ulps(o[n], t[n], r[n], p[n]) for n in o)
    for n in o:
        assert torch.equal(o[n], torch.lerp(r[n], p[n], alpha)), n
    if alpha in (0.0, 1.0):
        assert worst == 0 and equal == 1.0
    else:
        assert worst <= 1.0, f"alpha={alpha}: {worst} ulp"
        assert equal > 0.5, f"alpha={alpha}: only {equal:.1%} of the elements bit-equal"


def test_float64_models_sync_in_float64():
    policy, ref = pair()
    policy, ref = policy.double(), ref.double()
    theirs, ours = copy.deepcopy(ref), copy.deepcopy(ref)
    trl_sync(policy, theirs, 0.05)
    RefSyncCallback(ours, update_rate=0.05, sync_steps=1).on_step_end(None, state(1), None, model=policy)
    for n, v in params(ours).items():
        assert v.dtype == torch.float64
        torch.testing.assert_close(v, params(theirs)[n], rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------ the direction

def test_the_teacher_update_rate_is_the_weight_of_the_student():
    """SDPO/SDFT's ``teacher_update_rate=0.05`` moves the teacher 5 % of the way to the student (TRL's review of
    its SDPO trainer found it passed as the retention: 95 %). Against float64, over 10 syncs towards a fixed
    student: ``t_k = s + 0.95**k * (t_0 - s)``, to float32 rounding; and TRL's own arithmetic agrees."""
    from trl.experimental.sdpo import SDPOConfig

    args = SDPOConfig("unused", teacher_update_rate=0.05, teacher_sync_steps=1, use_cpu=True, report_to=[])
    student, teacher = pair(spread=1.0)
    t0, s = {n: v.double() for n, v in params(teacher).items()}, {n: v.double() for n, v in params(student).items()}
    far = {n: (s[n] - t0[n]).abs() > 0.1 for n in s}               # elements the share moved is well defined on
    theirs = copy.deepcopy(teacher)
    callback = RefSyncCallback(teacher)
    callback.on_train_begin(args, state(0), None, model=student)
    assert callback.resolve(args) == (0.05, 1)
    for k in range(1, 11):
        callback.on_step_end(args, state(k), None, model=student)
        trl_sync(student, theirs, args.teacher_update_rate)
        got, trl_got = params(teacher), params(theirs)
        share = torch.cat([((got[n].double() - t0[n]) / (s[n] - t0[n]))[far[n]] for n in s])
        assert abs(float(share.mean()) - (1 - 0.95 ** k)) < 1e-5, k          # 5 %, 9.75 %, ...: not 95 %
        assert float((share - (1 - 0.95 ** k)).abs().max()) < 1e-4, k
        for n in got:
            exact = s[n] + 0.95 ** k * (t0[n] - s[n])                     # float64
            scale = ulp(torch.maximum(exact.abs(), torch.maximum(s[n].abs(), t0[n].abs())))
            assert float(((got[n].double() - exact).abs() / scale).max()) <= 4, (k, n)
            torch.testing.assert_close(got[n], trl_got[n], rtol=1e-5, atol=1e-6)
    assert abs(float(share.mean()) - 0.4013) < 1e-3                       # 10 syncs: 40.1 % of the way


# ------------------------------------------------------------------------------------------ sync_steps

@pytest.mark.slow
def test_sync_steps_count_optimizer_steps_with_gradient_accumulation(tmp_path):
    """A real transformers Trainer (tiny GPT-2 built from a config, tied embeddings), 3 micro-batches per
    optimizer step, 7 steps, ``sync_steps=3``: the reference changes at steps 3 and 6 only, and equals
    lerp(lerp(ref, policy@3), policy@6) bit for bit."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=8,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ref = copy.deepcopy(model).requires_grad_(False)
    start = params(ref)

    class Tokens(torch.utils.data.Dataset):
        ids = torch.randint(0, VOCAB, (64, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Policy(transformers.TrainerCallback):
        def __init__(self):
            self.seen = {}

        def on_step_end(self, args, state, control, model=None, **kw):
            self.seen[state.global_step] = params(model)

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=7,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no",
                             save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    sync, micro, policy = RefSyncCallback(ref, update_rate=0.3, sync_steps=3), Micro(ref), Policy()
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[sync, micro, policy])
    trainer.train()
    assert micro.micro == 21 and micro.changed == [3, 6] and sync.syncs == 2
    assert "lm_head.weight" not in sync.network.names["averaged"]                 # tied: synced once, as wte
    expect = {n: torch.lerp(torch.lerp(v, policy.seen[3][n], 0.3), policy.seen[6][n], 0.3) for n, v in start.items()}
    for n, v in params(ref).items():
        assert torch.equal(v, expect[n]), n
    assert ref.lm_head.weight is ref.transformer.wte.weight


# ------------------------------------------------------------------------------------------ DPOTrainer

class SideBySide(transformers.TrainerCallback):
    """Runs after TRL's SyncRefModelCallback (on the trainer's reference) and RefSyncCallback (on a spare copy)
    at every optimizer step: compares the two, then copies TRL's into the spare, so that every sync of both
    starts from the same weights."""

    def __init__(self, theirs, ours):
        self.theirs, self.ours, self.before = theirs, ours, params(theirs)
        self.worst, self.equal, self.total, self.changed = 0.0, 0, 0, []

    def on_step_end(self, args, state, control, model=None, **kw):
        policy, t, o = params(model), params(self.theirs), params(self.ours)
        if any(not torch.equal(t[n], self.before[n]) for n in t):
            self.changed.append(state.global_step)
            for n in t:
                self.worst = max(self.worst, ulps(o[n], t[n], self.before[n], policy[n]))
                self.equal += int((o[n] == t[n]).sum())
                self.total += t[n].numel()
        assert all(torch.equal(o[n], t[n]) for n in t) or self.changed[-1:] == [state.global_step]
        with torch.no_grad():
            for a, b in zip(self.ours.parameters(), self.theirs.parameters()):
                a.copy_(b)
        self.before = params(self.theirs)


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    """TR-DPO in a real DPOTrainer, TRL's own SyncRefModelCallback syncing the trainer's reference, and
    RefSyncCallback beside it on a spare copy (SideBySide after both)."""
    trainer = dpo_trainer(tmp_path_factory.mktemp("dpo-trl"))
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks][-1] == "SyncRefModelCallback"
    spare = copy.deepcopy(trainer.ref_model)
    ours = RefSyncCallback(spare, trainer.accelerator)
    side = SideBySide(trainer.ref_model, spare)
    micro = Micro(trainer.ref_model)
    for cb in (ours, side, micro):
        trainer.add_callback(cb)
    trainer.train()
    return types.SimpleNamespace(trainer=trainer, ours=ours, side=side, micro=micro, ref=params(trainer.ref_model))


@pytest.mark.slow
def test_dpo_trainer_side_by_side_with_trls_callback(trl_run):
    """Every sync of the trainer's run: this callback within 1 ulp of TRL's, most elements bit-equal, at the
    same steps (2, 4, 6 of 6, two micro-batches each), the rate and period read from DPOConfig."""
    side, ours = trl_run.side, trl_run.ours
    assert side.changed == [2, 4, 6] and trl_run.micro.micro == STEPS * ACCUM
    assert ours.syncs == 3 and ours.resolve(trl_run.trainer.args) == (ALPHA, SYNC)
    assert side.worst <= 1.0, side.worst
    assert side.equal / side.total > 0.5, side.equal / side.total


@pytest.mark.slow
def test_replace_sync_drives_the_dpo_reference(tmp_path, trl_run):
    """``replace_sync(trainer)``: TRL's callback out, RefSyncCallback in, syncing the reference the DPO loss
    reads: at steps 2, 4, 6 the reference is lerp(reference, policy, 0.6) bit for bit, unchanged between;
    after 6 steps it is TRL's run's reference to float32 noise (the loss reads each run's own)."""
    trainer = dpo_trainer(tmp_path)
    ours = replace_sync(trainer)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert "SyncRefModelCallback" not in names and names[-1] == "RefSyncCallback"

    class Lerp(transformers.TrainerCallback):
        def __init__(self, ref):
            self.ref, self.expect, self.mismatch = ref, params(ref), []

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % SYNC == 0:
                policy = params(model)
                self.expect = {n: torch.lerp(v, policy[n], ALPHA) for n, v in self.expect.items()}
            self.mismatch += [(state.global_step, n) for n, v in params(self.ref).items()
                              if not torch.equal(v, self.expect[n])]

    check = Lerp(trainer.ref_model)
    trainer.add_callback(check)
    trainer.train()
    assert ours.syncs == 3 and check.mismatch == []
    for n, v in params(trainer.ref_model).items():
        torch.testing.assert_close(v, trl_run.ref[n], rtol=1e-4, atol=1e-5)


def test_replace_sync_refuses_a_trainer_without_trls_sync():
    trainer = types.SimpleNamespace(callback_handler=types.SimpleNamespace(callbacks=[]))
    with pytest.raises(ValueError, match="no SyncRefModelCallback.*sync_ref_model=True"):
        replace_sync(trainer)


# ------------------------------------------------------------------------------------------ spellings

def _config(**kw):
    from trl import DPOConfig

    return DPOConfig("unused", use_cpu=True, report_to=[], **kw)


def test_the_spellings_and_their_contradictions_are_refused_by_name():
    assert SPELLINGS == {"update_rate": ("ref_model_mixup_alpha", "teacher_update_rate"),
                         "sync_steps": ("ref_model_sync_steps", "teacher_sync_steps")}
    ref = nn.Linear(2, 2)
    # DPOConfig's defaults (0.6, 512) are TRL's; the constructor's values win over defaults
    assert RefSyncCallback(ref).resolve(_config()) == (0.6, 512)
    assert RefSyncCallback(ref, update_rate=0.05, sync_steps=1).resolve(_config()) == (0.05, 1)
    assert RefSyncCallback(ref, update_rate=0.3).resolve(_config(ref_model_mixup_alpha=0.3)) == (0.3, 512)
    with pytest.raises(ValueError, match=r"update_rate=0.05.*args.ref_model_mixup_alpha=0.3"):
        RefSyncCallback(ref, update_rate=0.05).resolve(_config(ref_model_mixup_alpha=0.3))
    with pytest.raises(ValueError, match=r"sync_steps=4.*args.ref_model_sync_steps=8"):
        RefSyncCallback(ref, sync_steps=4).resolve(_config(ref_model_sync_steps=8))
    both = types.SimpleNamespace(ref_model_mixup_alpha=0.05, teacher_update_rate=0.95, ref_model_sync_steps=1)
    with pytest.raises(ValueError, match=r"args.ref_model_mixup_alpha=0.05 and args.teacher_update_rate=0.95"):
        RefSyncCallback(ref).resolve(both)
    agree = types.SimpleNamespace(ref_model_mixup_alpha=0.05, teacher_update_rate=0.05, teacher_sync_steps=2)
    assert RefSyncCallback(ref).resolve(agree) == (0.05, 2)
    with pytest.raises(ValueError, match=r"no update_rate.*ref_model_mixup_alpha or teacher_update_rate"):
        RefSyncCallback(ref).resolve(types.SimpleNamespace())
    with pytest.raises(ValueError, match=r"args.teacher_update_rate must be a number in \[0, 1\]"):
        RefSyncCallback(ref).resolve(types.SimpleNamespace(teacher_update_rate=1.5, teacher_sync_steps=1))
    with pytest.raises(ValueError, match=r"args.ref_model_sync_steps must be an int >= 1"):
        RefSyncCallback(ref).resolve(types.SimpleNamespace(ref_model_mixup_alpha=0.5, ref_model_sync_steps=0))
    for bad in ({"update_rate": -0.1}, {"update_rate": True}, {"sync_steps": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RefSyncCallback(ref, **bad)
    for own in ("tau", "momentum", "update_every", "compensate"):
        with pytest.raises(TypeError, match=f"does not take {own}="):
            RefSyncCallback(ref, **{own: 0.5})
    with pytest.raises(TypeError, match=r"unknown TargetNetwork option\(s\) \['decay'\]"):
        RefSyncCallback(ref, decay=0.9)
    with pytest.raises(TypeError, match="nothing to sync"):
        RefSyncCallback(None)


def test_an_accelerator_running_zero3_is_taken():
    """accelerate's DeepSpeed plugin at stage 3 (what TRL reads to take its gathered path): taken like any other
    stage, the network made when training begins (the 2-rank test below syncs real ZeRO-3 engines)."""
    from accelerate.utils import DeepSpeedPlugin

    def accelerator(stage):
        return types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(zero_stage=stage)))

    for stage in (2, 3):
        assert RefSyncCallback(nn.Linear(2, 2), accelerator(stage)).network is None


def test_the_policy_is_unwrapped_and_a_new_policy_makes_a_new_network():
    policy, ref = pair()
    callback = RefSyncCallback(ref, update_rate=0.5, sync_steps=1)
    compiled = torch.compile(policy)            # wrapped: never run, only looked through
    callback.on_train_begin(None, state(0), None, model=compiled)
    assert callback.network.online is policy
    other, _ = pair(seed=1)
    callback.on_step_end(None, state(1), None, model=other)
    assert callback.network.online is other and callback.syncs == 1
    with pytest.raises(ValueError, match="target is the online network itself"):
        RefSyncCallback(policy, update_rate=0.5, sync_steps=1).on_train_begin(None, state(0), None, model=policy)


def test_buffers_are_left_alone_as_trl_does_unless_asked():
    policy, ref = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    policy.running_mean.fill_(3.0)
    RefSyncCallback(ref, update_rate=0.5, sync_steps=1).on_step_end(None, state(1), None, model=policy)
    assert float(ref.running_mean.abs().max()) == 0.0
    RefSyncCallback(ref, update_rate=0.5, sync_steps=1, buffers="copy").on_step_end(None, state(1), None,
                                                                                      model=policy)
    assert torch.equal(ref.running_mean, policy.running_mean)


# ------------------------------------------------------------------------------------------ distributed

def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _ddp_fsdp2(rank, world):
    """Rank body: DDP, then FSDP2 (the policy sharded per layer and at the root, the references at the root
    only, as TRL's prepare_fsdp does): 4 optimizer steps, a sync at 2 and 4 by TRL's arithmetic and by
    RefSyncCallback, every sync from the same weights (ours reset to TRL's after each)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    args = types.SimpleNamespace(ref_model_mixup_alpha=ALPHA, ref_model_sync_steps=2)
    for kind in ("ddp", "fsdp2"):
        policy = _mlp(1)
        theirs = copy.deepcopy(policy).requires_grad_(False)
        with torch.no_grad():
            for p in theirs.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        ours = copy.deepcopy(theirs)
        if kind == "ddp":
            wrapped = DDP(policy)
        else:
            for layer in policy:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            wrapped = fully_shard(policy)
            fully_shard(theirs)
            fully_shard(ours)
        callback = RefSyncCallback(ours)
        callback.on_train_begin(args, state(0), None, model=wrapped)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        worst, exact, calls, changed = 0.0, True, [], []
        for step in range(1, 5):
            g = torch.Generator().manual_seed(100 * step + rank)
            (wrapped(torch.randn(6, 8, generator=g)) - 1).square().mean().backward()
            opt.step()
            opt.zero_grad()
            before = {n: _local(p).detach().clone() for n, p in ours.named_parameters()}
            if step % args.ref_model_sync_steps == 0:
                trl_sync(wrapped, theirs, args.ref_model_mixup_alpha)
            with Counted() as c:
                callback.on_step_end(args, state(step), None, model=wrapped)
            calls += c.calls
            pol = {n: _local(p).detach() for n, p in policy.named_parameters()}
            now = {n: _local(p).detach().clone() for n, p in ours.named_parameters()}
            if any(not torch.equal(now[n], before[n]) for n in now):
                changed.append(step)
                for n, p in theirs.named_parameters():
                    worst = max(worst, ulps(now[n], _local(p), before[n], pol[n]))
                    exact &= torch.equal(now[n], torch.lerp(before[n], pol[n], ALPHA))
            with torch.no_grad():
                for a, b in zip(ours.parameters(), theirs.parameters()):
                    _local(a).copy_(_local(b))
        out[f"{kind}/worst"] = torch.tensor(worst)
        out[f"{kind}/exact"] = torch.tensor(exact)
        out[f"{kind}/collectives"] = torch.tensor(len(calls))
        out[f"{kind}/changed"] = torch.tensor(changed)
        for n, p in ours.named_parameters():
            out[f"{kind}/ref/{n}"] = p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach().clone()
        dist.barrier()
    if importlib.util.find_spec("deepspeed") is not None:
        out.update(_zero3(rank, world))
    return out


def _valid(p):
    """This rank's ZeRO-3 partition of ``p`` without its padding (a view)."""
    size = p.ds_tensor.numel()
    return p.ds_tensor[:max(0, min(size, p.ds_numel - dist.get_rank() * size))]


def _zero3(rank, world):
    """A ZeRO-3 policy engine and two ZeRO-3 reference engines made as TRL's prepare_deepspeed makes them (the
    policy's stage-3 config, no optimizer, a larger persistence threshold): TRL's own ZeRO-3 sync
    (``SyncRefModelCallback.sync_target_model``: every parameter of both gathered, the sync on rank 0, broadcast
    back) on one, RefSyncCallback on the other, at steps 2 and 4, each sync from the same partitions (ours reset
    to TRL's after each); the references run a forward every step (their persistent parameters, the biases and
    the first weight, stay gathered between)."""
    import trl.trainer.callbacks as trl_callbacks
    from dist import deepspeed_on_cpu

    deepspeed = deepspeed_on_cpu(rank, world)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 64}}
    policy = _mlp(1)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.SGD(policy.parameters(), lr=0.1),
                                      config=cfg)

    def reference():
        ref = _mlp(1)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        # prepare_deepspeed's config: the policy's, the persistence threshold 10 x hidden size (32)
        ref_cfg = {**cfg, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 320}}
        return deepspeed.initialize(model=ref, config=ref_cfg)[0]

    theirs, ours = reference(), reference()
    # TRL takes its ZeRO-3 path when accelerate's state says stage 3, as a trainer launched on ZeRO-3 sets it
    saved = trl_callbacks.AcceleratorState
    trl_callbacks.AcceleratorState = lambda: types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=3))
    args = types.SimpleNamespace(ref_model_mixup_alpha=ALPHA, ref_model_sync_steps=2)
    callback = RefSyncCallback(ours, update_rate=ALPHA, sync_steps=2)
    worst, exact, calls, theirs_calls, changed = 0.0, True, [], [], []
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    try:
        callback.on_train_begin(args, state(0), None, model=engine)
        for step in range(1, 5):
            g = torch.Generator().manual_seed(100 * step + rank)
            engine.backward((engine(torch.randn(4, 8, generator=g)) - 1).square().mean())
            engine.step()
            with torch.no_grad():
                theirs(x), ours(x)
            before = [_valid(p).clone() for p in ours.module.parameters()]
            pol = [_valid(p) for p in policy.parameters()]
            if step % args.ref_model_sync_steps == 0:
                with Counted() as c:
                    SyncRefModelCallback.sync_target_model(policy, theirs.module, ALPHA)
                theirs_calls += c.calls
            with Counted() as c:
                callback.on_step_end(args, state(step), None, model=engine)
            calls += c.calls
            now = [_valid(p).clone() for p in ours.module.parameters()]
            if any(not torch.equal(a, b) for a, b in zip(now, before)):
                changed.append(step)
                for a, t, b, q in zip(now, theirs.module.parameters(), before, pol):
                    worst = max(worst, ulps(a, _valid(t), b, q))
                    exact &= torch.equal(a, torch.lerp(b, q, ALPHA))
                with torch.no_grad():                  # the synced reference's forward: persistent ones gathered anew
                    forward = torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                for a, b in zip(ours.module.parameters(), theirs.module.parameters()):
                    _valid(a).copy_(_valid(b))
            held = [p for p in ours.module.parameters() if p.ds_status.name == "AVAILABLE"]
            if held:                                   # their gathered copies: stale now, released
                held[0].partition(param_list=held)
    finally:
        trl_callbacks.AcceleratorState = saved
    return {"zero3/worst": torch.tensor(worst), "zero3/exact": torch.tensor(exact),
            "zero3/collectives": torch.tensor(len(calls)), "zero3/trl_collectives": torch.tensor(len(theirs_calls)),
            "zero3/changed": torch.tensor(changed), "zero3/forward": torch.tensor(forward),
            "zero3/shard_local": torch.tensor(sum(_valid(p).numel() for p in ours.module.parameters()) <
                                              sum(p.ds_numel for p in ours.module.parameters()))}


@pytest.mark.slow
def test_ddp_fsdp2_and_zero3_on_two_gloo_ranks(tmp_path):
    """DDP, FSDP2 and DeepSpeed ZeRO-3 (on the CPU accelerator, where deepspeed is installed), 2 gloo ranks: the
    reference syncs at steps 2 and 4, each sync a float32 lerp of the local shards or partitions bit for bit,
    within 1 ulp of TRL's (its ZeRO-3 path: gathered, synced on rank 0, broadcast), with no collective where
    TRL's makes some; the ranks' full references agree."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    from dist import run_ranks

    ranks = run_ranks(_ddp_fsdp2, tmp_path, 2)
    if importlib.util.find_spec("deepspeed") is not None:
        for r in ranks:
            assert r["zero3/changed"].tolist() == [2, 4] and bool(r["zero3/exact"]) and bool(r["zero3/shard_local"])
            assert float(r["zero3/worst"]) <= 1.0, float(r["zero3/worst"])
            assert int(r["zero3/collectives"]) == 0 and int(r["zero3/trl_collectives"]) > 0
            assert bool(r["zero3/forward"])
    for kind in ("ddp", "fsdp2"):
        for r in ranks:
            assert r[f"{kind}/changed"].tolist() == [2, 4], kind
            assert bool(r[f"{kind}/exact"]), kind
            assert float(r[f"{kind}/worst"]) <= 1.0, (kind, float(r[f"{kind}/worst"]))
            assert int(r[f"{kind}/collectives"]) == 0, kind
        for key in (k for k in ranks[0] if k.startswith(f"{kind}/ref/")):
            assert torch.equal(ranks[0][key], ranks[1][key]), key


# ------------------------------------------------------------------------------------------ the guide

def _guide_block(heading: str) -> str:
    return re.search(re.escape(heading) + r".*?```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)


@pytest.mark.slow
def test_guide_tr_dpo_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    pytest.importorskip("tokenizers")
    monkeypatch.chdir(tmp_path)
    exec(compile(_guide_block("## TR-DPO"), "rl_teachers.md TR-DPO", "exec"), {})
    out = capsys.readouterr().out
    m = re.search(r"syncs 3, reference moved (\d\.\d+) of the way", out)
    assert m and 0 < float(m.group(1)) < 1, out


def test_guide_ema_teacher_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_guide_block("## An EMA teacher"), "rl_teachers.md EMA teacher", "exec"), {})
    out = capsys.readouterr().out
    m = re.search(r"teacher syncs 8, teacher = lerp\(student\): (True|False)", out)
    assert m and m.group(1) == "True", out
