"""EMA.update(), swap() and copy_to() inside torch.compile: custom operators (fastema::update_,
swap_, copy_to_), one graph with zero breaks under fullgraph=True, the shadow handed to the
operator with no copy, and the averages equal to eager calls (bit for bit on the CPU) over
steps whose decay changes (power warm-up)."""
import contextlib
import re
import warnings

import pytest
import torch
import torch._dynamo as dynamo
from models import mlp
from torch import nn

from fastema.schedules import HalfLife, NumUpdates, PowerFunction, PowerWarmup
from fastema.torch import EMA

pytestmark = pytest.mark.filterwarnings("ignore")


def _model(seed=0):
    return mlp(8, 16, 4, seed=seed)


WARMUPS = [PowerWarmup(0.99), PowerWarmup(0.9)]      # two averages whose decay changes at every step


def _two(model=None, **kw):
    """A model and two EMAs of it: one updated inside compiled code, one by eager calls made
    right after, on the same weights (compiled forward/backward kernels round differently
    from eager ones, so two models would drift apart by themselves)."""
    model = _model() if model is None else model
    return model, EMA(model, WARMUPS, **kw), EMA(model, WARMUPS, **kw)


def _assert_same(a: EMA, b: EMA):
    sa, sb = a.state_dict(), b.state_dict()
    assert (sa["updates"], sa["calls"]) == (sb["updates"], sb["calls"])
    for part in ("averaged", "copied", "int_buffers"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)


def _batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def _op_args(code: str, op: str) -> list[str]:
    """The names the generated code hands fastema::<op>'s first (written) list."""
    calls = re.findall(rf"torch\.ops\.fastema\.{op}\.default\(\[(.*?)\]", code)
    assert calls, code[-3000:]
    return [n.strip() for c in calls for n in c.split(",")]


