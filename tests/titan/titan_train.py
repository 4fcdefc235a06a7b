"""A torchtitan 0.3.0 training run on the CPU, as its Trainer builds one: a small model with llama-style
names, ``OptimizersContainer`` (AdamW), ``LRSchedulersContainer`` (warm-up, then linear decay), the EMA
(fastema's, or main's for comparison) stepped after them, and ``CheckpointManager`` with the EMA under the
state key ``"ema"``; FSDP2 (``fully_shard``) on the gloo ranks of a world when asked. The rank bodies of
the tests live here (module-level functions: the worlds pickle them by name)."""
from __future__ import annotations

import torch
from torch import nn

from fastema.torchtitan import EMA, STATE_KEY

CFG = dict(decays=[0.99], half_life_fractions=[0.1], start_step=2, step_bias=1, update_every_n_steps=2)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = nn.ModuleDict({"wq": nn.Linear(dim, dim, bias=False), "wo": nn.Linear(dim, dim, bias=False)})
        self.feed_forward = nn.ModuleDict({"w1": nn.Linear(dim, 2 * dim, bias=False),
                                           "w2": nn.Linear(2 * dim, dim, bias=False)})

    def forward(self, x):
        h = self.attention_norm(x)
        x = x + self.attention["wo"](torch.tanh(self.attention["wq"](h)))
        return x + self.feed_forward["w2"](torch.relu(self.feed_forward["w1"](x)))


class Tiny(nn.Module):
    """Embeddings, two blocks, a norm and an output head: llama's names (tok_embeddings, layers.0...)."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim) for i in range(2)})
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            x = layer(x)
        return self.output(self.norm(x))


class TrainState:
    """The trainer's step, a DCP Stateful (torchtitan's Trainer keeps it under "train_state")."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def run(folder: str | None, steps: int, *, save_at: int = 0, until: int | None = None, fsdp: bool = False,
        ema_kind: str = "fastema"):
    """A run of ``steps`` steps (the LR schedule's length) trained to ``until`` (default: the end), from
    the checkpoint in ``folder`` when there is one, saving at ``save_at``; returns ``(model, ema, state)``."""
    from torchtitan.components.checkpointer import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer, default_adamw

    torch.use_deterministic_algorithms(True)
    model = Tiny()
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
    optimizers = OptimizersContainer(default_adamw(lr=1e-2, implementation="for-loop"), model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=steps)
    if ema_kind == "fastema":
        ema = EMA.Config(**CFG).build(model_parts=[model])
    else:
        from titan_upstream import MainEMA

        ema = MainEMA([model], **CFG)
    state = TrainState()
    manager = None
    if folder is not None:
        manager = CheckpointManager.Config(enable=True, folder="checkpoint", interval=max(save_at, 1),
                                           keep_latest_k=0, last_save_model_only=False).build(
            dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
            states={"train_state": state, STATE_KEY: ema}, sd_adapter=None, base_folder=folder)
        manager.load()
    tokens = torch.arange(64).reshape(4, 16) % 32
    while state.step < (steps if until is None else until):
        state.step += 1
        optimizers.zero_grad()
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizers.step()
        schedulers.step()
        ema.step(state.step)
        if manager is not None and state.step == save_at:
            manager.save(state.step)
    if manager is not None:
        manager.close()
    return model, ema, state


