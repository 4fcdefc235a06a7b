"""Whole ema-pytorch drop-ins pickled (``torch.save(ema)``, ``torch.load(weights_only=False)``) keep
loading: the files written before ``fastema.torch.compat.ema_pytorch`` became a package
(``data/ema_pytorch-before-split.pt``, by the one-file module at 929b907: an ``EMA``, a
``KarrasEMA``, a ``PostHocEMA``, an ``EMAPytree`` and an ``EMAModuleWrapper``, each updated 3
times, and their state dicts), and the ones written now, which name the same paths."""
import copy
import io
import pathlib
import pickle

import pytest
import torch
from torch import nn

from fastema._floors import release
from fastema.torch import compat
from fastema.torch.compat import ema_pytorch

DATA = pathlib.Path(__file__).parent / "data" / "ema_pytorch-before-split.pt"
PUBLIC = ["EMA", "EMAModuleWrapper", "EMAPytree", "EMATensor", "KarrasEMA", "PostHocEMA"]


class _Names(pickle.Unpickler):
    """An unpickler that records every (module, name) the pickle imports."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.names: set = set()

    def find_class(self, module, name):
        self.names.add((module, name))
        return super().find_class(module, name)


def _fastema_names(obj) -> set:
    unpickler = _Names(pickle.dumps(obj))
    assert type(unpickler.load()) is type(obj)
    return {(m, n) for m, n in unpickler.names if m.startswith("fastema")}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_package_exports_what_the_module_did():
    assert sorted(ema_pytorch.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(compat, name) is getattr(ema_pytorch, name)
        assert getattr(ema_pytorch, name).__module__ == "fastema.torch.compat.ema_pytorch"
    assert compat.EMATensor is compat.EMAPytree


@pytest.mark.skipif((release(torch.__version__) or (2, 11)) < (2, 11), reason="the file holds an EMAPytree's "
                    "torch.utils._pytree.TreeSpec as torch 2.13 pickles it, which torch before 2.11 "
                    "cannot read ('state is not a dictionary'): torch's pickles, not fastema's")
def test_pickles_written_before_the_split_load_and_update_on():
    saved = torch.load(DATA, weights_only=False)
    for name, obj in saved["objects"].items():
        assert type(obj) is getattr(compat, name)
        assert _equal(obj.state_dict(), saved["state_dicts"][name]), name
    ema = saved["objects"]["EMA"]
    assert ema.inplace_copy.func is ema_pytorch._inplace_copy and ema.inplace_lerp.func is ema_pytorch._inplace_lerp
    # the loaded EMA and EMAPytree go on as ones made now and given the same state dicts
    twin = compat.EMA(copy.deepcopy(ema.model), beta=0.9, update_after_step=0, update_every=1)
    twin.load_state_dict(saved["state_dicts"]["EMA"])
    tree_ema = saved["objects"]["EMAPytree"]
    tree_twin = compat.EMA(copy.deepcopy(tree_ema.pytree), beta=0.9, update_after_step=0, update_every=1)
    tree_twin.load_state_dict(saved["state_dicts"]["EMAPytree"])
    for e in (ema, twin):
        with torch.no_grad():
            for p in e.model.parameters():
                p.add_(1.0)
    for tree in (tree_ema.pytree, tree_twin.pytree):
        tree["w"].add_(1.0)
    for e in (ema, twin, tree_ema, tree_twin):
        e.update()
    assert _equal(ema.state_dict(), twin.state_dict()) and int(ema.step) == 4
    assert _equal(tree_ema.state_dict(), tree_twin.state_dict()) and int(tree_ema.step) == 4
    for name in ("KarrasEMA", "PostHocEMA", "EMAModuleWrapper"):
        saved["objects"][name].update()


@pytest.mark.parametrize("make", [
    lambda: compat.EMA(nn.Linear(3, 2)),
    lambda: compat.KarrasEMA(nn.Linear(3, 2), sigma_rel=0.1),
    lambda tmp: compat.PostHocEMA(nn.Linear(3, 2), sigma_rels=(0.05, 0.2), checkpoint_folder=str(tmp)),
    lambda: compat.EMA({"w": torch.zeros(3), "n": [torch.arange(2)]}),
    lambda: compat.EMAModuleWrapper(nn.Linear(3, 2)),
], ids=["EMA", "KarrasEMA", "PostHocEMA", "EMAPytree", "EMAModuleWrapper"])
def test_a_pickle_made_now_names_the_package_only(make, tmp_path):
    """As before the split: the class (and the helpers ``inplace_copy`` / ``inplace_lerp`` wrap)
    by ``fastema.torch.compat.ema_pytorch``, never a private module, so the file also loads where
    the package is laid out otherwise."""
    obj = make(tmp_path) if make.__code__.co_argcount else make()
    names = _fastema_names(obj)
    assert {m for m, _ in names} == {"fastema.torch.compat.ema_pytorch"}
    assert {n for _, n in names} <= set(PUBLIC) | {"_inplace_copy", "_inplace_lerp"}
    assert (("fastema.torch.compat.ema_pytorch", type(obj).__name__)) in names