def test_opcheck_passes_for_every_operator():
    m = _model()
    for kw in ({}, {"device_step": True}, {"buffers": "average"}):
        ema = EMA(nn.Sequential(m, nn.BatchNorm1d(4)), WARMUPS, **kw)
        ema.update()
        for op, args in (("update", lambda w, r: (w, r, ema.compiled.handle, -1)),
                         ("update", lambda w, r: (w, r, ema.compiled.handle, 7)),
                         ("copy_to", lambda w, r: (w, r, ema.compiled.handle, 1)),
                         ("swap", lambda w, r: (w, ema.compiled.handle, 0))):
            written, read = ema.compiled.ops[op]
            fn = getattr(torch.ops.fastema, f"{op}_")
            with torch.no_grad():
                torch.library.opcheck(fn, args(written, read),
                                      test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
            if ema.swapped:
                ema.swap()
    from fastema.torch import WindowAverage

    for avg in (WindowAverage(m, 3), WindowAverage(m, None)):
        avg.update()
        written, read = avg.compiled.ops["update"]
        with torch.no_grad():
            args = (written, read, avg.compiled.handle, -1)
            torch.library.opcheck(torch.ops.fastema.update_, args,
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_the_operators_bump_the_autograd_versions_of_what_they_write():
    """The operators are registered with torch.library.Library, without custom_op's Python layers
    (issue 86): each kernel bumps the autograd version of every tensor it writes, as custom_op's
    ADInplaceOrView kernel did, so a tensor saved for backward and then written by an operator makes
    backward raise instead of using the new values."""
    ema = EMA(_model(), 0.9)
    handle = ema.compiled.handle
    written, read = ema.compiled.ops["update"]
    factor = torch.ones(8, requires_grad=True)
    loss = (factor * written[0][0, :8]).sum()           # saves the shadow's first elements for backward
    versions = [t._version for t in written]
    torch.ops.fastema.update_(written, read, handle, -1)
    assert all(t._version > v for t, v in zip(written, versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    for op, args in (("swap", lambda w, r: (w, handle, 0)), ("swap", lambda w, r: (w, handle, 0)),
                     ("copy_to", lambda w, r: (w, r, handle, 0))):
        written, read = ema.compiled.ops[op]
        versions = [t._version for t in written]
        with torch.no_grad():
            getattr(torch.ops.fastema, f"{op}_")(*args(written, read))
        assert all(t._version > v for t, v in zip(written, versions)), op


def test_forward_and_update_compiled_fullgraph_equal_eager():
    """Step shape (a): forward + loss (with grad) and ema.update() in the compiled function;
    backward and optimizer.step() outside it."""
    model, ea, eb = _two()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, ema, x, y):
        loss = (model(x) - y).square().mean()
        ema.update()
        return loss

    compiled = torch.compile(step, fullgraph=True)
    dynamo.reset()
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    decays = set()
    for i in range(6):
        loss = compiled(model, ea, *_batch(i))
        eb.update()
        decays.add(tuple(eb.decay))
        loss.backward()
        opt.step()
        opt.zero_grad()
    _assert_same(ea, eb)
    assert len(decays) == 6                             # the warm-up moved the decay at every step
    assert dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    explain = dynamo.explain(step)(model, ea, *_batch(9))
    assert (explain.graph_count, explain.graph_break_count) == (1, 0)


def _manual_sgd_step(model, ema, x, y):
    """Step shape (b): a whole update under no_grad: forward, hand-computed gradients, the
    parameter update in the graph, then ema.update()."""
    with torch.no_grad():
        h = model[0](x)
        r = torch.relu(h)
        out = model[2](r)
        go = 2 * (out - y) / out.numel()
        grads = [(go @ model[2].weight * (h > 0)).t() @ x, (go @ model[2].weight * (h > 0)).sum(0),
                 go.t() @ r, go.sum(0)]
        for p, g in zip((model[0].weight, model[0].bias, model[2].weight, model[2].bias), grads):
            p.sub_(0.1 * g)
        ema.update()
        return (out - y).square().mean()


@pytest.mark.parametrize("device_step", [False, True])
def test_whole_update_under_no_grad_compiled_fullgraph_equal_eager(device_step):
    from torch._inductor.utils import run_and_get_code

    kw = dict(device_step=device_step, skip_nonfinite=device_step)   # the operator, with the device plan's
    ma, ea, eb = _two(**kw)                             # arrays (the plain case is written in the graph: below)
    mb, ec, _ = _two(**kw)                              # and a whole eager run, within 1 ulp
    compiled = torch.compile(_manual_sgd_step, fullgraph=True)
    dynamo.reset()
    code = None
    for i in range(6):
        x, y = _batch(i)
        if code is None:
            _, code = run_and_get_code(compiled, ma, ea, x, y)
        else:
            compiled(ma, ea, x, y)
        eb.update()
        _manual_sgd_step(mb, ec, x, y)
    _assert_same(ea, eb)
    for k, v in ec.state_dict()["averaged"].items():
        torch.testing.assert_close(ea.state_dict()["averaged"][k], v, rtol=1.2e-7, atol=1e-8)
    text = "\n".join(code)
    shadows = _op_args(text, "update_")
    # the shadow buffers go to the operator as the graph's own inputs: no clone, no copy
    assert all(n.startswith("arg") for n in shadows[:len(ea._avg.layout.groups)]), shadows
    assert "clone" not in text
    explain = dynamo.explain(_manual_sgd_step)(ma, ea, *_batch(9))
    assert (explain.graph_count, explain.graph_break_count) == (1, 0)


def test_compiled_optimizer_step_then_compiled_update_in_a_training_loop():
    model, ea, eb = _two(_model().append(nn.BatchNorm1d(4)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_step = torch.compile(opt.step)
    ema_step = torch.compile(ea.update, fullgraph=True)
    for i in range(8):
        x, y = _batch(i)
        (model(x) - y).square().mean().backward()
        opt_step()
        opt.zero_grad()
        ema_step()
        eb.update()
    _assert_same(ea, eb)                                 # BatchNorm statistics copied by the operator too
    assert ea.state_dict()["copied"]


def test_swap_and_copy_to_inside_a_compiled_function():
    ma, ea, _ = _two()
    mb, eb, _ = _two()
    for i in range(3):
        for m, e in ((ma, ea), (mb, eb)):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.1 * (i + 1))
            e.update()

    def evaluate(model, ema, x):
        ema.swap()
        out = model(x)
        ema.swap()
        return out

    x, _ = _batch(0)
    with torch.no_grad():
        got = torch.compile(evaluate, fullgraph=True)(ma, ea, x)
        want = evaluate(mb, eb, x)
    assert torch.equal(got, want)
    _assert_same(ea, eb)
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))   # raw weights back

    @torch.compile(fullgraph=True)
    def finish(ema):
        ema.copy_to()

    with torch.no_grad():
        finish(ea)
        eb.copy_to()
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))


def test_eager_calls_do_not_go_through_the_operator(monkeypatch):
    m = _model()
    ema = EMA(m, 0.9)
    called = []
    monkeypatch.setattr(torch.ops.fastema, "update_", lambda *a: called.append(a), raising=False)
    ema.update()
    assert not called and ema.updates == 1


def test_compiled_code_of_a_collected_average_says_so():
    m = _model()
    ema = EMA(m, 0.9)
    written, read = ema.compiled.ops["update"]
    handle = ema.compiled.handle
    del ema
    import gc

    gc.collect()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.fastema.update_(written, read, handle, -1)