def rows(ema) -> dict:
    """Every copy of every tracked tensor, full tensors (gathered from a sharded EMA: a collective)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in ema.state_dict().items():
        out[name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
    return out


def ranked_run(rank: int, world: int, folder: str, steps: int, save_at: int, until: int, fsdp: bool) -> dict:
    """A rank body: :func:`run` on this world's ranks, the EMA's copies gathered."""
    _, ema, state = run(folder or None, steps, save_at=save_at, until=until, fsdp=fsdp)
    assert state.step == until
    return rows(ema)


def _local_rows(rank: int, world: int, step: int, n: int = 6) -> torch.Tensor:
    """This rank's rows of the global ``(n, 3)`` weight after ``step`` steps (the same on any world size;
    ``torch.chunk``'s split, DTensor's: 5 rows on 2 ranks are 3 and 2)."""
    full = torch.arange(3 * n, dtype=torch.float32).reshape(n, 3) * 0.1 + step * 0.25 + step ** 2 * 0.01
    return full.chunk(world, dim=0)[rank].clone()


def spmd_save(rank: int, world: int, folder: str, steps: int) -> dict:
    """Plain local shards with layout metadata (torchtitan's spmd_types backend): each rank's parameters
    hold their rows of a ``(6, 3)`` weight and of a ``(5, 3)`` one (uneven shards: its global shape given);
    the EMA is told the layouts (checked against the shards at build); ``dcp.save``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
    part = nn.Module()
    part.w = nn.Parameter(_local_rows(rank, world, 0))
    part.u = nn.Parameter(_local_rows(rank, world, 0, 5))
    layouts = {"w": (mesh, [Shard(0)]), "u": (mesh, [Shard(0)], (5, 3))} if mesh is not None else None
    ema = EMA.Config(decays=[0.5], half_life_fractions=[0.3]).build(model_parts=[part], layouts=layouts)
    for step in range(1, steps + 1):
        with torch.no_grad():
            part.w.copy_(_local_rows(rank, world, step))
            part.u.copy_(_local_rows(rank, world, step, 5))
        ema.step(step)
    dcp.save({STATE_KEY: ema}, checkpoint_id=folder)
    if dist.is_initialized():
        dist.barrier()
    return rows(ema)


def spmd_load(rank: int, world: int, folder: str) -> dict:
    """Load what :func:`spmd_save` wrote (any world size) into this world's layout; the copies gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
    part = nn.Module()
    part.w = nn.Parameter(torch.zeros_like(_local_rows(rank, world, 0)))
    part.u = nn.Parameter(torch.zeros_like(_local_rows(rank, world, 0, 5)))
    layouts = {"w": (mesh, [Shard(0)]), "u": (mesh, [Shard(0)], (5, 3))} if mesh is not None else None
    ema = EMA.Config(decays=[0.5], half_life_fractions=[0.3]).build(model_parts=[part], layouts=layouts)
    dcp.load({STATE_KEY: ema}, checkpoint_id=folder)
    return rows(ema)


def fsdp2_loads(rank: int, world: int, folder: str) -> dict:
    """FSDP2 on this world's ranks, issue 85 M1 and H1: a state dict finite but in rank 1's shard, loaded on
    every rank (then a cold start on rank 0 alone beside a load on the others): what each rank raises, the
    copies after (gathered); whether the shadow reads the DTensors' own local tensors; a local tensor
    replaced (as FSDP2's ``reset_sharded_param`` does) and trained: the copy after a firing; the copies
    exported to ``folder`` (every rank gathers, rank 0 writes)."""
    from torch.distributed.fsdp import fully_shard

    from fastema.torchtitan import export_hf

    model = Tiny()
    for layer in model.layers.values():
        fully_shard(layer)
    fully_shard(model)
    ema = EMA.Config(decays=[0.5]).build(model_parts=[model])
    out: dict = {"own": torch.tensor([s is t.tensor._local_tensor for s, t in zip(ema.shadow.sources, ema.tracked)])}
    before = rows(ema)
    clean = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    state = {k: v.clone() for k, v in clean.items()}
    if rank == 1:
        with torch.no_grad():
            state["state.norm.weight.ema_params.decay_0p5"].to_local()[0] = float("nan")
    for case, given in (("nan", state), ("cold", {} if rank == 0 else clean)):
        try:
            ema.load_state_dict(given)
            out[case] = ""
        except ValueError as err:
            out[case] = f"{type(err).__name__}: {err}"
    after = rows(ema)
    out["kept"] = torch.tensor([torch.equal(after[k], before[k]) for k in before])
    p = model.tok_embeddings.weight
    with torch.no_grad():
        p._local_tensor = p._local_tensor.clone()
        p._local_tensor.add_(8)
    ema.step(1)
    out["rows"] = rows(ema)
    out["moved"] = (out["rows"]["state.tok_embeddings.weight.ema_params.decay_0p5"]
                    - before["state.tok_embeddings.weight.ema_params.decay_0p5"])
    out["followed"] = torch.tensor(ema.shadow.sources[0] is p._local_tensor)
    export_hf(ema, folder)
    return out
