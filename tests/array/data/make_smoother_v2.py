"""Writes ``smoother-v2.npz``, the version 2 Smoother checkpoints tests/array/test_smooth.py loads: for each
case, a smoother's ``state_dict()`` after some updates (unweighted, scalar and per-stream sample weights,
NaN and inf values), the updates that follow and the EMA and SMA the same smoother read after each.

The committed file was written by this script at a2c5924 (the two-kernel Smoother, checkpoint version 2),
from a tree of that commit whose ``fastema/kernels`` links to its ``kernels``::

    git archive a2c5924 fastema kernels | tar -x -C /tmp/old && ln -s ../kernels /tmp/old/fastema/kernels
    .venv/bin/python tests/array/data/make_smoother_v2.py /tmp/old

The tests check that a Smoother of today loads each checkpoint and, fed the same updates, reads the same
bits (and that version 1, the same checkpoint unscaled, does too).
"""
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).parent
CASES = {
    "ema_sma_skip": dict(span=4, window=5),
    "seeded_propagate": dict(alpha=0.3, mode="seeded", window=3, nonfinite="propagate"),
    "zeros_ema": dict(decay=0.5, mode="zeros"),
    "sma_propagate": dict(window=4, nonfinite="propagate", min_periods=2),
}
STREAMS, BEFORE, AFTER = 3, 8, 6


def steps(rng, count):
    """``count`` updates: values with NaN and inf, and a weight each (None, a float, or per stream)."""
    out = []
    for i in range(count):
        v = rng.standard_normal(STREAMS)
        if i % 3 == 1:
            v[i % STREAMS] = np.nan
        if i % 4 == 2:
            v[(i + 1) % STREAMS] = np.inf
        w = [None, 2.0, rng.integers(0, 4, STREAMS).astype(np.float64)][i % 3]
        out.append((v, w))
    return out


def main(tree):
    sys.path.insert(0, tree)
    from fastema.smooth import Smoother

    arrays = {}
    rng = np.random.default_rng(86)
    for name, kw in CASES.items():
        s = Smoother(**kw)
        for v, w in steps(rng, BEFORE):
            s.update(v, sample_weight=w)
        state = s.state_dict()
        assert state["version"] == 2
        arrays.update({f"{name}/state/{k}": np.array(a) for k, a in state["state"].items()})   # copies: live arrays
        arrays[f"{name}/header"] = np.array(json.dumps({k: v for k, v in state.items() if k != "state"}))
        after = steps(rng, AFTER)
        for i, (v, w) in enumerate(after):
            s.update(v, sample_weight=w)
            arrays[f"{name}/values/{i}"] = v
            if w is not None:
                arrays[f"{name}/weight/{i}"] = np.asarray(w, np.float64)
            for kind in ("ema", "sma"):
                if (s.alpha if kind == "ema" else s.window) is not None:
                    arrays[f"{name}/{kind}/{i}"] = np.asarray(getattr(s, kind))
    arrays["cases"] = np.array(json.dumps({"cases": CASES, "after": AFTER}))
    np.savez_compressed(HERE / "smoother-v2.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
