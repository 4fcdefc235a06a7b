"""Benchmark helpers: steady-state timing (compile excluded), synchronised devices.

Each benchmark records in ``extra_info`` the scenario ``case``, the implementation
``impl`` and the bytes one call must move; on a GPU each round's device time too (CUDA events
around the call, ``device_s``), and for a baseline fastema's checked update timed in the same
rounds, one fastema round before each of the baseline's (``pair``: its e2e and device seconds).
``python -m bench.suite`` turns the JSON into GB/s, the share of the run's device-time ceiling and
speed-ups read from those shared rounds. ``FASTEMA_BENCH_QUICK=1`` keeps sizes and rounds small (CI).
"""
import os
import time

import pytest

from bench.suite.checked import Refused, is_baseline, take_reference

QUICK = os.environ.get("FASTEMA_BENCH_QUICK") == "1"


def devices():
    out = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("cuda")
    except ImportError:
        pass
    return out


LARGE = {"gpt2-small"}          # 124M parameters: full mode only, fewer rounds


def scenario_rounds(scenario, large_rounds=5):
    """Skip a large scenario in quick mode; the rounds to time it with (None: the default)."""
    if scenario in LARGE:
        if QUICK:
            pytest.skip("full mode only")
        return large_rounds
    return None


def sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the GPU and the versions in the results: a table is read with them."""
    versions = []
    try:
        import torch

        versions.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            machine_info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    import numba

    import fastema

    versions += [f"numba {numba.__version__}", f"fastema {fastema.__version__}"]
    machine_info["fastema_versions"] = ", ".join(versions)


@pytest.fixture(autouse=True, scope="session")
def _sb3_logs_in_tmp(tmp_path_factory):
    """Stable-Baselines3 learners make a new log folder under the system temp folder at each
    ``learn`` unless ``SB3_LOGDIR`` names one: keep them in pytest's own temp folder."""
    old = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3-logs"))
    yield
    if old is None:
        os.environ.pop("SB3_LOGDIR", None)
    else:
        os.environ["SB3_LOGDIR"] = old


class _Rounds:
    """One row's rounds: e2e seconds (a call and a sync) and, on a GPU, device seconds (CUDA events around
    the call)."""

    def __init__(self, fn, device):
        self.fn, self.device = fn, device
        self.e2e: list = []
        self.dev: list = []
        self.events = None
        if device == "cuda":
            import torch

            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def __call__(self) -> None:
        t0 = time.perf_counter()
        if self.events is None:
            self.fn()
            sync(self.device)
        else:
            start, end = self.events
            start.record()
            self.fn()
            end.record()
            end.synchronize()
            self.dev.append(start.elapsed_time(end) * 1e-3)
        self.e2e.append(time.perf_counter() - t0)

    def last(self, rounds: int) -> dict:
        return {"e2e_s": self.e2e[-rounds:], "device_s": self.dev[-rounds:]}


@pytest.fixture
def run(benchmark):
    """``run(fn, device, impl=..., case=..., nbytes=..., rounds=..., check=...)``: for a baseline,
    ``check()`` first (``bench.suite.checked.checked``: the baseline run once against fastema's result
    from the same inputs; a baseline without one is refused, and so is one whose check kept no fastema
    update, ``checked.take_reference``; ``reference=True``: a row that computes no average, a training
    step alone); then warm up and time ``fn``, a baseline's rounds each after one of fastema's checked
    update (timed apart, ``extra_info["pair"]``); on a GPU each round's device time too."""

    def _run(fn, device, *, impl, case, nbytes, rounds=None, elements=None, check=None, reference=False):
        ours = None if reference else checked_row(benchmark, impl, check)
        benchmark.extra_info.update(impl=impl, case=case, bytes=nbytes, device=device,
                                    elements=elements)
        time_rounds(benchmark, fn, ours, device, 5 if QUICK else 20 if rounds is None else rounds)

    return _run


