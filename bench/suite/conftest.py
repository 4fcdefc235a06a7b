"""Benchmark helpers: steady-state timing (compile excluded), synchronised devices.

Each benchmark records in ``extra_info`` the scenario ``case``, the implementation
``impl`` and the bytes one call must move; ``python -m bench.suite`` turns the JSON into
GB/s and speed-ups against the baselines measured in the same run.
``FASTEMA_BENCH_QUICK=1`` keeps sizes and rounds small (CI).
"""
import os

import pytest

from bench.suite.checked import Refused, is_baseline

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


@pytest.fixture
def run(benchmark):
    """``run(fn, device, impl=..., case=..., nbytes=..., rounds=..., check=...)``: for a baseline,
    ``check()`` first (``bench.suite.checked.checked``: the baseline run once against fastema's result
    from the same inputs; a baseline without one is refused; ``reference=True``:
    a row that computes no average, a training step alone); then warm up and time ``fn``."""

    def _run(fn, device, *, impl, case, nbytes, rounds=None, elements=None, check=None, reference=False):
        def timed():
            fn()
            sync(device)

        if not reference:                    # reference: a row that is no average (the step alone)
            checked_row(benchmark, impl, check)

        timed()                      # compile / allocate outside the timing
        timed()
        if rounds is None:
            rounds = 5 if QUICK else 20
        benchmark.extra_info.update(impl=impl, case=case, bytes=nbytes, device=device,
                                    elements=elements)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)

    return _run


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


def checked_row(benchmark, impl, check) -> None:
    """A baseline ``impl`` run once against fastema's result by ``check()`` before it is timed
    (``bench/suite/checked.py``): a ``Refused`` fails the benchmark, naming the row, and so does a
    baseline without a check; ``extra_info["checked"]`` records it. Nothing for fastema's own rows
    and the copy."""
    if is_baseline(impl):
        if check is None:
            raise Refused(f"{benchmark.group} | {impl}", "no check against fastema's result (check=): every "
                                                          "baseline is run once against it before it is timed")
        check()
        benchmark.extra_info["checked"] = True


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
