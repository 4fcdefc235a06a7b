"""The array functions refuse what torch's ``lerp_`` refuses, and take what it takes (issue 85 L2,
``../shared/design/reliability.md`` A03): torch's own ``lerp_`` is run side by side on the same kinds
of tensors in the same modes (grad mode, ``torch.no_grad()``, ``torch.inference_mode()``). Refused
where they are written: a leaf that requires grad, a view of one, and a view of a tensor that
requires grad made in ``no_grad`` mode or by ``unbind``, with grad mode on; an inference tensor
outside inference mode. Taken: all of those where torch takes them, and every source (the read
side: ``lerp_``'s ``end`` may be anything). On a first call and on a cached one: the same tensor
cached in a mode that takes it is refused in one that does not (with torch's layout guard and with
fastema's streamed one), a tensor made to require grad since, and an inference tensor over the
memory of a cached normal one. A refusal writes nothing (values and version as they were); what is
taken equals torch's ``lerp_`` (float32 on the CPU: bit for bit)."""
import contextlib

import numpy as np
import pytest
import torch

import fastema

MODES = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad,
         "inference": torch.inference_mode}
KINDS = ("plain", "leaf", "param", "computed", "view of leaf", "inference", "view of inference",
         "no_grad view", "unbind view", "inference_mode view", "view made to require grad")
N = 6


@pytest.fixture(autouse=True)
def _fresh():
    fastema.clear_caches()
    yield
    fastema.clear_caches()


def make(kind: str, seed: int = 0, shape=(N,)) -> torch.Tensor:
    """A tensor of ``kind`` holding ``randn(shape)`` drawn from ``seed``."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if kind == "plain":
        return values
    if kind in ("leaf", "param"):
        return values.requires_grad_() if kind == "leaf" else torch.nn.Parameter(values)
    if kind in ("inference", "view of inference"):
        with torch.inference_mode():
            t = values.clone()
        return t if kind == "inference" else t[:]
    if kind == "view made to require grad":
        return values[:].requires_grad_()
    base = values.requires_grad_()
    if kind == "inference_mode view":
        with torch.inference_mode():
            return base[:]
    if kind == "computed":
        return base * 1
    if kind == "view of leaf":
        return base[:]
    if kind == "no_grad view":
        with torch.no_grad():
            return base[:]
    assert kind == "unbind view"
    return torch.stack([base, base]).unbind(0)[0]


def torch_takes(kind: str, mode: str, src: str = "plain") -> bool:
    """Whether torch's ``lerp_`` writes a ``kind`` tensor in ``mode`` (tensors of their own)."""
    s, x = make(kind), make(src, 1)
    try:
        with MODES[mode]():
            s.lerp_(x, 0.25)
    except RuntimeError:
        return False
    return True


def expected(kind: str, src: str = "plain") -> torch.Tensor:
    with torch.no_grad():
        return make(kind).detach().clone().lerp_(make(src, 1).detach(), 0.25)


CALLS = {   # each array function writing ``s`` (``x`` read); what it leaves in ``s``
    "ema_update_": lambda s, x: fastema.ema_update_(s, x, 0.75),
    "weight=": lambda s, x: fastema.ema_update_(s, x, weight=torch.tensor([0.25])),
    "copy_": lambda s, x: fastema.copy_(s, x),
    "swap_": lambda s, x: fastema.swap_(s, x),
    "ema_update_many_": lambda s, x: fastema.ema_update_many_([s], [x], 0.75),
}


def _after(name: str, kind: str, src: str) -> torch.Tensor:
    if name == "copy_":
        return make(src, 1).detach()
    if name == "swap_":
        return make(src, 1).detach()
    return expected(kind, src)


