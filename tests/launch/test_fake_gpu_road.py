"""The fake GPU takes the GPU's road (issue 78 item 6, issue 80 item 4): it is an adapter of its own in
``testkit`` (``testkit.fake_backend.FakeGpuBackend``, given through ``fastema._backends.using``), fastema
holds no stand-in, and every face that picks a plan or a path by device asks the adapter, so on the fake
GPU each takes the plan a real GPU takes: a default ``EMA``'s (and ``PostHocEMA``'s, ``TargetNetwork``'s,
an attached one's) device plan, the capture refusals of a host plan, the skip flags on the GPU. What a
GPU would do is read off the fake driver's record: the kernels launched, on torch's stream. And no cache
outlives the adapter it was made under (issue 77, M7)."""
import ast
import copy
import functools
import os
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":      # the fake stands in for the real numba-cuda
    pytest.skip("the fake GPU stands in for the real numba-cuda, not the simulator", allow_module_level=True)
pytest.importorskip("numba.cuda.dispatcher")

import fastema  # noqa: E402
from fastema import _backends  # noqa: E402
from fastema.torch import EMA, PostHocEMA, TargetNetwork, WindowAverage  # noqa: E402
from testkit.fake_backend import FakeGpuBackend  # noqa: E402
from testkit.fake_gpu import TORCH_STREAM, fake_gpu, rl_mlp  # noqa: E402

ROOT = pathlib.Path(__file__).parents[2]
STAND_IN = {"StandIn", "_STANDS", "standing_in", "_TorchStandIn", "_torch_on_gpu"}


def _kernels(fake) -> list:
    """The kernel families launched (``plan_lerp``, ``lerp``, ``copy``...), in order, from the fake
    driver's record: each launch's function handle back to the entry point it was loaded as."""
    entries = {h: e for e, h in fake.handles.items()}
    out = []
    for e in fake.launches:
        if e[0] == "launch":
            assert e[1] == TORCH_STREAM, e                 # on torch's current stream
            out.append(re.search(r"4cuda\d+(\w+?)_kernel", entries[int(e[3])]).group(1))
    return out


# ------------------------------------------------------------ fastema holds no fake


WORDS = re.compile("|".join([*STAND_IN, "testkit", "is_cuda", "is_cpu", r"device\.type", "is_available",
                              "is_current_stream_capturing"]))


@functools.cache
def _library() -> list:
    """``(path, AST)`` of every module of fastema that spells a name the rules below look for, parsed
    once (a module that spells none holds none: parsing the others is most of the time)."""
    texts = [(p, p.read_text()) for p in sorted((ROOT / "fastema").rglob("*.py"))]
    return [(p, ast.parse(text)) for p, text in texts if WORDS.search(text)]


def test_fastema_holds_no_stand_in():
    """No name of the stand-in the fake GPU was (a class and branches in the product's torch adapter)
    is defined, read or called in fastema, and nothing there imports testkit."""
    found = []
    for path, tree in _library():
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) \
                else node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if name in STAND_IN or any(m.split(".")[0] == "testkit" for m in mods):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name or mods}")
    assert not found, found


# Reads of a torch device left outside the boundary (fastema/_backends), each torch's own question, not a
# path fastema picks by where a tensor is (what the fake GPU's adapter answers): file -> (reads, why). A
# new read that picks a path asks the adapter (_backends.device_of, _backends.capturing); any other is
# listed here with its reason.
PHYSICAL = {
    "fastema/torch/_sharding/params.py": (2, "a DTensor mesh's device type (torch's collectives)"),
    "fastema/torch/_sharding/masters.py": (1, "a mesh's device type (torch's collectives)"),
    "fastema/torch/_state/stream.py": (1, "a ZeRO-3 mesh's device type (torch's collectives)"),
    "fastema/torch/_placement/gather.py": (3, "the wire device and dtype of a collective (NCCL or gloo)"),
    "fastema/torch/_state/checkpoint.py": (1, "a meta tensor (no memory)"),
    "fastema/torch/_tensors/slots.py": (1, "a meta tensor (no memory)"),
    "fastema/torch/_face/attach.py": (1, "DCP's dummy step: a learning rate read on the host without a sync"),
    "fastema/torch/_tensors/model.py": (3, "FSDP2's CPU offload copies, torch.compile's cudagraph trees"),
    "fastema/torchtitan/_export.py": (1, "a meta tensor (no memory)"),
    "fastema/torchtitan/_state.py": (1, "an offloaded copy handed to DCP on its mesh's device (torch's collectives)"),
}