@pytest.mark.parametrize("window", [3, None])
def test_window_average_update_compiled_fullgraph_equal_eager(window):
    from fastema.torch import WindowAverage

    model = _model()
    wa, wb = WindowAverage(model, window), WindowAverage(model, window)
    compiled = torch.compile(_manual_sgd_step_and(wa), fullgraph=True)
    for i in range(7):
        compiled(model, *_batch(i))
        wb.update()
    sa, sb = wa.state_dict(), wb.state_dict()
    assert sa["snapshots"] == sb["snapshots"] == 8
    for k in sa["averaged"]:
        assert torch.equal(sa["averaged"][k], sb["averaged"][k]), k
    if window is not None:
        for k in sa["ring"]:
            assert torch.equal(sa["ring"][k], sb["ring"][k]), k


def _manual_sgd_step_and(average):
    def step(model, x, y):
        return _manual_sgd_step(model, average, x, y)

    return step


def test_array_level_operators_pass_opcheck():
    import fastema.torch  # noqa: F401  (registers the operators)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g).bfloat16()
    k = torch.randn(2, 64, generator=g)
    w = torch.full((1,), 0.25)
    flag = torch.zeros(1, dtype=torch.int32)
    cases = [
        (torch.ops.fastema.array_ema_update_, (a, b, [0.9], None, None, False, "nearest", 0, 0, None)),
        (torch.ops.fastema.array_ema_update_, (a, b, None, None, w, False, "nearest", 0, 0, flag)),
        (torch.ops.fastema.array_ema_update_, (k, b, [0.9, 0.5], None, None, True, "nearest", 0, 0, None)),
        (torch.ops.fastema.array_ema_update_, (b.clone(), a, [0.9], None, None, False, "stochastic", 3, 7, None)),
        (torch.ops.fastema.array_ema_update_many_, ([a, k[0]], [b, b], None, [0.1], None, "nearest", 0, 0)),
        (torch.ops.fastema.array_copy_, (a, b)),
        (torch.ops.fastema.array_swap_, (a, k[1].clone(), False)),
        (torch.ops.fastema.array_flag_nonfinite_, (flag, a)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_array_level_functions_compile_fullgraph_equal_eager():
    import fastema

    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g) for s in ((16, 8), (16,), (4, 16))]
    weight = torch.full((1,), 0.1)

    def step(shadows, single, multi, params, direction):
        torch._foreach_add_(params, direction)
        fastema.ema_update_many_(shadows, params, 0.9)
        fastema.ema_update_(single, params[0], weight=weight)
        fastema.ema_update_multi_(multi, params[1], [0.9, 0.5])
        fastema.copy_(params[2], params[2] * 0.5)

    runs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        ps = [p.clone() for p in params]
        state = ([p.clone() for p in ps], ps[0].clone(), torch.stack([ps[1], ps[1]]))
        for i in range(4):
            weight.fill_(0.1 * (i + 1))                    # read by the kernel at every call
            fn(*state, ps, [torch.full_like(p, 0.01 * i) for p in ps])
        runs.append((state, ps))
    (sa, pa), (sb, pb) = runs
    for x, y in zip([*sa[0], sa[1], sa[2], *pa], [*sb[0], sb[1], sb[2], *pb]):
        assert torch.equal(x, y)
    explain = dynamo.explain(step)(*runs[1][0], runs[1][1], [torch.zeros_like(p) for p in params])
    assert explain.graph_break_count == 0


def test_flag_nonfinite_and_skip_if_compile_fullgraph_equal_eager():
    """``flag_nonfinite_`` inside compiled code (its operator; before, Dynamo traced the eager
    function and failed), then an update that the flag skips, over steps with and without a NaN."""
    import fastema

    def step(shadow, flag, src):
        flag.zero_()
        fastema.flag_nonfinite_(flag, src)
        fastema.ema_update_(shadow, src, 0.9, skip_if=flag)

    src = torch.randn(32)
    runs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        shadow, flag, flags = torch.zeros(32), torch.zeros(1, dtype=torch.int32), []
        for i in range(4):
            x = src + i
            if i == 2:
                x[5] = float("nan")
            fn(shadow, flag, x)
            flags.append(int(flag))
        runs.append((shadow, flags))
    assert runs[0][1] == runs[1][1] == [0, 0, 1, 0]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.isfinite(runs[0][0]).all()


