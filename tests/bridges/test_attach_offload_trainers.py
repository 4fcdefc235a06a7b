"""``ema.attach(optimizer)`` with ``offload="cpu"`` under Lightning, with no fastema callback: a
``fit(ckpt_path=...)`` resume leaves the average offloaded (the host shadow and the staging chunks,
as before the save) and bit for bit as an uninterrupted run's. The average is never part of the
optimizer's per-parameter state, which Lightning moves to the training device after a load
(``../shared/design/optimizer.md`` §7)."""
import warnings

import torch
from test_attach_trainers import lightning_run, same_average

from fastema.torch import ATTACH_KEY, Offload

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

OFFLOAD = {"offload": Offload(chunk=128)}   # the 4-16-1 model's 97 weights: several windows


def placement(ema) -> dict:
    """Where the average's bytes are by part, the launch tables (made as needed) left out."""
    parts = ema.memory(parts=True)
    assert list(parts) == ["cpu"] and parts["cpu"]["staging chunks"] == 2 * 128, parts
    return {k: v for k, v in parts["cpu"].items() if k != "tables"}


def test_lightning_resume_leaves_the_attached_average_offloaded_and_bit_for_bit(tmp_path):
    full = lightning_run(tmp_path / "full", 2, ema_kw=OFFLOAD)
    synchronous = lightning_run(tmp_path / "sync", 2)
    assert same_average(full.ema, synchronous.ema)
    first = lightning_run(tmp_path / "a", 1, save=True, ema_kw=OFFLOAD)
    last = tmp_path / "a" / "ck" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["optimizer_states"][0]
    assert saved[ATTACH_KEY]["updates"] == first.ema.updates == 4
    assert all(set(s) == {"momentum_buffer"} for s in saved["state"].values())
    resumed = lightning_run(tmp_path / "b", 2, ckpt=last, ema_kw=OFFLOAD)
    assert placement(resumed.ema) == placement(first.ema)
    opt = resumed.ema.attached
    assert all(set(s) - {ATTACH_KEY} == {"momentum_buffer"} and s.get(ATTACH_KEY, {}) == {}
               for s in opt.state.values())      # the optimizer's own, and the empty live marker
    assert resumed.ema.updates == full.ema.updates == 8
    assert same_average(resumed.ema, full.ema)