def _device_reads(tree: ast.AST) -> int:
    """A tensor's ``is_cuda``/``is_cpu``/``.device.type``, ``torch.cuda.is_available()`` and the capture
    query (``_launch.is_cuda(name)``, a call, asks of a device fastema named: not counted)."""
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    n = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        of = node.value.attr if isinstance(node.value, ast.Attribute) else None
        if node.attr in ("is_cuda", "is_cpu") and id(node) not in called or node.attr == "is_current_stream_capturing" \
                or (node.attr, of) in (("type", "device"), ("is_available", "cuda")):
            n += 1
    return n


def test_the_faces_ask_the_adapter_where_a_tensor_is():
    """``EMA(model)`` chose its plan by ``t.device.type`` and ``TargetNetwork`` its capture refusal by
    ``torch.cuda.is_available()``: the fake GPU's CPU tensors took the CPU's road."""
    reads = {str(p.relative_to(ROOT)): _device_reads(tree) for p, tree in _library() if "_backends" not in p.parts}
    assert {f: n for f, n in reads.items() if n} == {f: n for f, (n, _) in PHYSICAL.items()}


# ------------------------------------------------------------ the adapter and its seam


def test_the_fake_backend_is_asked_first_and_stands_for_torch_for_the_block():
    t = torch.zeros(4)
    fake = FakeGpuBackend()
    assert _backends.backend_of(t) is _backends.TORCH
    with _backends.using(fake) as given:
        assert given is fake
        assert _backends.backend_of(t) is fake and _backends.backend_named("torch") is fake
        assert _backends.device_of(t) == "cuda:0" and _backends.describe(t, "t").device == "cuda:0"
        assert _backends.backend_of(t.numpy()) is _backends.NUMPY
        with _backends.using(FakeGpuBackend(device="cuda:1")):            # blocks nest: the innermost first
            assert _backends.device_of(t) == "cuda:1"
        assert _backends.device_of(t) == "cuda:0"
    assert _backends.backend_of(t) is _backends.TORCH and _backends.device_of(t) == "cpu"


def test_the_fake_backend_is_held_to_the_torch_adapters_refusals():
    """It is fastema's torch adapter with one answer changed: what the real one refuses, it refuses."""
    with _backends.using(FakeGpuBackend()):
        with pytest.raises(TypeError, match="float64 on cuda:0"):
            _backends.describe(torch.zeros(3, dtype=torch.float64), "x")
        with pytest.raises(ValueError, match="is on meta"):
            _backends.describe(torch.zeros(3, device="meta"), "x")
        with pytest.raises(TypeError, match="lazily negated"):
            _backends.describe(torch.zeros(3)._neg_view(), "x")


def test_a_fake_capture_is_the_drivers():
    with fake_gpu(record=False) as fake:
        assert not _backends.capturing("torch", "cuda:0")
        fake.capture = True
        assert _backends.capturing("torch", "cuda:0")
        assert not _backends.capturing("torch", "cpu")


# ------------------------------------------------------------ each face on the GPU's road


@pytest.mark.parametrize("face", ["EMA", "PostHocEMA"])
def test_a_default_ema_takes_the_device_plan_on_the_fake_gpu(face, tmp_path):
    """As on a GPU: the plan on the device (the update's lerp carries the plan step), and a capture
    goes on; made with ``device_step=False``, the host plan's update refuses the capture. It ran the
    host plan (``device_step`` False, ``lerp`` launched) and no capture query was made."""
    with fake_gpu() as fake, torch.no_grad():
        net = rl_mlp()
        make = (lambda **kw: EMA(net, 0.99, **kw)) if face == "EMA" else \
            (lambda **kw: PostHocEMA(net, snapshot_every=None, path=tmp_path, **kw))
        ema = make()
        assert ema.device_step is True
        ema.update()
        fake.launches.clear()
        ema.update()
        assert _kernels(fake) == ["plan_lerp"]
        fake.capture = True
        ema.update()                                       # a capture replays the device plan
        assert _kernels(fake) == ["plan_lerp", "plan_lerp"]
        fake.capture = False
        host = make(device_step=False)
        host.update()
        fake.launches.clear()
        fake.capture = True
        with pytest.raises(RuntimeError, match="captured in a CUDA graph, but this EMA keeps its schedule on the host"):
            host.update()
        assert _kernels(fake) == []                         # refused before any launch