def test_retarget_follows_matching_tensors_by_address_and_fails_closed():
    import fastema

    a, b = torch.zeros(8, 4), torch.zeros(5)
    flat = fastema.FlatShadow([a, b])
    a2, b2 = torch.ones(8, 4), torch.ones(5)
    flat.retarget([a2, b2])                               # a compiled graph's buffers: addresses only
    flat.update(0.5)
    assert torch.equal(flat.view(0), torch.full((8, 4), 0.5)) and flat.sources[0] is a2
    with pytest.raises(ValueError, match="was float32 \\(8, 4\\).*now float64"):
        flat.retarget([a2.double(), b2])                  # not matching: rebind's full check names it
    freed = torch.ones(8, 4)
    freed.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="was freed"):
        flat.retarget([freed, b2])
    assert flat.sources[0] is a2                          # nothing changed on a refusal
    flat.update(0.5)
    assert torch.equal(flat.view(0), torch.full((8, 4), 0.75))


def test_an_explicit_step_is_a_graph_input_not_a_constant():
    model, ea, eb = _two()

    def step(ema, i):
        ema.update(step=i)

    compiled = torch.compile(step, fullgraph=True, dynamic=None)
    dynamo.reset()
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    for i in range(0, 40, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        compiled(ea, i)
        eb.update(step=i)
    _assert_same(ea, eb)
    assert dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 2   # the first step, then a dynamic one


# reliability round 3, L10: a bad step inside compiled code is refused with eager's ValueError (it was a
# BackendCompilerFailed for a tensor, and -1 / True went through as "no step" / 1); nothing is counted.
# Round 4: with fullgraph=True too, as eager's ValueError, when the graph runs (refused while tracing, it was
# dynamo's "Observed exception", a graph break); a tensor step is refused, not read (that would stop the host
# at every step), in compiled code as in eager, by EMA (host or device plan) and TargetNetwork alike
def _averages():
    from fastema.torch import TargetNetwork

    model = _model()
    yield "EMA", EMA(model, WARMUPS)
    yield "EMA(device_step=True)", EMA(model, 0.9, device_step=True)
    yield "TargetNetwork", TargetNetwork(model, _model(seed=1), tau=0.1)


@pytest.mark.parametrize("bad", [torch.tensor(5), torch.tensor(5.0), 5.0, -1, True, "3"], ids=repr)
def test_a_bad_step_inside_compiled_code_is_refused_as_in_eager(bad):
    def step(average, s):
        average.update(step=s)

    for name, average in _averages():
        average.update(step=3)
        before = _state(average)
        with pytest.raises(ValueError) as eager:
            average.update(step=bad)
        assert re.match(r"step must be an int >= 0, got " + re.escape(repr(bad)), str(eager.value)), (name, eager)
        for mode in ({}, {"fullgraph": True}):
            dynamo.reset()
            with pytest.raises(ValueError) as err:
                torch.compile(step, **mode)(average, bad)
            assert str(err.value) == str(eager.value), (name, mode)
            _assert_same_state(before, _state(average))
        torch.compile(step, fullgraph=True)(average, 4)            # the next good step goes on from there
        assert (average.calls, average.updates) == (before[0] + 1, before[1] + 1), name


def _state(average) -> tuple:
    tensors = average.target.state_dict() if hasattr(average, "target") else average.state_dict()["averaged"]
    return average.calls, average.updates, {k: v.clone() for k, v in tensors.items()}


def _assert_same_state(a: tuple, b: tuple):
    assert a[:2] == b[:2]
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# reliability round 3, L10: average_parameters() inside compiled code runs eagerly (one graph break, the block
# restores the weights as in eager) and with fullgraph=True is refused with the reason and the fix. The
# torch.compiler.disable wrappers are made at the first use inside a traced function (issue 25, second pass:
# made at import they load torch._dynamo, 0.2 -> 1.06 s for `import fastema.torch`): "first" starts from that.
@pytest.mark.parametrize("first", [True, False])
def test_average_parameters_inside_compiled_code_is_eager_or_refused_with_the_fix(first):
    import fastema.torch._face.compiled as compile_side

    model = _model()
    ema = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    x, _ = _batch(0)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with ema.average_parameters():
            want = model(x)

    def evaluate(x):
        with ema.average_parameters():
            return model(x)

    as_new = compile_side.afresh if first else contextlib.nullcontext   # as in a process whose first
    dynamo.reset()                                                   # block is inside compiled code
    dynamo.utils.counters.clear()
    with torch.no_grad(), as_new():
        got = torch.compile(evaluate)(x)
    assert torch.equal(got, want) and not ema.swapped
    breaks = dynamo.utils.counters["graph_break"]
    assert len(breaks) == 1 and "call it outside the compiled function" in next(iter(breaks)), breaks
    assert dynamo.utils.counters["frames"]["total"] <= 3     # nothing inside the swap was traced (2000 frames)
    dynamo.reset()
    with pytest.raises(Exception, match=r"average_parameters\(\).*call it outside the compiled function"), \
            as_new():
        torch.compile(evaluate, fullgraph=True)(x)
    assert not ema.swapped and all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def test_import_and_eager_blocks_do_not_load_dynamo(monkeypatch):
    """`import fastema.torch` leaves torch._dynamo unloaded (0.8 s of import time on every rank, worker
    and CLI; a subprocess: this session loaded it long ago), and eager blocks never make the
    torch.compiler.disable wrappers (which would load it)."""
    import subprocess
    import sys

    import fastema.torch._face.compiled as compile_side

    code = "import sys, torch, fastema.torch; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False"

    def no_disable(*a, **k):
        raise AssertionError("torch.compiler.disable called in eager code")

    monkeypatch.setattr(torch.compiler, "disable", no_disable)
    with compile_side.afresh():
        model = _model()
        ema = EMA(model, 0.9)
        ema.update()
        with ema.average_parameters(), ema.average_parameters():
            model(_batch(0)[0])
        ema.swap()
        ema.swap()
        assert "eager_block" not in compile_side.__dict__


# issue 86 item 2: the plain case (the plan on the device, shadows in their sources' dtype, nearest rounding)
# written in the compiled graph, fused by Inductor with the parameter update: no kernel, no operator of its own

def _kernels(code: str) -> tuple[int, list[str], int]:
    """The generated module's kernels (their definitions), the operators its call() calls and the buffers
    it allocates at every call."""
    body = code.split("def call(")[-1]
    return (len(re.findall(r"^\w+ = async_compile\.", code, re.M)), re.findall(r"torch\.ops\.[\w.]+", body),
            len(re.findall(r"= empty_strided_\w+\(", body)))


def test_the_plain_update_adds_no_kernel_and_no_operator_to_the_compiled_step():
    """The compiled step with ema.update() has the kernels of the same step with torch._foreach_lerp_ over
    shadows of its own, calls no operator (it called fastema::update_, which ran the eager update) and
    allocates nothing at a call (the counters advanced in their own inputs, in place: one tensor of them
    read and written in the graph took a buffer a call). The generated code's inputs are the other
    step's and two views of the device plan's counters (calls and updates in one): each costs every
    call its size check, and the three counters were three. (To Dynamo the average's tensors are
    constants guarded by identity, not inputs: tests/torch/test_compile_held.py.)"""
    from torch._inductor.utils import run_and_get_code

    model = _model()
    params = list(model.parameters())
    ema = EMA(model, 0.9, device_step=True)
    direction = [torch.full_like(p, 0.01) for p in params]
    shadows = [p.detach().clone() for p in params]

    def with_ema():
        with torch.no_grad():
            torch._foreach_add_(params, direction)
            ema.update()

    def with_foreach():
        with torch.no_grad():
            torch._foreach_add_(params, direction)
            torch._foreach_lerp_(shadows, params, 0.1)

    dynamo.reset()
    codes = [run_and_get_code(torch.compile(fn, fullgraph=True))[1] for fn in (with_ema, with_foreach)]
    ours, theirs = ("\n".join(c) for c in codes)
    assert _kernels(ours) == _kernels(theirs) == (1, [], 0), (_kernels(ours), _kernels(theirs))
    inputs = [len(re.findall(r"\barg\d+_1\b", c.split("def call(")[-1].partition("= args")[0]))
              for c in (ours, theirs)]
    assert inputs == [inputs[1] + 2, 3 * len(params)], inputs
    assert "fastema" not in ours
    assert ema.updates == 1                             # counted in the graph


def _ulps(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.tensor(float("inf"))) - x.abs()


def _steps_within_one_rounding(steps: int, **how) -> str:
    """``steps`` compiled steps (``torch.compile(..., **how)``) of an EMA in the plain case: warm-up
    schedules of two rows, BatchNorm statistics copied, the plan on the device. Each step starts from the
    state of an eager EMA and must be its update within one rounding of the product (Inductor's C++ lerp
    rounds w * (x - s) before adding; torch's and fastema's use an FMA), the counters, decays and
    state_dict read back equal; the graph advances the decay without recompiling (an error if it did);
    an eager update after the compiled ones goes on from them. Returns the first call's generated code."""
    from torch._inductor.utils import run_and_get_code

    model = _model().append(nn.BatchNorm1d(4))
    ea, eb = EMA(model, WARMUPS, device_step=True), EMA(model, WARMUPS, device_step=True)
    compiled = torch.compile(_manual_sgd_step, fullgraph=True, **how)
    dynamo.reset()
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    decays, code = set(), ""
    with dynamo.config.patch(error_on_recompile=True):
        for i in range(steps):
            with torch.no_grad():
                model[3].running_mean.add_(0.5)         # a copied buffer that moves
            eb.load_state_dict(ea.state_dict())         # the same start
            before = {k: v.clone() for k, v in ea.state_dict()["averaged"].items()}
            weights = [1 - d for d in eb.decay]
            if i == 0:
                code = "\n".join(run_and_get_code(compiled, model, ea, *_batch(i))[1])
            else:
                compiled(model, ea, *_batch(i))
            eb.update()
            assert (ea.updates, ea.calls, ea.decay) == (eb.updates, eb.calls, eb.decay)
            assert ea.updates == i + 1
            decays.add(tuple(eb.decay))
            sa, sb = ea.state_dict(), eb.state_dict()
            counts = ("averaged", "copied", "int_buffers")
            assert {k: v for k, v in sa.items() if k not in counts} == \
                {k: v for k, v in sb.items() if k not in counts}
            for part in ("copied", "int_buffers"):
                assert all(torch.equal(sa[part][k], sb[part][k]) for k in sb[part]), part
            sources = dict(model.named_parameters())
            for k, got in sa["averaged"].items():
                want = sb["averaged"][k]
                for r, w in enumerate(weights):
                    product = (torch.tensor(w, dtype=torch.float32) * (sources[k] - before[k][r])).detach()
                    bound = _ulps(product) + _ulps(want[r])
                    assert torch.all((got[r] - want[r]).abs() <= bound), (k, r, i)
    assert len(decays) == steps                         # the warm-up moved the decay at every step
    assert dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    host = ea._core.plan                                # the host's counters, as last read (ea.updates)
    for _ in range(2):                                  # eager after compiled: from the device's counts,
        ea.update()                                     # which it advances alone: no read back per step
        eb.update()
        assert (host.updates, host.calls) == (steps, steps)
    assert (ea.updates, ea.calls, ea.decay) == (eb.updates, eb.calls, eb.decay)
    assert (host.updates, host.calls) == (steps + 2, steps + 2)     # read where they are read
    assert "fastema" not in code and _kernels(code)[1] == []     # the warm-up's decay in the graph too
    return code


_HELD: dict = {}          # the guards test's EMA and parameters, read as a script's globals are


def _global_step():
    with torch.no_grad():
        torch._foreach_add_(_HELD["params"], 1e-3)
        _HELD["ema"].update()


def test_the_plain_updates_guards_in_python_are_the_parameters_and_modules_only(caplog):
    """What Dynamo checks in Python at every call of a compiled step with the plain update (its C++
    guards are cheaper): each parameter the step and the EMA both read is one object (one check each)
    and a few module identities; the schedule's kind is not looked up in a dict keyed by type (its
    keys were listed in Python at every call where the EMA is a global: round 10, session 4)."""
    import logging

    m = nn.Linear(4, 4)
    _HELD.update(ema=EMA(m, 0.9, device_step=True), params=list(m.parameters()))
    step = torch.compile(_global_step, fullgraph=True)
    torch._logging.set_logs(guards=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="torch._dynamo.guards.__guards"):
            step()
    finally:
        torch._logging.set_logs()
        _HELD.clear()
    text = "\n".join(r.getMessage() for r in caplog.records if "__guards" in r.name)
    python = text.partition("Python shape guard function")[2].partition("return guard")[0]
    checks = re.findall(r"if not \((.*)\):", python)
    assert checks, text[-2000:]
    parameters = [c for c in checks if re.fullmatch(r"_var\d+\[\d+\] is _var\d+\[\d+\]", c)]
    assert len(parameters) == 2, checks                    # the weight and the bias
    rest = [c for c in checks if c not in parameters]
    assert len(rest) <= 5 and not any("dict.keys" in c for c in rest), rest


def test_the_compiled_update_walks_no_class_bases_of_the_face(caplog):
    """Dynamo finds what ``update()`` reads on the face itself, not through its class's bases
    (``_attachment`` was a class default: a walk of ``type(ema).__mro__`` guarded at every call,
    about 1.2K instructions of the gates' compiled step)."""
    import logging

    m = nn.Linear(4, 4)
    ema, params = EMA(m, 0.9, device_step=True), list(m.parameters())

    def step(ema, params):
        with torch.no_grad():
            torch._foreach_add_(params, 0.01)
            ema.update()

    torch._logging.set_logs(guards=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="torch._dynamo.guards.__guards"):
            torch.compile(step, fullgraph=True, backend="aot_eager")(ema, params)
    finally:
        torch._logging.set_logs()
    text = "\n".join(r.getMessage() for r in caplog.records if "__guards" in r.name)
    assert "ema" in text and "__mro__" not in text, text[-3000:]


def test_the_plain_update_in_the_graph_counts_as_eager_and_is_within_one_rounding():
    _steps_within_one_rounding(5)


def test_the_plain_update_under_reduce_overhead_replays_as_eager_on_the_cpu():
    """mode="reduce-overhead": the same steps. On the CPU Inductor records no CUDA graph (it counts a
    cudagraph skip, the CPU device) and runs the code it generated: this runs the mode's Python path
    only; the CUDA graph's capture and replays are tested on a GPU (tests/kernels/test_cuda.py,
    test_the_plain_update_written_in_a_reduce_overhead_graph_replays_equal_eager)."""
    from torch._dynamo.utils import counters

    counters.clear()
    _steps_within_one_rounding(3, mode="reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] >= 1


def _traced(fn, *args) -> set[str]:
    """The functions Dynamo's graph of ``fn(*args)`` calls (no Inductor: the graph as traced)."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    ops = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)         # by their qualified names
    return {str(t) if isinstance(t, ops) else getattr(t, "__name__", str(t))
            for t in (n.target for g in graphs for n in g.graph.nodes if n.op == "call_function")}


SPECIAL = {"skip_nonfinite": dict(skip_nonfinite=True),
           "update_every": dict(update_every=2),
           "bfloat16 model, float32 shadow": dict(dtype=torch.bfloat16),
           "stochastic rounding": dict(dtype=torch.bfloat16, shadow_dtype="bfloat16", rounding="stochastic"),
           "the plan on the host": dict(device_step=False),
           "step=": dict(step=3)}


def test_the_special_cases_stay_on_the_operator_and_equal_eager():
    """Each case but the plain one goes through fastema::update_ (fastema's kernels, the eager update),
    equal to eager bit for bit; the plain case is foreach operations and no operator of fastema's, equal
    to eager where torch's lerp runs the graph (no Inductor: Dynamo's graphs, run as they are)."""
    for name, kw in {"plain": {}, **SPECIAL}.items():
        kw = {"device_step": True, **kw}
        dtype, step = kw.pop("dtype", torch.float32), kw.pop("step", None)
        model = _model().to(dtype)
        ea, eb = EMA(model, 0.9, **kw), EMA(model, 0.9, **kw)

        def fn():
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.25)
                ea.update(step)

        called = _traced(fn)
        eb.update(step)
        plain = name == "plain"
        foreach = any(c.startswith("_foreach_") for c in called)     # fastema's lerp: sub then addcmul
        assert ("fastema.update_" in called, foreach) == (not plain, plain), (name, called)
        _assert_same(ea, eb)


@pytest.mark.parametrize("decay, debias", [(NumUpdates(0.999), False), (PowerFunction(7.0), False),
                                           (HalfLife(3.0), False), (0.9, True),
                                           (PowerWarmup(0.99, update_after_step=2, warmup=False), True)],
                         ids=["num_updates", "power_function", "half_life", "debias", "warm-up off, debias"])
def test_each_schedule_the_graph_advances_updates_as_eager(decay, debias):
    """The decay formulas written in the graph (the plan kernel's, in float64 tensor operations): four steps
    of Dynamo's graph (no Inductor), each from an eager EMA's state, within one rounding of its update (the
    graph's lerp is sub then addcmul), the counters and the host's decay read back equal; no operator."""
    model = _model()
    ea, eb = (EMA(model, decay, debias=debias, device_step=True) for _ in range(2))
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(ea.update, backend=backend, fullgraph=True)
    dynamo.reset()
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5).add_(0.25)                 # away from both averages
        eb.load_state_dict(ea.state_dict())
        before = {k: v.clone() for k, v in eb.state_dict()["averaged"].items()}
        step()
        eb.update()
        assert (ea.updates, ea.calls, ea.decay) == (eb.updates, eb.calls, eb.decay) == (i + 1, i + 1, eb.decay)
        sa, sb = ea.state_dict()["averaged"], eb.state_dict()["averaged"]
        for k, p in model.named_parameters():
            bound = 2 * (_ulps(p - before[k][0]) + _ulps(sb[k][0]))
            assert torch.all((sa[k] - sb[k]).abs() <= bound), (k, i)
            assert not torch.equal(sb[k], before[k])    # the update moved it
    assert len(graphs) == 1
    assert not any("fastema" in str(n.target) for n in graphs[0].graph.nodes)


@pytest.mark.parametrize("loaded", [{"decay": 0.5}, {"decay": 0.5, "debias": True}, {"decay": NumUpdates(0.7)},
                                    {"decay": 0.5, "update_every": 2}],
                         ids=["another decay", "debiased", "another schedule", "update_every"])
def test_a_checkpoint_load_that_changes_the_schedule_is_seen_by_the_compiled_update(loaded):
    """The graph reads the schedule as one tuple made at construction and at every load (the device
    plan's ``recipe``), not the schedule's objects: a load that brings another decay, kind, debiasing or
    cadence makes a graph of its own (or the operator's, for update_every), and each compiled update
    equals the eager one of an EMA given the same state, bit for bit (Dynamo's graph, no Inductor)."""
    model = _model()
    params = list(model.parameters())
    ema = EMA(model, 0.9, device_step=True)

    def step():
        with torch.no_grad():
            torch._foreach_add_(params, 1.0)
            ema.update()

    dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    compiled()
    compiled()
    ema.load_state_dict(EMA(model, device_step=True, **loaded).state_dict())
    recipe = ema._core.device_plan.recipe
    assert recipe is None if "update_every" in loaded else recipe[0] in ("constant", "num_updates")
    for _ in range(3):
        twin = EMA(model, 0.9, device_step=True)
        twin.load_state_dict(ema.state_dict())
        compiled()
        twin.update()
        assert (ema.updates, ema.calls, ema.decay) == (twin.updates, twin.calls, twin.decay)
        a, b = ema.state_dict()["averaged"], twin.state_dict()["averaged"]
        assert all(torch.equal(a[k], b[k]) for k in b)


CHANGES = {"model.to(float64)": lambda m: m.to(torch.float64),
           ".data cast": lambda m: setattr(m[0].weight, "data", m[0].weight.data.double()),
           ".data reshaped": lambda m: setattr(m[0].weight, "data", torch.zeros(8, 16)),
           ".data strided": lambda m: setattr(m[0].weight, "data", m[0].weight.data.t().contiguous().t())}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_model_cast_or_reshaped_between_compiled_steps_is_refused_as_in_eager(change):
    """A model whose tensors change dtype, shape or strides in place after compiled plain steps: eager refuses
    ("make a new shadow after changing the model ... Nothing was updated"). The compiled update reused the
    lists made before the change: Dynamo traced again and the update wrote the cast weights into the shadow
    (counted), or failed with Dynamo's own error (a reshape). It refuses as eager does, nothing changed; the
    model changed back, the steps go on equal to eager."""
    model = _model()
    ea, eb = EMA(model, 0.9, device_step=True), EMA(model, 0.9, device_step=True)
    dynamo.reset()
    compiled = torch.compile(lambda: ea.update(), backend="eager", fullgraph=True)
    for _ in range(2):
        with torch.no_grad():
            torch._foreach_add_(list(model.parameters()), 0.25)
        compiled()
        eb.update()
    weight = model[0].weight.detach().clone()
    CHANGES[change](model)
    for run in (eb.update, compiled):
        with pytest.raises(ValueError, match="make a new shadow after changing the model.*Nothing was updated"):
            run()
        _assert_same(ea, eb)
    model.to(torch.float32)
    with torch.no_grad():
        model[0].weight.data = weight + 0.5
    compiled()
    eb.update()
    _assert_same(ea, eb)
    assert ea.updates == 3


@pytest.mark.parametrize("device_step", [True, False], ids=["device plan", "host plan"])
def test_an_update_traced_after_a_swap_is_refused_as_in_eager(device_step):
    """``swap(); update()`` in one compiled function (``fullgraph=True``): eager swaps the average in, then
    refuses the update ("update() while the EMA weights are swapped into the model"). With the plan on the
    device the update was written in the graph, from the swap state read before the traced swap: the shadow
    updated while swapped (Dynamo's graph run as it is), or torch's BackendCompilerFailed (aot_autograd's view
    input mutations). Both refuse as eager does, the average left swapped in as eager leaves it; a compiled
    swap alone still swaps in and back in turn, as eager's."""
    models = _model(), _model()
    ea, eb = (EMA(m, 0.9, device_step=device_step) for m in models)
    for m, e in zip(models, (ea, eb)):
        with torch.no_grad():
            torch._foreach_add_(list(m.parameters()), 0.5)
        e.update()
    dynamo.reset()

    def swap_then_update():
        ea.swap()
        ea.update()
        ea.swap()

    eb.swap()
    for run in (eb.update, torch.compile(swap_then_update, backend="eager", fullgraph=True)):
        with pytest.raises(RuntimeError, match=r"update\(\) while the EMA weights are swapped into the model"):
            run()
    assert ea.swapped and eb.swapped
    swap = torch.compile(lambda: ea.swap(), backend="eager", fullgraph=True)
    for _ in range(3):
        swap()
        eb.swap()
        assert ea.swapped == eb.swapped
        assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
    _assert_same(ea, eb)
    ea = EMA(_model(), 0.9, device_step=device_step)              # aot_autograd's graph: eager's error too
    with pytest.raises(RuntimeError, match=r"update\(\) while the EMA weights are swapped into the model"):
        torch.compile(swap_then_update, backend="aot_eager", fullgraph=True)()
