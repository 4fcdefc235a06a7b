"""Faults around post-hoc snapshots: a pickle planted in every file the reader opens (H1), a disk
that fills, a file size limit, a folder that goes away (M5), truncated, empty, garbage, edited or
bit-flipped snapshots and DCP shards (L1), and on 2 gloo ranks a refused folder and a failed
metadata write on rank 0. Each asserts that nothing ran, that the error names the file (one line on
the command line, no traceback) and that nothing the user had changed."""
import contextlib
import copy
import errno
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings

import pytest
from support import faults

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from posthoc_cli import one_line, run_cli  # noqa: E402
from torch import nn  # noqa: E402

from fastema import posthoc  # noqa: E402
from fastema.posthoc import SnapshotError  # noqa: E402
from fastema.schedules import sigma_rel_to_gamma  # noqa: E402
from fastema.torch import PostHocEMA  # noqa: E402

GAMMAS = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]


class _Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _dcp_run(tmp_path):
    """A folder with one DCP snapshot (kind dcp, as a sharded PostHocEMA writes it): its directory."""
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "dcp"
    run.mkdir()
    base = run / "snapshot-000000000010"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"0:w": torch.ones(4), "1:w": torch.full((4,), 2.0)}, checkpoint_id=str(base), no_dist=True)
    meta = {"format": "fastema.posthoc", "version": "1", "time": "10", "updates": "10", "gammas": json.dumps(GAMMAS),
            "averaged": "[\"w\"]", "others": "[]", "kind": "dcp"}      # as in the report (a version-1 snapshot)
    (run / "snapshot-000000000010.json").write_text(json.dumps(meta))
    return run, base


def _plain_run(tmp_path, every=10, updates=30):
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ph = PostHocEMA(net, snapshot_every=every, path=tmp_path / "run")
    g = torch.Generator().manual_seed(0)
    for _ in range(updates):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        ph.update()
    return ph, tmp_path / "run"


# --------------------------------------------------------------------------- planted pickles (H1)

@pytest.mark.parametrize("target", [".metadata", ".distcp", ".json", ".safetensors"])
def test_a_pickle_planted_in_any_file_the_reader_opens_never_runs(tmp_path, capsys, target):
    """reliability H1: synthesize() and the CLI unpickled a DCP snapshot's .metadata (os.system ran).
    A planted pickle in each file the post-hoc reader opens is refused, naming the file; nothing runs."""
    marker = tmp_path / "PWNED"
    if target == ".safetensors":
        _, run = _plain_run(tmp_path)
        victim = run / "snapshot-000000000020.safetensors"
    else:
        run, base = _dcp_run(tmp_path)
        victim = {".metadata": base / ".metadata", ".distcp": base / "__0_0.distcp",
                  ".json": run / "snapshot-000000000010.json"}[target]
    assert posthoc.synthesize(run, 0.07, max_error=1.0)                # intact: it reads
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p != victim}
    victim.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ValueError) as err:
        posthoc.synthesize(run, 0.07, max_error=1.0)
    assert victim.name in str(err.value) and not marker.exists()
    rc, out, err_text = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
    assert rc == 1 and not marker.exists() and not (tmp_path / "o.pt").exists()
    one_line(err_text, victim.name)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p != victim} == before


def _text(x: str) -> bytes:
    data = x.encode()
    return b"X" + struct.pack("<I", len(data)) + data                 # BINUNICODE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"      # GLOBAL


def _build(target: bytes, **attrs: bytes) -> bytes:
    """Pickle opcodes that push ``target`` and BUILD it with (None, {name: value}): setattr on it."""
    items = b"".join(_text(k) + v + b"s" for k, v in attrs.items())     # SETITEM each
    return target + b"N}" + items + b"\x86b0"                           # TUPLE2, BUILD, POP


_METADATA = "torch.distributed.checkpoint.metadata"
# Each payload calls nothing but allowed globals: what a find_class allow-list alone let through (round 3).
STATE_PAYLOADS = {
    "build_on_a_class": _build(_global("pathlib", "PosixPath"), poisoned=_text("yes"),
                               exists=_global("collections", "OrderedDict")),
    "build_on_a_function": _build(_global("torch.serialization", "_get_layout"), cache=_text("z")),
    "build_on_a_shared_enum_member": _build(_global(_METADATA, "_MEM_FORMAT_ENCODING") + b"K\x00\x85R",
                                            poisoned=_text("yes")),
    "build_undeclared_field": _build(_global(_METADATA, "BytesStorageMetadata") + b")\x81",
                                     __class__=_global("pathlib", "PosixPath")),
}


def _process_state():
    """What the payloads would change in this process (compared before and after)."""
    import pathlib

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    cache = torch.serialization._get_layout.cache
    return {"PosixPath": dict(vars(pathlib.PosixPath)), "cache": dict(cache) if type(cache) is dict else cache,
            "members": [dict(vars(m)) for m in _MEM_FORMAT_ENCODING]}