def _run(name: str, s: torch.Tensor, x: torch.Tensor, mode: str):
    """``CALLS[name]`` in ``mode``: None where it ran, else its RuntimeError; a refusal wrote nothing."""
    def version():
        return None if s.is_inference() else s._version   # (inference tensors have none)

    before, was = s.detach().clone(), version()
    try:
        with MODES[mode]():
            CALLS[name](s, x)
    except RuntimeError as err:
        assert torch.equal(s.detach(), before) and version() == was, name
        return err
    return None


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_first_call_refuses_what_lerp_refuses_and_writes_what_it_writes(name):
    for mode in MODES:
        for kind in KINDS:
            for src in ("plain", "leaf", "inference"):
                s, x = make(kind), make(src, 1)
                if name == "swap_" and src != "plain":
                    continue                     # swap_ writes both: its own cases below
                err = _run(name, s, x, mode)
                assert (err is None) == torch_takes(kind, mode, src), (name, mode, kind, src, err)
                if err is None:
                    assert torch.equal(s.detach(), _after(name, kind, src)), (name, mode, kind)


def test_swap_refuses_where_lerp_refuses_either_side():
    for mode in MODES:
        for a_kind in ("plain", "leaf", "inference"):
            for b_kind in ("plain", "leaf", "inference"):
                a, b = make(a_kind), make(b_kind, 1)
                err = _run("swap_", a, b, mode)
                takes = torch_takes(a_kind, mode) and torch_takes(b_kind, mode)
                assert (err is None) == takes, (mode, a_kind, b_kind, err)
                if err is not None:
                    assert torch.equal(b.detach(), make(b_kind, 1).detach())


def test_flag_nonfinite_refuses_an_inference_flag_outside_inference_mode():
    src = torch.tensor([1.0, float("nan")])
    for mode in MODES:
        with torch.inference_mode():
            flag = torch.zeros(1, dtype=torch.int32)
        with MODES[mode]():
            if mode == "inference":
                fastema.flag_nonfinite_(flag, src)
                assert int(flag) == 1
                continue
            with pytest.raises(RuntimeError, match="flag is an inference tensor .*Nothing was "
                                                   r"written.*inside torch\.inference_mode\(\)"):
                fastema.flag_nonfinite_(flag, src)
            assert int(flag) == 0


TAKES_IN = {"leaf": "no_grad", "param": "no_grad", "view of leaf": "no_grad",
            "no_grad view": "no_grad", "unbind view": "no_grad", "inference": "inference",
            "inference_mode view": "no_grad", "view made to require grad": "no_grad",
            "view of inference": "inference", "plain": "grad", "computed": "grad"}


@pytest.fixture(params=["torch", "streamed"])
def guard(request):
    """A hit's layout guard: torch's batched C++ one (where this torch has one that passes the
    self-test), or fastema's streamed comparison."""
    import fastema._backends.torch as tb

    if request.param == "torch" and tb._tensor_guards() is None:
        pytest.skip("this torch has no batched tensor guard that passes the self-test")
    with tb.streamed_layout_checks() if request.param == "streamed" else contextlib.nullcontext():
        yield request.param


@pytest.mark.parametrize("name", sorted(set(CALLS) - {"weight="}))   # weight=: never cached
def test_a_cached_call_in_another_mode_refuses_what_lerp_refuses(name, guard):
    """Each kind cached by a call in a mode that takes it, then called in every mode, twice (a
    hit, a refusal, a hit again): the same answers as torch's ``lerp_`` on the same tensor."""
    for kind, first in TAKES_IN.items():
        s, x = make(kind), make("plain", 1)
        assert _run(name, s, x, first) is None, (name, kind)
        for mode in (*MODES, *MODES):
            err = _run(name, s, x, mode)
            assert (err is None) == torch_takes(kind, mode), (name, guard, kind, first, mode, err)


def test_a_tensor_made_to_require_grad_since_its_call_was_cached_is_refused(guard):
    s, x = torch.zeros(N), torch.ones(N)
    for name in ("ema_update_", "ema_update_many_", "copy_"):
        assert _run(name, s, x, "grad") is None
        s.requires_grad_()
        err = _run(name, s, x, "grad")
        assert isinstance(err, RuntimeError) and "requires grad" in str(err), (name, guard)
        assert _run(name, s, x, "no_grad") is None
        s.requires_grad_(False)
        assert _run(name, s, x, "grad") is None


