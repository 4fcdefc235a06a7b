"""Live: host us per update of two revisions, in one run (first for the structure step of issue 35 item 7).

    python -m bench.scripts.host_cost_revisions BASE [HEAD] [--rounds 5]
        [--cases target6,ema6,ema148,ema3000,foreach6]
    python -m bench.scripts.host_cost_revisions BASE [HEAD]
        --cases gpuema6,gpuema148,gpuema3000,gpuskip6,gpuskip148,gpuskip3000

Each revision is checked out in a temporary git worktree; every round runs each case of each
revision in a fresh process (alternating, so both see the same machine), with tiny tensors (4x4
linear layers: the launch and bookkeeping cost, not bandwidth) on one thread. A process times
batches of calls after a warm-up and reports its best batch; the table gives the median over the
rounds (min and max beside it) and the difference. No GPU: the CPU kernels' host path.

Cases ``gpuemaN`` and ``gpuskipN`` (``skip_nonfinite=True``) time ``EMA.update()`` on CUDA's launch
path with each revision's own fake GPU (``testkit``, before it ``tests/support``: a launch driver
that launches nothing, no device; see ``bench/gpu/host_cost.py``): fastema's host work per update.
Only revisions that have the launch driver (``fastema/_launch/cuda/driver.py`` and a ``fake_gpu.py``,
issue 60) can
be compared so: an older revision's fake GPU replaced names of its ``_launch`` modules, so its
figures measured another fake; its child fails with ``ModuleNotFoundError`` rather than time
something else. Where a case is given at two or more sizes
(``ema``, ``gpuema``, ``gpuskip``), each revision's fixed cost and cost per tensor are fitted (least
squares) and printed under the table.

The baselines, timed in the same processes' rounds: ``foreach6`` is ``torch._foreach_lerp_`` over the
same 6 tensors inside ``torch.no_grad()``, as TorchRL's ``SoftUpdate`` and SB3's ``polyak_update``
call it (the source parameters require grad); ``foreach6bare`` the same call on tensors that need no
grad, with no context (the floor of a Python call into a torch op). Each revision's ratio of
``target6`` to them is printed under the table. Each is first run once against the revision's
``TargetNetwork.update`` from the same start (``bench/suite/checked.py``) and refused where it does other work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import contextlib, sys, time, copy
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import fastema
assert fastema.__file__.startswith(sys.argv[1]), fastema.__file__
from fastema.torch import EMA, TargetNetwork
case = sys.argv[2]
n = int("".join(ch for ch in case if ch.isdigit()))
net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(n // 2)])
fake = contextlib.nullcontext()
if case.startswith("gpu"):                     # the revision's own fake GPU: testkit/ at its root,
    import importlib, os                       # or (before it) tests/support
    kit = os.path.isdir(os.path.join(sys.argv[1], "testkit"))
    if not kit:
        sys.path.insert(0, sys.argv[1] + "/tests")
    G = importlib.import_module("testkit.fake_gpu" if kit else "support.fake_gpu")
    assert G.__file__.startswith(sys.argv[1]), G.__file__
    fake_gpu = G.fake_gpu
    fake = fake_gpu(record=False)
fake.__enter__()
if case.startswith("gpuema"):
    update = EMA(net, 0.999).update
elif case.startswith("gpuskip"):
    update = EMA(net, 0.999, skip_nonfinite=True).update
elif case.startswith("foreach"):
    online, target = list(net.parameters()), list(copy.deepcopy(net).requires_grad_(False).parameters())
    if case.endswith("bare"):
        online = [p.detach() for p in online]
        def update():
            torch._foreach_lerp_(target, online, 0.005)
    else:
        def update():
            with torch.no_grad():
                torch._foreach_lerp_(target, online, 0.005)
    # checked once against the revision's TargetNetwork.update from the same start, with this tree's
    # helper (bench/suite/checked.py, argv[3]): refused before it is timed where it does other work
    import importlib.util
    spec = importlib.util.spec_from_file_location("checked", sys.argv[3] + "/bench/suite/checked.py")
    checked = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checked)
    theirs = copy.deepcopy(net).requires_grad_(False)
    tn = TargetNetwork(net, theirs, tau=0.005)
    def move():
        with torch.no_grad():
            torch._foreach_neg_(list(net.parameters()))
    checked.checked({"fastema": tn.update, case: update}, {"fastema": lambda: list(theirs.parameters()),
                    case: lambda: target}, ours="fastema", inputs=online, move=move)
elif case.startswith("target"):
    update = TargetNetwork(net, copy.deepcopy(net).requires_grad_(False), tau=0.005).update
else:
    update = EMA(net, 0.999).update
for _ in range(200):
    update()
calls = 2000 if n <= 6 else (500 if n <= 200 else 50)
best = float("inf")
for _ in range(15):
    t = time.perf_counter()
    for _ in range(calls):
        update()
    best = min(best, (time.perf_counter() - t) / calls * 1e6)
print(best)
"""


def fit(points: list) -> tuple[float, float]:
    """``(fixed, per tensor)``: the least-squares line through ``(tensors, us)`` points."""
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - per * mx, per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("head", nargs="?", default="HEAD")
    ap.add_argument("--cases", default="target6,ema6,ema148,ema3000,foreach6,foreach6bare")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}                        # "base" / "head" -> its worktree: a revision against itself too
        try:
            for side, rev in (("base", args.base), ("head", args.head)):
                path = f"{tmp}/{side}"
                subprocess.run(["git", "worktree", "add", "-f", "--detach", path, rev], check=True,
                               capture_output=True)
                trees[side] = path
            times: dict = {(side, c): [] for side in trees for c in cases}
            for _ in range(args.rounds):
                for side, path in trees.items():
                    for c in cases:
                        out = subprocess.run([sys.executable, "-c", CHILD, path, c, ROOT], check=True,
                                             capture_output=True,
                                             text=True, env={"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
                                                             "PATH": "/usr/bin:/bin"}).stdout
                        times[(side, c)].append(float(out.split()[-1]))
        finally:
            for path in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", path], capture_output=True)
    names = {"base": args.base, "head": args.head}
    print(f"| case | {args.base} (us) | {args.head} (us) | difference |")
    print("|---|---|---|---|")
    for c in cases:
        a, b = (statistics.median(times[(side, c)]) for side in trees)
        spread = " / ".join(f"{min(times[(side, c)]):.2f}-{max(times[(side, c)]):.2f}" for side in trees)
        print(f"| {c} | {a:.2f} | {b:.2f} | {b - a:+.2f} (ranges {spread}) |")
    for prefix in ("ema", "gpuema", "gpuskip"):      # fixed us + us per tensor, fitted over the sizes given
        sizes = sorted((int("".join(ch for ch in c if ch.isdigit())), c) for c in cases
                       if c.rstrip("0123456789") == prefix)
        if len(sizes) >= 2:
            for side in trees:
                fixed, per = fit([(n, statistics.median(times[(side, c)])) for n, c in sizes])
                print(f"{prefix} {names[side]}: {fixed:.2f} us + {per:.4f} us a tensor (line through "
                      f"{', '.join(str(n) for n, _ in sizes)} tensors)")
    for base in ("foreach6", "foreach6bare"):
        if "target6" in cases and base in cases:
            ratios = [statistics.median(times[(side, "target6")]) / statistics.median(times[(side, base)])
                      for side in trees]
            print(f"\ntarget6 / {base}: " + ", ".join(f"{names[side]} {r:.2f}x" for side, r in zip(trees, ratios)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