@pytest.mark.parametrize("payload", sorted(STATE_PAYLOADS))
def test_a_planted_dcp_metadata_changes_nothing_in_the_process(tmp_path, capsys, payload):
    """Review of H1: the allow-list of globals still let pickle's BUILD run setattr on anything it
    allowed: a planted .metadata set PosixPath.poisoned, replaced PosixPath.exists and
    torch.serialization._get_layout.cache (every later torch.load broke). Now BUILD sets only
    declared fields of DCP's metadata classes on the instances the reader made: each payload is
    refused naming the file, and no class, function or enum member of the process changed."""
    import pathlib

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    run, base = _dcp_run(tmp_path)
    (base / ".metadata").write_bytes(b"\x80\x02" + STATE_PAYLOADS[payload] + b"N.")
    torch.serialization._get_layout("torch.strided")                   # its cache filled, as after any load
    before = _process_state()
    exists = pathlib.PosixPath.exists
    try:
        with pytest.raises(ValueError, match=r"\.metadata' was not loaded: it (sets the state of|sets "
                                             r"BytesStorageMetadata\.'__class__', not a field).*Nothing of it ran"):
            posthoc.synthesize(run, 0.07, max_error=1.0)
        rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
        assert rc == 1 and not (tmp_path / "o.pt").exists()
        one_line(err, ".metadata", "was not loaded")
        assert _process_state() == before and pathlib.PosixPath.exists is exists
        assert pathlib.Path(tmp_path).exists()
    finally:                                                           # a regression must not poison later tests
        for name in ("poisoned", "exists"):
            if name in vars(pathlib.PosixPath) and name not in before["PosixPath"]:
                delattr(pathlib.PosixPath, name)
        torch.serialization._get_layout.cache = {}
        for m in _MEM_FORMAT_ENCODING:
            vars(m).pop("poisoned", None)