@pytest.mark.parametrize("cached_in", ["grad", "inference"])
def test_an_inference_tensor_over_a_cached_normal_ones_memory_is_refused(guard, cached_in):
    """torch's guard made in inference mode cannot tell an inference tensor from a normal one: the
    entry rechecks the mode; made outside, the dispatch keys tell them apart (streamed: the flag)."""
    memory = np.zeros(N, np.float32)
    normal, x = torch.from_numpy(memory), torch.ones(N)
    with torch.inference_mode():
        inference = torch.from_numpy(memory)
    assert inference.is_inference() and inference.data_ptr() == normal.data_ptr()
    for name in ("ema_update_", "ema_update_many_", "copy_"):
        assert _run(name, normal, x, cached_in) is None
        err = _run(name, inference, x, "grad")
        assert isinstance(err, RuntimeError) and "inference tensor" in str(err), (name, guard)


def test_the_refusals_say_torchs_words_and_the_fix():
    x = torch.ones(N)
    said = {
        "leaf": r"shadow is a leaf tensor that requires grad \(a parameter\?\) and grad mode is on: "
                r"torch refuses it in an in-place operation \(\"a leaf Variable that requires grad "
                r"is being used in an in-place operation\"\), and so does fastema\. Nothing was "
                r"written\. Call it under torch\.no_grad\(\)",
        "view of leaf": r"shadow is a view of a leaf tensor, requires grad, and grad mode is on"
                        r".*\"a view of a leaf Variable.*torch\.no_grad\(\)",
        "no_grad view": r"shadow is a view made in no_grad mode of a tensor that requires grad.*"
                        r"torch\.no_grad\(\), or pass a tensor of its own \(t\.clone\(\)\)",
        "unbind view": r"shadow is a view made by a function returning several views",
        "inference_mode view": r"shadow is a view made in inference mode of a tensor that requires",
        "inference": r"shadow is an inference tensor \(made under torch\.inference_mode\(\)\) and "
                     r"inference mode is off: torch refuses to update it in place \(\"Inplace "
                     r"update to inference tensor outside InferenceMode is not allowed\"\).*Call "
                     r"it inside torch\.inference_mode\(\), or pass a normal tensor",
    }
    for kind, words in said.items():
        with pytest.raises(RuntimeError, match=words):
            fastema.ema_update_(make(kind), x, 0.5)
    with pytest.raises(RuntimeError, match=r"shadows\[1\] is a leaf tensor that requires grad"):
        fastema.ema_update_many_([torch.zeros(N), make("leaf")], [x, x], 0.5)


def test_the_drop_ins_write_targets_that_require_grad_in_grad_mode_as_the_originals_do():
    """SB3's ``polyak_update`` runs under ``no_grad``; its drop-in (no ``no_grad`` of its own on the
    usual step) still averages a target network that requires grad, called in grad mode: first
    call and cached, torch's lerp bit for bit."""
    from fastema.torch.compat.sb3 import polyak_update

    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    ref = [t.detach().clone() for t in target.parameters()]
    for _ in range(3):
        polyak_update(online.parameters(), target.parameters(), 0.25)
        for r, p in zip(ref, online.parameters()):
            r.lerp_(p.detach(), 0.25)
        assert all(torch.equal(t.detach(), r) for t, r in zip(target.parameters(), ref))
    assert all(t.requires_grad for t in target.parameters())


def test_inside_torch_compile_a_leaf_that_requires_grad_is_refused_as_lerp_s_trace_refuses():
    """The compiled operators run the eager functions under a custom op's ``no_grad``: the trace
    reads grad mode and the leaf, and refuses where torch's ``lerp_`` refuses (with fastema's
    message); under ``no_grad`` both compile and write."""
    pytest.importorskip("fastema.torch")

    def ours(s, x):
        fastema.ema_update_(s, x, 0.75)

    def theirs(s, x):
        s.lerp_(x, 0.25)

    for fn in (ours, theirs):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="eager")
        s, x = make("param"), make("plain", 1)
        with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
            compiled(s, x)
        assert torch.equal(s.detach(), make("plain"))
        with torch.no_grad():
            compiled(s, x)
        assert torch.equal(s.detach(), expected("param")), fn.__name__
    torch._dynamo.reset()