def time_rounds(benchmark, fn, ours, device: str, rounds: int, calls: int = 1, warm: int = 2) -> None:
    """Time ``fn`` (``calls`` calls of the row: the figures are per call) for ``rounds`` rounds, each after
    a round of fastema's checked update ``ours`` (None: none, fastema's own row), after ``warm`` rounds
    outside the timing; the rounds' device times (a GPU) and ``ours``'s (``pair``) into ``extra_info``."""
    loop = fn if calls == 1 else (lambda: [fn() for _ in range(calls)])
    timed = _Rounds(loop, device)
    pair = None if ours is None else _Rounds(ours if calls == 1 else (lambda: [ours() for _ in range(calls)]), device)
    for _ in range(warm):                    # compile / allocate outside the timing
        timed()
        if pair is not None:
            pair()
    benchmark.pedantic(timed, setup=pair, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["calls"] = calls
    benchmark.extra_info["e2e_s"] = timed.last(rounds)["e2e_s"]
    if device == "cuda":
        benchmark.extra_info["device_s"] = timed.last(rounds)["device_s"]
    if pair is not None:
        benchmark.extra_info["pair"] = pair.last(rounds)


def flat_check(impl, fn, params, outputs, *, rows=1, decays=(0.999,), dtype=None):
    """The ``check=`` of a baseline ``fn`` that averages ``params`` into ``outputs`` (its shadows,
    equal to ``params`` now): fastema's ``FlatShadow`` of the same start, made now; when called, the
    params move once, then fastema and ``fn`` each update once and must agree
    (``bench.suite.checked.checked``)."""
    import torch

    import fastema
    from bench.suite.checked import checked

    ref = fastema.FlatShadow(params, rows=rows, **({"dtype": dtype} if dtype else {}))

    def move():
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=0.1)

    def ours():
        ref.update(list(decays) if rows > 1 else decays[0])

    def check():
        checked({"fastema": ours, impl: fn},
                {"fastema": lambda: [ref.view(i, r) for r in range(rows) for i in range(len(params))],
                 impl: lambda: outputs}, ours="fastema", inputs=params, move=move)
    return check


def ema_check(impl, fn, result, model, decay=0.999, pick=None, **ema_kw):
    """The ``check=`` of a baseline ``fn`` that averages ``model``'s parameters (``result()``: the
    arrays it writes, equal to the parameters now): ``fastema.torch.EMA(model, decay, **ema_kw)``
    made now; when called, the parameters move once, then fastema and ``fn`` each update once and
    must agree (``bench.suite.checked.checked``). ``pick``: which of fastema's averaged entries (by name)
    the baseline keeps (default: all)."""
    import torch

    from bench.suite.checked import checked, move_sources
    from fastema.torch import EMA

    ref = EMA(model, decay, **ema_kw)
    params = list(model.parameters())
    # a 16-bit average is checked at its precision: the sources move further (``move_sources``)
    sixteen = any(v.element_size() <= 2 for v in ref.averaged_state_dict().values())

    def check():
        move_sources(params, sixteen)
        with torch.no_grad():
            checked({"fastema": ref.update, impl: fn},
                    {"fastema": lambda: [v for k, v in ref.averaged_state_dict().items()
                                         if pick is None or pick(k)], impl: result},
                    ours="fastema", inputs=params)
    return check


def checked_row(benchmark, impl, check):
    """A baseline ``impl`` run once against fastema's result by ``check()`` before it is timed
    (``bench/suite/checked.py``): a ``Refused`` fails the benchmark, naming the row, and so does a
    baseline without a check, or one whose check kept no fastema update to time in its rounds
    (``checked.take_reference``); ``extra_info["checked"]`` records it. Returns that update (None for
    fastema's own rows and the ceilings)."""
    if not is_baseline(impl):
        return None
    row = f"{benchmark.group} | {impl}"
    if check is None:
        raise Refused(row, "no check against fastema's result (check=): every baseline is run once against it "
                           "before it is timed")
    take_reference()                         # nothing left from another row
    check()
    benchmark.extra_info["checked"] = True
    ours = take_reference()
    if ours is None:
        raise Refused(row, "its check kept no fastema update (checked.checked keeps its own; a check calling "
                           "agree() names it with checked.same_work): a baseline is timed in the same rounds "
                           "as fastema's checked update, never against a row timed apart")
    return ours


def target_check(impl, fn, online, target_params, tau):
    """The ``check=`` of a baseline ``fn`` that soft-updates ``target_params`` toward ``online``:
    ``fastema.torch.TargetNetwork`` of a copy of the target made now; when called, the online
    parameters move once (the target starts as their copy), then both update once and must agree."""
    import copy

    import torch

    from bench.suite.checked import checked
    from fastema.torch import TargetNetwork

    mirror = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for m, t in zip(mirror.parameters(), target_params):
            m.copy_(t)
    tn = TargetNetwork(online, mirror, tau=tau)
    params = list(online.parameters())

    def check():
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=0.1)
        checked({"fastema": tn.update, impl: fn},
                {"fastema": lambda: list(mirror.parameters()), impl: lambda: target_params},
                ours="fastema", inputs=params)
    return check


def tf_check(impl, fn, result, variables, decay=0.999):
    """The ``check=`` of a TensorFlow baseline ``fn`` averaging ``variables`` (``result()``: its
    averages, equal to the variables now): ``fastema.tensorflow.EMA`` made now; when called, the
    variables move once, then both update once and must agree (``bench.suite.checked.checked``)."""
    import numpy as np

    from bench.suite.checked import checked
    from fastema.tensorflow import EMA

    ref = EMA(variables, decay)
    rng = np.random.default_rng(1)

    def check():
        for v in variables:
            v.assign_add(0.1 * rng.standard_normal(v.shape, dtype=np.float32))
        checked({"fastema": ref.update, impl: fn}, {"fastema": ref.averages, impl: result}, ours="fastema")
    return check