def test_the_command_line_never_runs_a_planted_dcp_metadata_pickle(tmp_path):
    """H1 as reported: ``python -m fastema posthoc`` on a DCP snapshot whose .metadata is a pickle
    that runs os.system. One line naming the file, exit status 1, nothing run."""
    run, base = _dcp_run(tmp_path)
    marker = tmp_path / "PWNED"
    (base / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    res = subprocess.run([sys.executable, "-m", "fastema", "posthoc", str(run), "--sigma-rel", "0.07",
                          "--max-error", "1", "--out", str(tmp_path / "o.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and not marker.exists() and not (tmp_path / "o.safetensors").exists()
    one_line(res.stderr, ".metadata", "Nothing of it ran")


_HOSTILE_METADATA = r"""
import json, os, resource, sys, warnings
warnings.simplefilter("ignore")
from fastema import posthoc
from fastema._io import safe_files
run, md = sys.argv[1], sys.argv[2]
posthoc.synthesize(run, 0.07, max_error=1.0)               # intact: what reading imports, and its memory
lazy = [m for m in ("torch._dynamo", "torch._inductor", "torch.onnx", "torch._export") if m not in sys.modules]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
BIG = 200 << 20

def case(name, data, size=0):
    with open(md, "wb") as f:
        f.write(data)
        f.truncate(max(size, len(data)))                      # a sparse file: its size only apparent
    try:
        posthoc.synthesize(run, 0.07, max_error=1.0)
        text = "read"
    except (ValueError, MemoryError) as err:
        text = f"{type(err).__name__}: {err}"
    print(json.dumps([name, text]), flush=True)

case("bytes", b"\x80\x04\x8e" + BIG.to_bytes(8, "little"), BIG + 11)          # BINBYTES8 of 200 MiB
case("line", b"\x80\x02I", BIG)                                               # INT, its line never ends
case("frame", b"\x80\x04\x95" + (1 << 62).to_bytes(8, "little") + b"N.")
case("file", b"\x80\x04\x8e" + (300 << 20).to_bytes(8, "little"), 300 << 20)  # beyond the bound on a .metadata
for name in ("_dynamo", "_inductor", "onnx", "_export"):
    case("lazy" + name, b"\x80\x02ctorch\n" + name.encode() + b"\n.")          # torch's lazy __getattr__
with safe_files.assumed_free(1 << 20):                                       # 1 MiB free: 70000 dicts exceed it
    case("objects", b"\x80\x04(" + b"}" * 70000 + b"l.")
print(json.dumps(["state", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024,   # MiB
                  [m for m in lazy if m in sys.modules]]), flush=True)
deep = b"K\x01" + b"\x85" * 300000                                            # a tuple nested 300000 deep
case("list", b"\x80\x04" + b"]" * 300000 + b"a" * 299999 + b".")
case("set", b"\x80\x04\x8f(" + deep + b"\x90.")
case("key", b"\x80\x04}" + deep + b"K\x01s.")                                  # hashing it recursed in C: SIGSEGV
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and /proc: Linux")
def test_a_hostile_dcp_metadata_neither_crashes_nor_bloats_nor_imports(tmp_path):
    """Second review of H1, each in one fresh process (a regression kills it, not pytest): a dict key made of
    300000 nested tuples crashed the process (SIGSEGV: CPython's tuple hash recursing in C); a BINBYTES8 or an
    INT line of a sparse .metadata made it read 200 MiB (1 GiB: 1.4 and 2.5 GB of memory); ``c torch
    _dynamo`` imported torch._dynamo before it was refused (torch's lazy module __getattr__). Now: objects
    nest at most 32 deep, keys are flat, sets are refused, no read or line is over 4 MiB, a .metadata over
    256 MiB is refused from its size, the memory the parse holds is bounded by what was free, and globals are
    looked up in the module's own namespace. Each is refused naming the file; nothing is imported."""
    run, base = _dcp_run(tmp_path)
    res = subprocess.run([sys.executable, "-c", _HOSTILE_METADATA, str(run), str(base / ".metadata")],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    got = {name: text for name, *text in map(json.loads, res.stdout.splitlines())}
    for name, text in got.items():
        if name != "state":
            assert ".metadata" in text[0] and "Nothing of it ran" in text[0] or name in ("file", "objects"), text
    assert "a string, bytes or frame of 209715200 bytes, more than the 4194304" in got["bytes"][0]
    assert "a line longer than 4194304 bytes" in got["line"][0]
    assert "a string, bytes or frame of 4611686018427387904 bytes" in got["frame"][0]
    assert "is 314572800 bytes, more than the 268435456 fastema reads" in got["file"][0]
    for name in ("_dynamo", "_inductor", "onnx", "_export"):
        assert f"asks to load torch.{name}" in got["lazy" + name][0]
    assert got["objects"][0].startswith("MemoryError: ") and "over half of the 1048576 bytes free" in \
        got["objects"][0], got["objects"]
    growth_mib, imported = got["state"]
    assert growth_mib < 100 and imported == [], got["state"]
    assert "nests objects more than 32 deep" in got["list"][0]
    assert "opcode EMPTY_SET" in got["set"][0]
    assert "nests objects more than 32 deep" in got["key"][0]


def test_a_dcp_metadata_whose_storage_meta_is_a_shared_object_is_refused_before_it_is_touched(tmp_path, capsys):
    """Second review of H1: the reader set ``storage_meta.load_id`` on whatever the .metadata gave as
    storage_meta (pathlib.PosixPath, an enum member, torch.serialization._get_layout: all allowed globals),
    and the metadata's fields were never checked by type. Every field of every metadata object is now checked
    by its exact type as the pickle sets it: refused naming the file, and nothing of the process changed."""
    import pathlib

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    run, base = _dcp_run(tmp_path)
    with open(base / ".metadata", "rb") as f:
        intact = pickle.load(f)                                        # written by this test: trusted here
    for target in (pathlib.PosixPath, _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT, torch.serialization._get_layout):
        md = copy.copy(intact)
        md.storage_meta = target                                       # a GLOBAL, or an enum's REDUCE
        (base / ".metadata").write_bytes(pickle.dumps(md, protocol=2))
        try:
            with pytest.raises(ValueError, match=r"\.metadata' was not loaded: it sets Metadata\.storage_meta to "
                                                 r"(the class pathlib|a torch.distributed|the function torch)"):
                posthoc.synthesize(run, 0.07, max_error=1.0)
            rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
            assert rc == 1 and not (tmp_path / "o.pt").exists()
            one_line(err, ".metadata", "storage_meta")
            assert "load_id" not in vars(target)
        finally:                                                       # a regression must not poison later tests
            with contextlib.suppress(AttributeError, TypeError):
                delattr(target, "load_id")


# --------------------------------------------------------------------------- corrupt files (L1)

def _rewrite_metadata(path, edit):
    """Rewrite a safetensors file's metadata with ``edit(meta)`` (the data as it was)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header["__metadata__"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])


def _flip_a_data_bit(path):
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n + 5] ^= 0x10
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-9]), "not a readable safetensors snapshot"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable safetensors snapshot"),
    "garbage": (lambda p: p.write_bytes(os.urandom(300)), "not a readable safetensors snapshot"),
    "bit_flip": (_flip_a_data_bit, "fails its checksum"),
    "no_time": (lambda p: _rewrite_metadata(p, lambda m: m.pop("time")), "has no 'time'"),
    "nan_time": (lambda p: _rewrite_metadata(p, lambda m: m.update(time="nan")), "'time' is 'nan'"),
    "bad_gammas": (lambda p: _rewrite_metadata(p, lambda m: m.update(gammas="[-0.5, 5]")), "'gammas'"),
    "wrong_shapes": (lambda p: _rewrite_metadata(p, lambda m: m.update(shapes=json.dumps(
        {**json.loads(m["shapes"]), "0.weight": [3, 3]}))), "with shape [3, 3]: snapshots of different models"),
    "ghost_other": (lambda p: _rewrite_metadata(p, lambda m: m.update(
        others=json.dumps(json.loads(m["others"]) + ["ghost"]), shapes=json.dumps(
            {**json.loads(m["shapes"]), "ghost": [1]}))), "no tensor 'model:ghost'"),
    "foreign_run": (lambda p: _rewrite_metadata(p, lambda m: m.update(run_id="someone-else")), "2 runs"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_snapshot_is_refused_naming_it(tmp_path, capsys, kind):
    """reliability L1: truncated, empty or garbage files, metadata without time, wrong shapes,
    ``others`` naming a missing tensor and bad stored gammas gave raw errors (tracebacks on the
    command line) or wrong numbers; a flipped data bit was read silently. Each is now refused,
    naming the file; one corrupt file refuses the folder (move it out to synthesise from the rest)."""
    corrupt, match = CORRUPTIONS[kind]
    ph, run = _plain_run(tmp_path)
    victim = run / "snapshot-000000000030.safetensors"          # the last: others are read from it
    corrupt(victim)
    with pytest.raises(ValueError) as refused:
        posthoc.synthesize(run, 0.07, max_error=1.0)
    assert "snapshot-000000000030" in str(refused.value) and match in str(refused.value), str(refused.value)
    rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.safetensors")
    assert rc == 1 and not (tmp_path / "o.safetensors").exists()
    one_line(err, "snapshot-000000000030")
    victim.rename(tmp_path / "moved-away")                       # the fix the message gives
    assert posthoc.synthesize(run, 0.07, max_error=1.0).solution.time == 20.0


def test_a_snapshot_whose_tensor_disagrees_with_its_metadata_is_refused(tmp_path):
    """One snapshot, its metadata edited to another shape of the same size: the tensor read is checked."""
    _, run = _plain_run(tmp_path, every=30)
    victim = run / "snapshot-000000000030.safetensors"
    _rewrite_metadata(victim, lambda m: m.update(shapes=json.dumps({**json.loads(m["shapes"]), "0.weight": [4, 3]})))
    with pytest.raises(ValueError, match=r"snapshot-000000000030.safetensors': '0:0.weight' has shape \[3, 4\], but "
                                         r"the metadata gives \[4, 3\]"):
        posthoc.synthesize(run, 0.07, max_error=1.0)


def test_a_truncated_dcp_shard_is_refused_naming_the_snapshot(tmp_path, capsys):
    run, base = _dcp_run(tmp_path)
    shard = base / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"DCP snapshot .*snapshot-000000000010': its data file '__0_0.distcp' "
                                         r"has 40 bytes, fewer than the .* its metadata describes: the snapshot is "
                                         r"truncated"):
        posthoc.synthesize(run, 0.07, max_error=1.0)
    rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.safetensors")
    assert rc == 1
    one_line(err, "snapshot-000000000010")


def test_a_dcp_metadata_that_claims_a_huge_tensor_is_refused_before_allocating_it(tmp_path):
    """A .metadata edited (no code in it) to give '0:w' a terabyte shape: refused from the bytes its
    data files hold, before torch.empty() is asked for it."""
    run, base = _dcp_run(tmp_path)
    with open(base / ".metadata", "rb") as f:
        md = pickle.load(f)                                    # written by this test: trusted here
    md.state_dict_metadata["0:w"].size = torch.Size([1 << 40])
    with open(base / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match=r"'0:w' claims shape \[1099511627776\].*data files hold \d+ bytes of it"):
        posthoc.synthesize(run, 0.07, max_error=1.0)


def _claim_in_metadata(base, key, numel):
    """Edit a DCP snapshot's .metadata (no code in it) so that ``key`` claims ``numel`` float32 values, and
    extend its data file to hold them in size only (a sparse file, as the review's reproduction)."""
    from torch.distributed.checkpoint import metadata as M

    with open(base / ".metadata", "rb") as f:
        md = pickle.load(f)                                    # written by this test: trusted here
    md.state_dict_metadata[key].size = torch.Size([numel])
    md.state_dict_metadata[key].chunks = [M.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([numel]))]
    (index, info), = [(i, v) for i, v in md.storage_data.items() if i.fqn == key]
    info.length = numel * 4 + 4096
    data = base / info.relative_path
    with open(data, "r+b") as f:
        f.truncate(max(os.path.getsize(data), info.offset + info.length))
    with open(base / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return data


def test_a_sparse_dcp_shard_claiming_more_than_memory_is_refused_before_allocating(tmp_path, capsys, monkeypatch,
                                                                                   request):
    """Review of H1/L1: the claim was checked against the data file's apparent size only, which a sparse
    file makes anything; a 60 GB claim reached torch.empty (RuntimeError: can't allocate memory, a traceback
    on the command line; with overcommit, an OOM kill while reading). A claim beyond the memory free here
    is refused, naming the file, before anything is allocated. Second review: it was called "forged" when its
    files hold less on disk, which a compressing file system (ZFS, btrfs) does to a real snapshot too: now a
    MemoryError that says the files are not fully stored on disk (sparse or compressed), accusing nothing."""
    import fastema._io.safe_files as F

    run, base = _dcp_run(tmp_path)
    numel = 16 << 20                                             # 64 MiB claimed; this machine "has" 8 MiB
    data = _claim_in_metadata(base, "0:w", numel)
    sparse = os.stat(data).st_blocks * 512 < numel * 4           # file systems without holes allocate it
    faults.held(request, F.assumed_free(8 << 20))
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    match = r"reading '0:w' needs 67108864 bytes of memory, more than the 8388608 bytes free here" + (
        r"; its data file\(s\) __0_0.distcp are not fully stored on disk \(\d+ bytes: sparse or compressed\), so if "
        r"the snapshot was not written this large it is damaged: move it out of the folder; if it was, synthesise "
        r"on a machine with more memory" if sparse else r": synthesise on a machine with more memory")
    with pytest.raises(MemoryError, match=match) as refused:
        posthoc.synthesize(run, 0.07, max_error=1.0)
    assert "forged" not in str(refused.value)
    assert not [a for a in allocations if a and a[0] and math.prod(a[0]) >= numel]
    rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
    assert rc == 1 and not (tmp_path / "o.pt").exists()
    one_line(err, "snapshot-000000000010", "0:w")


def test_an_allocation_that_fails_while_reading_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """A claim the machine's free memory seems to hold, whose allocation then fails (another process took
    the memory, a container limit): a MemoryError naming the snapshot and the tensor, one line on the
    command line (it was a raw RuntimeError traceback), and nothing written."""
    run, base = _dcp_run(tmp_path)
    real_empty = torch.empty

    def empty(*size, **kw):
        if size and isinstance(size[0], tuple) and math.prod(size[0]) >= 4:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 16 bytes. Error code 12 (Cannot allocate memory)")
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(MemoryError, match=r"DCP snapshot .*snapshot-000000000010': 16 bytes for '0:w' could not be "
                                          r"allocated .*can't allocate memory.*more memory"):
        posthoc.synthesize(run, 0.07, max_error=1.0)
    rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
    assert rc == 1 and not (tmp_path / "o.pt").exists()
    one_line(err, "snapshot-000000000010", "'0:w'", "could not be allocated")


_RESCUER = """
import os, sys, time
stop, found, fifos = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.monotonic()
while not os.path.exists(stop) and time.monotonic() < start + 3:
    time.sleep(0.02)
while not os.path.exists(stop) and time.monotonic() < start + 300:
    for fifo in fifos:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)   # ENXIO unless a reader has it open
        except OSError:
            continue
        os.close(fd)
        with open(found, "a") as f:
            f.write(fifo + "\\n")
    time.sleep(0.05)
"""


class _Rescue:
    """Opens the write end of FIFOs that a reader blocks on (after 3 s), from another process (a
    reader blocked in a native open may hold the GIL), so that a regression fails the test instead
    of hanging it: ``rescued()`` lists the FIFOs a reader had open."""

    def __init__(self, fifos, scratch):
        self.fifos, self.stop, self.found = [str(f) for f in fifos], scratch / "rescue.stop", scratch / "rescued"

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _RESCUER, str(self.stop), str(self.found), *self.fifos])
        return self

    def __exit__(self, *exc):
        self.stop.touch()
        self.proc.wait(timeout=60)

    def rescued(self):
        return self.found.read_text().split() if self.found.exists() else []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
@pytest.mark.parametrize("target", [".safetensors", ".json", ".metadata", ".distcp", "device"])
def test_a_fifo_or_device_named_like_a_snapshot_file_is_refused_and_never_read(tmp_path, capsys, target):
    """Review 1c: ``mkfifo run/snapshot-1.safetensors`` hung the command line, PostHocEMA.update() at its
    folder check, and a FIFO .metadata the DCP reader. Only regular files are opened: each is refused naming
    it (a symlink to a device too), and the reader never opened it (no hang)."""
    if target in (".safetensors", ".json", "device"):
        ph, run = _plain_run(tmp_path)
        victim = run / ("snapshot-000000000035.json" if target == ".json" else "snapshot-000000000035.safetensors")
    else:
        ph = None
        run, base = _dcp_run(tmp_path)
        victim = base / (".metadata" if target == ".metadata" else "__0_0.distcp")
        victim.unlink()
    if target == "device":
        if not os.path.exists("/dev/zero"):
            pytest.skip("needs /dev/zero")
        victim.symlink_to("/dev/zero")
        kind = "a character device"
    else:
        os.mkfifo(victim)
        kind = "a FIFO"
    with _Rescue([victim] if target != "device" else [], tmp_path) as rescue:
        with pytest.raises(ValueError, match=rf"{victim.name}' is {kind}.*, not a regular file"):
            posthoc.synthesize(run, 0.07, max_error=1.0)
        rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
        assert rc == 1 and not (tmp_path / "o.pt").exists()
        one_line(err, victim.name, "not a regular file")
        if ph is not None:                                    # the writers' folder check: refused, nothing applied
            with pytest.raises(ValueError, match=rf"not readable ones \({victim.name}: .*not a regular file"):
                ph.snapshot()
            fresh = PostHocEMA(ph.model, snapshot_every=10, path=run)
            with pytest.raises(ValueError, match=rf"not readable ones \({victim.name}: .*not a regular file"):
                fresh.update()                                # (its first check: it hung there)
            assert (ph.updates, fresh.updates, fresh.calls) == (30, 0, 0)
    assert rescue.rescued() == []


@pytest.mark.parametrize("name", ["snapshot-000000000005.safetensors", "snapshot-000000000005.json"])
@pytest.mark.parametrize("loop", [False, True])
def test_a_link_to_nothing_named_like_a_snapshot_is_refused_by_the_writers_and_the_readers(tmp_path, capsys,
                                                                                          name, loop):
    # the writers' folder check skipped it (its stat failed: "removed since the listing"), and the readers
    # failed with a bare "[Errno 2] No such file or directory" naming neither the link nor the fix
    ph, run = _plain_run(tmp_path)
    link = run / name
    link.symlink_to(link if loop else tmp_path / "old-run" / name)
    with pytest.raises(ValueError, match=rf"{name}' is a symbolic link to nothing .*move it out of the folder"):
        posthoc.synthesize(run, 0.07, max_error=1.0)
    rc, _, err = run_cli(capsys, run, "--sigma-rel", "0.07", "--max-error", "1", "--out", tmp_path / "o.pt")
    assert rc == 1 and not (tmp_path / "o.pt").exists()
    one_line(err, name, "symbolic link to nothing")
    fresh = PostHocEMA(ph.model, snapshot_every=10, path=run)
    with pytest.raises(ValueError, match=rf"not readable ones \({name}: .*symbolic link to nothing"):
        fresh.update()
    assert (fresh.updates, fresh.calls) == (0, 0)


# --------------------------------------------------------------------------- writes that fail (M5)

def _names(folder):
    """The files in a snapshot folder but its claim (.fastema-run, made before the first write)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".fastema-run")


class _FullDisk:
    """Makes every write of a snapshot file fail with ENOSPC (the way a full disk does)."""

    def __init__(self, monkeypatch):
        real = os.fdopen

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.f.close()

            def close(self):
                self.f.close()

            def tell(self):
                return 0

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: Full(real(fd, mode)) if "w" in mode
                            else real(fd, mode, *a, **k))                     # reads still work


def test_a_snapshot_that_cannot_be_written_keeps_the_update_and_is_retried(tmp_path, monkeypatch):
    """reliability M5: on a full disk update() raised after the update was counted and the snapshot
    was lost for good (a caller that retried double-counted). Now: SnapshotError (an OSError) saying
    the update was applied and counted; the counters are right; no file or temporary is left; the
    snapshot stays due and the next update writes it once there is space."""
    net = nn.Linear(8, 8)
    ph = PostHocEMA(net, snapshot_every=2, path=tmp_path)
    ph.update()
    disk = monkeypatch.context()
    with disk as m:
        _FullDisk(m)
        with pytest.raises(SnapshotError, match=r"update 2 was applied and counted; do not repeat it\. The snapshot "
                                                r"at time 2 was not written .*No space left.*retried at the next "
                                                r"update\(\)") as err:
            ph.update()
        assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
        assert (err.value.applied, err.value.updates, err.value.time) == (True, 2, 2.0)
        assert (ph.updates, ph.calls) == (2, 2)
        with pytest.raises(SnapshotError, match=r"update 3 was applied.*time 3 \(due since time 2, update 2\)"):
            ph.update()                                         # still full: retried, reported again
        with pytest.raises(SnapshotError, match=r"^The snapshot at time 3 .*retried at the next update"):
            ph.snapshot()                                       # an explicit call counts nothing
        assert (ph.updates, ph.calls) == (3, 3)
        assert _names(tmp_path) == []                           # no snapshot, no temporary
    ph.update()                                                 # space again: the due snapshot is written
    after_4 = {k: v.clone() for k, v in ph.averaged_state_dict(0).items()}
    ph.update()
    ph.update()
    assert _names(tmp_path) == ["snapshot-000000000004.safetensors",
                                                          "snapshot-000000000006.safetensors"]
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "snapshot-000000000004.safetensors"))
    assert all(torch.equal(stored[f"0:{k}"], v) for k, v in after_4.items())

    shutil.rmtree(tmp_path)                                     # the folder goes away (unmounted, deleted)
    ph.update()
    with pytest.raises(SnapshotError, match=r"update 8 was applied.*could not be written|update 8 was applied"):
        ph.update()
    os.makedirs(tmp_path)
    ph.update()
    assert _names(tmp_path) == ["snapshot-000000000009.safetensors"]


def test_a_snapshot_still_due_is_kept_by_the_checkpoint_and_written_after_a_resume(tmp_path, monkeypatch):
    """A snapshot that failed stays due, but state_dict() did not keep it and load_state_dict() cleared
    it: a run resumed from a checkpoint taken after the failure never wrote it (the run that went on
    wrote it at the next update). The checkpoint keeps it ("due_snapshot"), the resumed run writes it at
    its next update as the uninterrupted one does; a checkpoint without it has none due; a malformed one
    is refused before anything changes."""
    def weights(i):
        return torch.randn(8, 8, generator=torch.Generator().manual_seed(i))

    runs = {}
    for resumed in (False, True):
        net = nn.Linear(8, 8, bias=False)
        folder = tmp_path / str(resumed)
        ph = PostHocEMA(net, snapshot_every=3, path=folder)
        for i in range(1, 8):
            with torch.no_grad():
                net.weight.copy_(weights(i))
            if i != 3:
                ph.update()
                continue
            with monkeypatch.context() as m:
                _FullDisk(m)
                with pytest.raises(SnapshotError, match="update 3 was applied and counted"):
                    ph.update()
            state = ph.state_dict()
            assert state["due_snapshot"] == [3.0, 3]
            if resumed:
                ph = PostHocEMA(net, snapshot_every=3, path=folder)
                ph.load_state_dict(state)
        runs[resumed] = folder
    assert _names(runs[False]) == _names(runs[True]) == ["snapshot-000000000004.safetensors",
                                                         "snapshot-000000000006.safetensors"]
    from safetensors.torch import load_file

    for name in _names(runs[False]):
        a, b = load_file(str(runs[False] / name)), load_file(str(runs[True] / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    net = nn.Linear(8, 8, bias=False)
    older = {k: v for k, v in state.items() if k != "due_snapshot"}     # written before the key: none due
    ph = PostHocEMA(net, snapshot_every=3, path=tmp_path / "older")
    ph.load_state_dict(older)
    ph.update()
    assert _names(tmp_path / "older") == [] and "due_snapshot" not in ph.state_dict()
    import torch.distributed.checkpoint as dcp

    dcp.save({"ph": ph}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)   # none due
    due = PostHocEMA(nn.Linear(8, 8, bias=False), snapshot_every=3, path=tmp_path / "due")
    due.load_state_dict(state)
    dcp.load({"ph": due}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)  # dcp.load's template: no key
    assert due.updates == ph.updates and "due_snapshot" not in due.state_dict()
    for bad in ([3.0], "3", [0.0, 3], [float("nan"), 3], [9.0, 3], [3.0, 0], [3.0, 9], [3.0, True], [3.0, 2.5]):
        fresh = PostHocEMA(nn.Linear(8, 8, bias=False), snapshot_every=3, path=tmp_path / "bad")
        before = {k: v.clone() for k, v in fresh.averaged_state_dict(0).items()}
        with pytest.raises(ValueError, match=r"due_snapshot must be \[time, updates\] .*got "
                                             r".*pass what state_dict\(\) returned.*Nothing was loaded"):
            fresh.load_state_dict({**state, "due_snapshot": bad})
        assert (fresh.updates, fresh.calls) == (0, 0) and fresh.state_dict().get("due_snapshot") is None
        assert all(torch.equal(v, before[k]) for k, v in fresh.averaged_state_dict(0).items())


def test_a_file_size_limit_is_a_snapshot_error_and_the_next_update_writes_it(tmp_path):
    """RLIMIT_FSIZE (EFBIG; Python ignores SIGXFSZ): the same contract as a full disk."""
    resource = pytest.importorskip("resource")
    net = nn.Linear(64, 64)
    warm = PostHocEMA(net, snapshot_every=None, path=tmp_path / "warm")    # kernels compiled and cached first
    warm.update()
    warm.update()
    ph = PostHocEMA(net, snapshot_every=1, path=tmp_path / "run")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(SnapshotError, match="update 1 was applied and counted") as err:
            ph.update()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and ph.updates == 1 and _names(tmp_path / "run") == []
    ph.update()
    assert _names(tmp_path / "run") == ["snapshot-000000000002.safetensors"]


# --------------------------------------------------------------------------- 2 ranks (DCP snapshots)

def _sharded_faults(rank, world, snaps):
    from models import fsdp_mlp

    from fastema._io import files

    model = fsdp_mlp(8, 6, 2)
    out = {}
    if rank == 0:                                     # another run's snapshot, seen by rank 0 only
        os.makedirs(snaps, exist_ok=True)
        posthoc.write_snapshot(snaps, 1, {f"{k}:0.weight": (torch.ones(6, 8), torch.float32) for k in (0, 1)},
                               posthoc.SnapshotMeta(time=1, updates=1, gammas=GAMMAS, averaged=["0.weight"],
                                                    others=[], shapes={"0.weight": [6, 8]}, run_id="other"))
    dist.barrier()
    ph = PostHocEMA(model, snapshot_every=2, path=snaps)
    try:
        ph.update()
    except ValueError as err:
        out["refused"] = torch.tensor("another run, run other" in str(err))
    out["updates_after_refusal"] = torch.tensor(ph.updates)
    dist.barrier()
    if rank == 0:
        os.unlink(os.path.join(snaps, "snapshot-000000000001.safetensors"))
    dist.barrier()
    ph.update()

    class Full(files.FileSystem):                     # rank 0 cannot write the .json (the last step)
        def sync_file(self, fd, path):
            if path.endswith(".json"):
                raise OSError(errno.ENOSPC, "No space left on device")
            super().sync_file(fd, path)

    try:
        with files.using(Full() if rank == 0 else files.FileSystem()):
            ph.update()
    except SnapshotError as err:
        out["lost"] = torch.tensor([err.applied, err.updates, "do not repeat it" in str(err)])
    out["counters"] = torch.tensor([ph.updates, ph.calls])
    ph.update()                                       # the due snapshot, on both ranks
    out["final"] = torch.tensor([ph.updates])
    from torch.utils._pytree import tree_map

    state = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x),
                     ph.state_dict())                 # a checkpoint at t=3 (its DTensors cloned)
    for _ in range(3):
        ph.update()                                   # snapshots at 4 and 6, then the job is preempted
    resumed = PostHocEMA(model, snapshot_every=2, path=snaps)
    resumed.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.update()                              # t=4: rank 0 moves 4 and 6 aside, every rank writes 4
    out["superseded"] = torch.tensor([sum("superseded-000000000003" in str(w.message) for w in caught),
                                      resumed.updates])
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_sharded_snapshots_refuse_and_fail_together_on_every_rank(tmp_path):
    """A DCP snapshot is a collective: a folder only rank 0 looks into is refused on every rank, and a
    metadata write that fails on rank 0 raises SnapshotError on every rank (no rank left waiting in a
    collective); the counters agree and the next update writes the snapshot. A resume from a checkpoint
    before the last snapshots: rank 0 moves them aside (and warns), every rank goes on (review 1e)."""
    from dist import run_ranks

    snaps = str(tmp_path / "snaps")
    ranks = run_ranks(_sharded_faults, tmp_path / "ranks", 2, snaps, timeout=240)
    for r in ranks:
        assert bool(r["refused"]) and int(r["updates_after_refusal"]) == 0
        assert r["lost"].tolist() == [1, 2, 1] and r["counters"].tolist() == [2, 2] and r["final"].tolist() == [3]
    assert [r["superseded"].tolist() for r in ranks] == [[1, 4], [0, 4]]     # rank 0 moved them and warned
    found = posthoc.read_snapshots(snaps)
    assert [(s.kind, s.time) for s in found] == [("dcp", 3.0), ("dcp", 4.0)]
    aside = os.path.join(snaps, "superseded-000000000003")
    assert sorted(os.listdir(aside)) == ["snapshot-000000000004", "snapshot-000000000004.json",
                                         "snapshot-000000000006", "snapshot-000000000006.json"]
    assert posthoc.synthesize(snaps, 0.1, max_error=1.0)["0.weight"].shape == (6, 8)


def test_an_image_write_that_fails_keeps_the_previous_image(tmp_path):
    """The plots (posthoc --plot, the plot and demo commands) wrote with savefig straight to the path: a
    write that failed part way (a file-size limit, a full disk) left a truncated image where the good one
    was. They write through a temporary file now, published whole."""
    resource = pytest.importorskip("resource")
    pytest.importorskip("matplotlib")
    from fastema._io.files import save_figure
    from fastema.posthoc import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    g = torch.Generator().manual_seed(0)
    ax.plot(torch.rand(10_000, generator=g).numpy())                       # an image past 4 KiB
    out = tmp_path / "prof.png"
    save_figure(fig, str(out))
    good = out.read_bytes()
    assert good[:8] == b"\x89PNG\r\n\x1a\n" and len(good) > 4096
    ax.plot(torch.rand(10_000, generator=g).numpy())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError):
            save_figure(fig, str(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        plt.close(fig)
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["prof.png"]
