"""Run by tests/bridges/test_lightning.py under torchrun (2 ranks, gloo, the DDP strategy): an EMA
made in ``configure_optimizers`` split over the ranks (``shard_replicas=True``) and attached to the
optimizer, with ``fastema.lightning.GatherAttached("ema")``. Fit 2 epochs uninterrupted; fit 1
epoch writing Lightning's ``last.ckpt`` (rank 0 writes), then ``fit(ckpt_path=)`` in a fresh
Trainer to 2 epochs. Each rank writes (result-RANK.txt) the gathered averages' digests (less the
split run's id, written apart), the models', the updates, the bytes it holds and what the
``.ckpt`` holds."""
import hashlib
import os
import pathlib
import sys
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # tests/: support's scenarios
from support.attach import regression_data, regressor  # noqa: E402

from fastema.lightning import GatherAttached  # noqa: E402
from fastema.torch import ATTACH_KEY, EMA  # noqa: E402

warnings.filterwarnings("ignore")


def digest(state, h=None):
    """sha256 over every entry of a (nested) state dict: the tensors' bytes, the rest's repr."""
    h = h or hashlib.sha256()
    for key in sorted(state, key=str):
        value = state[key]
        h.update(repr(key).encode())
        if isinstance(value, dict):
            digest(value, h)
        elif isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h


def fit(name: str, epochs: int, save: bool = False, ckpt=None):
    data = regression_data(64, 1)
    root = os.path.join(os.getcwd(), name)
    callbacks = [GatherAttached("ema")]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ck"),
                                                      save_last=True))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs,
                         logger=False, callbacks=callbacks, enable_checkpointing=save,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    module = regressor(ema_kw={"shard_replicas": True})
    trainer.fit(module, data, ckpt_path=ckpt)
    ema = module.ema
    gathered = ema.gathered_state_dict()                    # a collective: every rank
    run = gathered.pop("split_id")              # this split run's id (a load takes the file's)
    return (f"updates={ema.updates} split={ema.split} held={ema.nbytes} run={run} "
            f"average={digest(gathered).hexdigest()[:32]} "
            f"model={digest(module.state_dict()).hexdigest()[:32]}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    full = fit("full", 2)
    first = fit("a", 1, save=True)
    last = os.path.join(os.getcwd(), "a", "ck", "last.ckpt")
    torch.distributed.barrier()
    saved = torch.load(last, weights_only=True)              # the .ckpt rank 0 wrote
    held = saved["optimizer_states"][0][ATTACH_KEY]
    whole = all(type(v) is torch.Tensor for v in held["averaged"].values())
    resumed = fit("b", 2, ckpt=last)
    unsplit = EMA(regressor(), 0.9).nbytes                  # the same average, not split
    line = (f"rank {os.environ['RANK']} unsplit={unsplit} full {full} | first {first} "
            f"ckpt_updates={held['updates']} ckpt_run={held['split_id']} whole={whole} "
            f"| resumed {resumed}")
    with open(f"result-{os.environ['RANK']}.txt", "w") as f:    # a file: the ranks' lines on stdout
        f.write(line + "\n")                                   # could interleave in the one pipe
    # as lightning_ddp_script.py: a barrier and the group torn down here, then no interpreter
    # teardown (gloo's and Lightning's threads aborted a rank at exit under CI's load)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
