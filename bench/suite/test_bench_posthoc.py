"""Post-hoc EMA (issue #16): ``PostHocEMA.update()`` tracking K = 2 power-function profiles
(sigma_rel 0.05 and 0.10) of GPT-2-small shapes, against ema-pytorch's ``PostHocEMA`` (two
``KarrasEMA``, a per-tensor ``lerp_`` loop each) and the fastema drop-in
``compat.PostHocEMA``, same run, ``update_every=1`` for all (ema-pytorch's default of 100
would time mostly skipped calls) and no snapshot inside the timing. bytes = 4 B of weights
read plus 2 x 8 B of shadow read and written per element (20 B: one pass over the weights
for both profiles). Quick mode (CI) scales every dimension by 1/4. ema-pytorch's update is checked
against fastema's drop-in of the same start before it is timed (``bench/suite/checked.py``).
"""

import pytest
import torch

from bench.suite.checked import checked

from .conftest import QUICK, devices
from .shapes import gpt2_small
from .test_bench_torch import Params

SIGMA_RELS = (0.05, 0.10)


def shapes():
    return [tuple(max(1, d // 4) for d in s) for s in gpt2_small()] if QUICK else gpt2_small()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["fastema PostHocEMA", "ema-pytorch PostHocEMA", "fastema compat.PostHocEMA"])
def test_posthoc_update_two_profiles(run, benchmark, device, impl, tmp_path):
    benchmark.group = f"PostHocEMA.update, K=2 profiles, GPT-2-small shapes, float32 ({device})"
    model = Params(shapes(), torch.float32, device)
    n = sum(p.numel() for p in model.parameters())
    folder = str(tmp_path)
    if impl == "fastema PostHocEMA":
        from fastema.torch import PostHocEMA

        fn = PostHocEMA(model, SIGMA_RELS, snapshot_every=None, path=folder).update
    else:
        if impl.startswith("ema-pytorch"):
            ema_pytorch = pytest.importorskip("ema_pytorch")
            cls = ema_pytorch.PostHocEMA
        else:
            from fastema.torch.compat import PostHocEMA as cls
        ema = cls(model, sigma_rels=SIGMA_RELS, update_every=1, checkpoint_every_num_steps="manual",
                  checkpoint_folder=folder)
        fn = ema.update
        fn()                                     # the first call copies the weights
    check = _check(impl, model, ema, str(tmp_path / "check")) if impl.startswith("ema-pytorch") else None
    run(fn, device, impl=impl, case="gpt2-small" + (" / 4" if QUICK else ""), nbytes=20 * n, elements=n,
        check=check)


def _check(impl, model, theirs, folder):
    """ema-pytorch's two profiles against fastema's drop-in of the same start (its arithmetic is
    ema-pytorch's, ``KarrasEMA`` by ``KarrasEMA``): the weights move, each updates once, the
    profiles' weights must agree (``bench/suite/checked.py``)."""
    from fastema.torch.compat import PostHocEMA

    ours = PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=1, checkpoint_every_num_steps="manual",
                      checkpoint_folder=folder)
    ours.update()                                # the first call copies the weights, as theirs did
    params = list(model.parameters())

    def weights(ema):
        return [p for e in ema.ema_models for p in e.ema_model.parameters()]

    def check():
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=0.1)
        checked({"fastema": ours.update, impl: theirs.update},
                {"fastema": lambda: weights(ours), impl: lambda: weights(theirs)}, ours="fastema", inputs=params)
    return check