def test_a_target_network_on_a_host_plan_refuses_a_fake_capture():
    """It asked ``torch.cuda.is_available()`` first, which the fake GPU's torch says no to: captured,
    the host plan's update went on, which no replay would repeat."""
    with fake_gpu() as fake, torch.no_grad():
        online = rl_mlp()
        tn = TargetNetwork(online, copy.deepcopy(online).requires_grad_(False), tau=0.01)
        assert tn.device_step is True
        host = TargetNetwork(online, copy.deepcopy(online).requires_grad_(False), tau=0.01, device_step=False)
        tn.update()
        host.update()
        fake.launches.clear()
        fake.capture = True
        tn.update()
        assert _kernels(fake) == ["plan_lerp"]
        with pytest.raises(RuntimeError, match="TargetNetwork.update\\(\\) is being captured"):
            host.update()
        assert _kernels(fake) == ["plan_lerp"]


def test_a_target_networks_integer_buffers_wait_for_the_gpus_skip_flag():
    """The integer buffers (BatchNorm's counters) are copied behind the skip flag of their device, as
    the GPU's adapter names it: they were looked up as "cpu", so the device plan was made for a CPU
    beside the fake GPU too, which crashed at construction (a fake device array in a CPU kernel)."""
    from torch import nn

    with fake_gpu(), torch.no_grad():
        online = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        target = copy.deepcopy(online)
        tn = TargetNetwork(online, target, tau=0.01, skip_nonfinite=True)
        assert tn.device_step is True and set(tn.memory()) == {"cuda:0"}
        tn.update()
        assert set(tn.skipped) == {"cuda:0"}
        tn.skipped["cuda:0"].fill_(1)                       # the GPU's scan found an inf/NaN
        online[1].num_batches_tracked += 5
        tn.update()
        assert target[1].num_batches_tracked.item() == 0    # skipped there: kept
        tn.skipped["cuda:0"].zero_()
        tn.update()
        assert target[1].num_batches_tracked.item() == 5


def test_an_attached_ema_takes_the_gpus_road_under_a_fused_grad_scaler_step():
    """Attached to an optimizer that GradScaler steps with ``found_inf`` (a fused one): a default EMA
    (device plan) refuses, naming ``device_step``, as on a GPU; one on the host plan takes the flag on
    the device. Its skip flags were made by ``torch.zeros(device="cuda:0")``: "Torch not compiled with
    CUDA enabled"."""
    with fake_gpu() as fake:
        net = rl_mlp()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)   # no gradients: it moves nothing
        ema = EMA(net, 0.99)
        ema.attach(opt)
        opt.step()
        fake.launches.clear()
        opt.step()
        assert _kernels(fake) == ["plan_lerp"]
        opt.found_inf = torch.zeros(1)
        with pytest.raises(RuntimeError, match="cannot skip on the device \\(device_step=True"):
            opt.step()
        ema.detach()
        host = EMA(net, 0.99, device_step=False)
        host.attach(opt)
        opt.step()                                         # the first: its flags made, its launch bound
        fake.launches.clear()
        syncs = fake.counters["host_syncs"]
        opt.step()
        assert _kernels(fake) == ["lerp"] and fake.counters["host_syncs"] == syncs


@pytest.mark.parametrize("window", [None, 3])
def test_a_window_average_launches_on_the_fake_gpu(window):
    """No device plan (a window average keeps none): its snapshots are the GPU's launches, on torch's
    stream, with no host sync."""
    with fake_gpu() as fake, torch.no_grad():
        avg = WindowAverage(rl_mlp(), window)
        avg.update()
        fake.launches.clear()
        syncs = fake.counters["host_syncs"]
        avg.update()
        assert _kernels(fake) and fake.counters["host_syncs"] == syncs


# ------------------------------------------------------------ no cache outlives its adapter (issue 77, M7)


@pytest.mark.parametrize("many", [True, False])
def test_no_cached_launch_is_found_across_the_fake_gpus_edge(many):
    """After a fake-GPU block, ``ema_update_many_`` on the same CPU tensors found the block's pairs by
    their addresses and launched them on the fake (a silent no-op); in a block after a CPU call, it
    found the CPU's and ran them; in a second block, the first block's driver's. Now the fake's address
    keys are its own (its number before the addresses)."""
    shadows, sources = [torch.zeros(8), torch.zeros(4)], [torch.ones(8), torch.ones(4)]

    def update():
        if many:
            fastema.ema_update_many_(shadows, sources, 0.5)
        else:
            fastema.ema_update_(shadows[0], sources[0], 0.5)

    update()
    assert shadows[0][0].item() == 0.5
    for _ in range(2):                                     # two blocks: two fake GPUs, two drivers
        with fake_gpu() as fake:
            update()
            assert shadows[0][0].item() == 0.5 and len(_kernels(fake)) == 1   # launched, nothing run
    update()
    assert shadows[0][0].item() == 0.75
