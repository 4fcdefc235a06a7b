"""Inputs damaged before or during a merge: a file truncated while it is read (no SIGBUS: a MergeError
naming the input and the tensor; under read="mmap", when it shrank before its piece's pages were
mapped), a damaged DCP data file, a dtype safetensors cannot
store, header dimensions past what a reader takes, more files than descriptors, and crafted headers
the safetensors library refuses (a name twice, overlapping spans, gaps, bytes after the last
tensor). Each refusal leaves no temporary folder and changes no input; whatever could kill the
process (SIGBUS, a descriptor limit) runs in a child process."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from merge_helpers import crafted, fingerprint, model_state, run_python, temporary_entries
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from support.calls import watching

import fastema._io.safetensors as dtypes
from fastema.__main__ import main as fastema_main
from fastema.merge import MergeError, _writer, merge_checkpoints


def refused(tmp_path, paths, match, begun: bool = False, **kwargs) -> None:
    """merge_checkpoints refuses ``paths`` with a MergeError matching ``match``: no output, nothing
    temporary beside it, no input changed (and, ``begun``, no output even begun: no ``Output`` made,
    its calls watched)."""
    before = fingerprint(paths)
    made: list = []
    out = tmp_path / "out.safetensors"
    with watching(_writer.Output.__init__, on_call=made.append) if begun else contextlib.nullcontext(), \
            pytest.raises(MergeError, match=match):
        merge_checkpoints(paths, out, **kwargs)
    assert made == [] and not out.exists() and temporary_entries(tmp_path) == []
    assert fingerprint(paths) == before


def library_refuses(path) -> bool:
    """safetensors' own reader refuses ``path`` (opening it or reading any tensor)."""
    try:
        with safe_open(str(path), "np") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:
        return True
    return False


# ------------------------------------------------------------ H1: truncated while memory-mapped


_TRUNCATED_MIDWAY = """
import contextlib, json, os, sys
from fastema.merge import _core, _engine, _source
from fastema.merge._safetensors_input import SafetensorsSource
sys.path.insert(0, os.environ["FASTEMA_TEST_TESTS"])
from support.calls import watching
case, read, out, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
victim, method, name, lo = {"inside a tensor": (0, "piece", "a", 16384), "without populate": (0, "piece", "a", 16384),
                            "between tensors": (0, "piece", "b", 0), "a copied tensor": (1, "raw", "ids", 0)}[case]
with open(paths[victim], "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    cut = 8 + n + json.loads(f.read(n))[name]["data_offsets"][0] + lo * 4
fired = []
def truncating(args):                                   # what a trainer rewriting the file in place does
    if not fired and args["self"].path == paths[victim] and (args["name"], args["lo"]) == (name, lo):
        os.truncate(args["self"].path, cut)             # the pieces read before stay readable
        fired.append(cut)
older = _source.populating_refused() if case == "without populate" else contextlib.nullcontext()
with _engine.tuned(mmap_piece=64 << 10, pread_piece=64 << 10), older, \\
        watching(getattr(SafetensorsSource, method), on_call=truncating, every_thread=True):   # four pieces a tensor
    try:
        _core.merge_checkpoints(paths, out, read=read)
    except Exception as err:
        print(f"fired={bool(fired)} failed: {type(err).__name__}: {err}")
    else:
        print(f"fired={bool(fired)} written")
"""


@pytest.mark.parametrize("case, read", [(c, r) for c in ("inside a tensor", "between tensors", "a copied tensor")
                                        for r in ("mmap", "pread")] + [("without populate", "mmap")])
def test_an_input_truncated_during_a_merge_before_its_piece_is_read_is_a_merge_error_naming_it(tmp_path, case,
                                                                                              read):
    """H1: an input that shrank under read="mmap" killed the process with SIGBUS (the populate call's
    EFAULT was ignored, then the kernel touched the page); now a MergeError naming the input and the
    tensor, whether the populate call, the size check before each tensor, or (where populate is not
    available, and with read="pread") pread notices it. (A shrink after the populate call, under
    mmap, is still SIGBUS: H6, below.)"""
    paths = []
    for i in range(2):
        state = {"a": np.full(1 << 16, 1.0 + i, np.float32), "b": np.full(1 << 16, 3.0 + i, np.float32),
                 "ids": np.arange(1 << 14, dtype=np.int32)}
        paths.append(str(tmp_path / f"ckpt-{i}.safetensors"))
        save_numpy(state, paths[-1])
    victim = 1 if case == "a copied tensor" else 0
    untouched = fingerprint([paths[1 - victim]])
    r = run_python(_TRUNCATED_MIDWAY, case, read, tmp_path / "out.safetensors", *paths,
                   env={"FASTEMA_TEST_TESTS": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])             # no SIGBUS (-7)
    tensor = {"inside a tensor": "a", "without populate": "a", "between tensors": "b", "a copied tensor": "ids"}[case]
    assert r.stdout.startswith("fired=True failed: MergeError: "), r.stdout
    assert f"input {victim} ({paths[victim]})" in r.stdout and repr(tensor) in r.stdout, r.stdout
    assert "truncated during the merge" in r.stdout, r.stdout
    assert not (tmp_path / "out.safetensors").exists() and temporary_entries(tmp_path) == []
    assert fingerprint([paths[1 - victim]]) == untouched


def test_an_input_that_changed_size_after_its_header_was_read_is_refused_before_its_first_tensor(tmp_path,
                                                                                               monkeypatch):
    """H1's size check: the file's size now against the one its header was read with."""
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"ckpt-{i}.safetensors"))
        save_numpy({"a": np.full(1000, 1.0 + i, np.float32)}, paths[-1])
    from fastema.merge import _safetensors_input


    def then_grown(args, value):            # input 0 grows right after it was opened
        if args["path"] == paths[0]:
            with open(args["path"], "ab") as f:
                f.write(b"\0" * 64)

    with watching(_safetensors_input.SafetensorsSource.__init__, on_return=then_grown), \
            pytest.raises(MergeError, match=r"input 0 \(.*ckpt-0.safetensors\).*rewritten during the merge.*'a'"):
        merge_checkpoints(paths, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and temporary_entries(tmp_path) == []


# ------------------------------------------------------------ H6: shrunk between a piece's read and its sum


_SHRUNK_AT_THE_FIRST_LAUNCH = """
import os, sys, threading
import fastema._launch as launch
from fastema.__main__ import main
from fastema.merge import merge_checkpoints
face, victim, out, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
fired = []
def shrinking(frame, event, arg):   # watched, not replaced: at the first merge launch, whose
    if event == "call" and frame.f_code is launch.merge.__code__ and not fired:   # pieces were
        os.truncate(victim, 4096)       # just fetched (read, or mapped), the file shrinks as when
        fired.append(True)              # another program rewrites it in place
        sys.setprofile(None)
        threading.setprofile(None)
sys.setprofile(shrinking)
threading.setprofile(shrinking)
if face == "cli":
    rc = main(["merge", out, *paths, "--no-progress"])
    print(f"fired={bool(fired)} rc={rc}")
else:
    try:
        merge_checkpoints(paths, out, progress=False)
    except Exception as err:
        print(f"fired={bool(fired)} failed: {type(err).__name__}: {err}")
    else:
        print(f"fired={bool(fired)} written")
"""


def _eight_mib_inputs(folder, fmt: str) -> list:
    """Two inputs of 8 MiB (one float32 tensor of 2 Mi elements, and a copied step), as ``fmt``."""
    os.makedirs(folder)
    paths = []
    for i in range(2):
        state = {"w": torch.full((1 << 21,), 1.0 + i), "step": torch.tensor(100 * (i + 1))}
        paths.append(str(folder / f"ckpt-{i}.{fmt}"))
        if fmt == "safetensors":
            save_file(state, paths[-1])
        else:
            torch.save(state, paths[-1])
    return paths


@pytest.mark.parametrize("face, fmt", [("api", "safetensors"), ("cli", "safetensors"), ("api", "pt")])
def test_an_input_shrunk_after_its_piece_was_read_is_a_merge_error_by_default_never_sigbus(tmp_path, face, fmt):
    """H6: the second of two 8 MiB inputs truncated to 4 KiB right before the first kernel launch, after
    its piece was fetched. Under the old default (read="mmap") the piece's pages were mapped and
    populated, the truncation unmapped them and the kernel died of SIGBUS (rc -7), leaving the temporary
    file. The default (read="pread") copies every piece out of the file first: a MergeError naming the
    input (exit status 1 from the command), nothing left in the output's folder."""
    paths = _eight_mib_inputs(tmp_path / "in", fmt)
    os.makedirs(tmp_path / "out")
    out = tmp_path / "out" / "merged.safetensors"
    r = run_python(_SHRUNK_AT_THE_FIRST_LAUNCH, face, paths[1], out, *paths)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])   # no SIGBUS (-7)
    said = r.stdout if face == "api" else r.stderr
    if face == "api":
        assert r.stdout.startswith("fired=True failed: MergeError: "), r.stdout
    else:
        assert r.stdout.strip().endswith("fired=True rc=1") and "error: " in r.stderr, (r.stdout, r.stderr[-2000:])
    assert f"input 1 ({paths[1]})" in said and "truncated" in said, said
    assert os.listdir(tmp_path / "out") == []                               # no temporary file left


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_read_mmap_still_merges_healthy_inputs_to_the_bits_of_the_default(tmp_path, fmt):
    """read="mmap" (``--read mmap``), the opt-in for inputs nothing else writes: the same bits as the
    default read, through the API and the command."""
    paths = _eight_mib_inputs(tmp_path / "in", fmt)
    merge_checkpoints(paths, tmp_path / "pread.safetensors", progress=False)
    merge_checkpoints(paths, tmp_path / "mmap.safetensors", read="mmap", progress=False)
    assert fastema_main(["merge", str(tmp_path / "cli.safetensors"), *paths, "--read", "mmap", "--no-progress"]) == 0
    want = load_numpy(str(tmp_path / "pread.safetensors"))
    assert np.array_equal(want["w"], np.full(1 << 21, 1.5, np.float32)) and int(want["step"]) == 200
    for name in ("mmap", "cli"):
        got = load_numpy(str(tmp_path / f"{name}.safetensors"))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert temporary_entries(tmp_path) == []


# ------------------------------------------------------------ M2: a damaged DCP data file


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dcp_data_file_damaged_in_place_is_a_merge_error_naming_the_input_and_the_tensor(tmp_path, capsys):
    """M2: DCP raises CheckpointException, a BaseException, which escaped ``except Exception`` (and the
    command line's handler: a traceback); now a MergeError, and the command prints one line, exit 1."""
    import torch.distributed.checkpoint as dcp

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"step-{i + 1}"))
        dcp.save({"model": model_state(i)}, storage_writer=dcp.FileSystemWriter(paths[-1]), no_dist=True)
    data = [os.path.join(paths[1], f) for f in os.listdir(paths[1]) if f.endswith(".distcp")][0]
    size = os.path.getsize(data)
    with open(data, "r+b") as f:                       # the same size: the metadata's check passes
        f.write(b"\xff" * 64)
    assert os.path.getsize(data) == size
    refused(tmp_path, paths, r"input 1 \(.*step-2\): tensor '[^']+' could not be read .*truncated or damaged")
    before = fingerprint(paths)
    capsys.readouterr()
    # python -m fastema merge, in this process (a child would spend seconds importing torch)
    assert fastema_main(["merge", str(tmp_path / "out.safetensors"), *paths, "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: input 1 (") and "could not be read" in lines[0], err
    assert not (tmp_path / "out.safetensors").exists() and temporary_entries(tmp_path) == []
    assert fingerprint(paths) == before


# ------------------------------------------------------------ M3: dtypes safetensors cannot store


def test_the_dtypes_read_and_the_safetensors_codes_written_agree():
    """M3: every dtype an input may hold has a safetensors code to be written with, and back."""
    assert set(dtypes.ITEMSIZE) == set(dtypes.TO_CODE) == set(dtypes.FROM_CODE.values())
    assert all(dtypes.FROM_CODE[code] == name for name, code in dtypes.TO_CODE.items())
    for name, size in dtypes.ITEMSIZE.items():
        assert torch.empty((), dtype=getattr(torch, name)).element_size() == size, name


def test_a_complex128_tensor_is_refused_by_name_before_anything_is_written(tmp_path, monkeypatch):
    """M3: complex128 was read, then the writer failed with KeyError: 'complex128' (a traceback from
    the command line); safetensors has no code for it."""
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"ckpt-{i}.pt"))
        torch.save({"w": torch.full((4,), 1.0 + i), "c": torch.ones(3, dtype=torch.complex128)}, paths[-1])
    refused(tmp_path, paths, r"input 0 \(.*ckpt-0.pt\): tensor 'c' is complex128", begun=True)


# ------------------------------------------------------------ M4: dimensions past int64


_ONE = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


@pytest.mark.parametrize("shape", [[0, 2**64], [0, 2**63], [2**32, 2**32, 0], [0, 2**62, 4]],
                         ids=["2^64", "2^63", "product 2^64", "2^64 bytes after a 0"])
def test_a_header_dimension_past_int64_is_refused_as_damaged_before_anything_is_written(tmp_path, monkeypatch,
                                                                                        shape):
    """M4: a zero-element tensor with a dimension of 2^64 passed the size check and escaped mid-merge as
    NumPy's OverflowError; a product past 2^63 wrapped silently. safetensors refuses each (the last when
    a tensor is made: NumPy and torch take no shape whose nonzero dimensions' bytes pass 2^63)."""
    header = '{' + _ONE + ',"z":{"dtype":"F32","shape":' + json.dumps(shape) + ',"data_offsets":[8,8]}}'
    paths = [crafted(tmp_path / f"ckpt-{i}.safetensors", header, np.ones(2, np.float32).tobytes()) for i in range(2)]
    assert library_refuses(paths[0])
    refused(tmp_path, paths, r"input 0 \(.*\): tensor 'z' has the shape .* the file is damaged", begun=True)


# ------------------------------------------------------------ M5: descriptors


_FEW_DESCRIPTORS = """
import os, resource, sys
from fastema.merge import _core
limit, read, out, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
if limit == "none":                     # the lowest free descriptor number: none can be opened
    limit = os.open(os.devnull, os.O_RDONLY)
    os.close(limit)
limit = int(limit)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    report = _core.merge_checkpoints(paths, out, read=read)
except Exception as err:
    print(f"failed: {type(err).__name__}: {err}")
else:
    print(f"written {len(report.averaged)}")
"""


def _single_files(folder, count: int) -> list:
    os.makedirs(folder)
    paths = []
    for i in range(count):
        paths.append(str(folder / f"ckpt-{i}.safetensors"))
        save_numpy({"w": np.full(8, float(i), np.float32), "n": np.arange(3, dtype=np.int64) + i}, paths[-1])
    return paths


def _sharded_folder(folder, i: int, shards: int) -> str:
    """A Hugging Face folder of ``shards`` safetensors shards, one tensor each."""
    os.makedirs(folder)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_numpy({f"layer.{k}.w": np.full(4, float(k + i), np.float32)}, str(folder / file))
        weight_map[f"layer.{k}.w"] = file
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(folder)


def test_sixty_single_file_inputs_merge_under_a_limit_of_48_open_files(tmp_path):
    """M5: each input kept two descriptors (its own and its map's) until the end: 60 inputs under a
    limit of 48 failed with a raw OSError 'Too many open files'. A map now keeps none."""
    paths = _single_files(tmp_path / "in", 60)
    before = fingerprint(paths)
    r = run_python(_FEW_DESCRIPTORS, 48, "mmap", tmp_path / "out.safetensors", *paths)
    assert r.returncode == 0 and r.stdout.strip() == "written 1", (r.stdout, r.stderr[-2000:])
    got = load_numpy(str(tmp_path / "out.safetensors"))
    assert np.allclose(got["w"], np.mean(np.arange(60.0)), rtol=1e-6)
    assert np.array_equal(got["n"], np.arange(3) + 59)                        # copied from the last
    assert temporary_entries(tmp_path) == [] and fingerprint(paths) == before


@pytest.mark.parametrize("read", ["mmap", "pread"])
def test_sharded_folders_with_more_shards_than_open_files_allowed_merge(tmp_path, read):
    """M5: 2 folders of 40 shards under a limit of 24 open files: a shard's descriptor is closed once
    its tensors are read (pread) or right after it is mapped (mmap), and its map goes once its tensors
    are done."""
    paths = [_sharded_folder(tmp_path / "in" / f"checkpoint-{i + 1}", i, 40) for i in range(2)]
    before = fingerprint(paths)
    r = run_python(_FEW_DESCRIPTORS, 24, read, tmp_path / "merged", *paths)
    assert r.returncode == 0 and r.stdout.strip() == "written 40", (r.stdout, r.stderr[-2000:])
    shards = sorted(f for f in os.listdir(tmp_path / "merged") if f.endswith(".safetensors"))
    assert len(shards) == 40                                                  # the donor's layout
    got = {k: v for f in shards for k, v in load_numpy(str(tmp_path / "merged" / f)).items()}
    assert all(np.array_equal(got[f"layer.{k}.w"], np.full(4, k + 0.5, np.float32)) for k in range(40))
    assert temporary_entries(tmp_path) == [] and fingerprint(paths) == before


@pytest.mark.parametrize("read, count, limit", [("pread", 60, "48"), ("mmap", 2, "none")],
                         ids=["pread, 60 inputs under 48", "no descriptor free"])
def test_too_few_descriptors_is_a_merge_error_saying_to_raise_the_limit_and_leaves_nothing(tmp_path, read, count,
                                                                                          limit):
    """M5: pread reads every input at once, a descriptor each: 60 inputs under a limit of 48 cannot
    merge (mid-merge, its temporary folder made). The shortage was a raw OSError, or "cannot be read
    (Too many open files)"; now a MergeError that says what to do, and no temporary folder is left."""
    paths = _single_files(tmp_path / "in", count)
    before = fingerprint(paths)
    r = run_python(_FEW_DESCRIPTORS, limit, read, tmp_path / "out.safetensors", *paths)
    assert r.returncode == 0 and r.stdout.startswith("failed: MergeError: input "), (r.stdout, r.stderr[-2000:])
    assert "too many open files" in r.stdout and "ulimit -n" in r.stdout and "fewer inputs" in r.stdout, r.stdout
    assert not (tmp_path / "out.safetensors").exists() and temporary_entries(tmp_path) == []
    assert fingerprint(paths) == before


# ------------------------------------------------------------ M6: headers the library refuses


_F32 = np.arange(8, dtype=np.float32).tobytes()


def _tensor(name: str, shape: list, lo: int, hi: int, dtype: str = "F32") -> str:
    return f'"{name}":{{"dtype":"{dtype}","shape":{json.dumps(shape)},"data_offsets":[{lo},{hi}]}}'


_REFUSED = {
    "a name twice": ("{" + _tensor("w", [4], 0, 16) + "," + _tensor("w", [4], 16, 32) + "}", _F32,
                     r"tensor 'w' is named twice"),
    "a name twice, same span": ("{" + _tensor("w", [8], 0, 32) + "," + _tensor("w", [8], 0, 32) + "}", _F32,
                                r"tensor 'w' is named twice"),
    "__metadata__ twice": ('{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"},' + _tensor("w", [8], 0, 32) + "}",
                           _F32, r"'__metadata__' is named twice"),
    "a field twice": ('{"w":{"dtype":"F32","dtype":"F32","shape":[8],"data_offsets":[0,32]}}', _F32,
                      r"tensor 'w' has a damaged entry"),
    "overlapping spans": ("{" + _tensor("a", [8], 0, 32) + "," + _tensor("b", [8], 0, 32) + "}", _F32,
                          r"tensor 'b' overlaps tensor 'a'"),
    "a gap at the start": ("{" + _tensor("a", [4], 16, 32) + "}", _F32,
                           r"bytes 0 to 16 of its data belong to no tensor \(before tensor 'a'\)"),
    "a gap between tensors": ("{" + _tensor("a", [2], 0, 8) + "," + _tensor("b", [4], 16, 32) + "}", _F32,
                              r"bytes 8 to 16 of its data belong to no tensor \(before tensor 'b'\)"),
    "bytes after the last tensor": ("{" + _tensor("a", [4], 0, 16) + "}", _F32,
                                    r"16 bytes after its last tensor"),
    "bytes and no tensor": ("{}", b"\0" * 8, r"8 bytes after its last tensor"),
}


@pytest.mark.parametrize("case", list(_REFUSED))
def test_a_header_the_safetensors_library_refuses_is_refused_too(tmp_path, monkeypatch, case):
    """M6: a name twice (json kept the last: one copy silently dropped), two tensors over the same
    bytes, data that does not start at the data area's first byte or leaves a gap, bytes after the
    last tensor: safe_open refuses each, and so does the merge."""
    header, data, match = _REFUSED[case]
    paths = [crafted(tmp_path / f"ckpt-{i}.safetensors", header, data) for i in range(2)]
    # one case the library reads (it keeps the last of two equal entries); a name twice is refused whatever
    # its entries, as the next file may differ in the dtype alone
    assert library_refuses(paths[0]) == (case != "a name twice, same span")
    refused(tmp_path, paths, r"input 0 \(.*ckpt-0\.safetensors\).*" + match + r".*the file is damaged", begun=True)


_ACCEPTED = {
    "no __metadata__": "{" + _tensor("w", [8], 0, 32) + "}",
    "__metadata__ null": '{"__metadata__":null,' + _tensor("w", [8], 0, 32) + "}",
    "a __metadata__ key twice (the last kept)": '{"__metadata__":{"step":"1","step":"2"},' + _tensor("w", [8], 0, 32)
                                                + "}",
    "tensors listed out of order": "{" + _tensor("b", [4], 16, 32) + "," + _tensor("a", [4], 0, 16) + "}",
    "empty tensors at the start, middle and end": "{" + ",".join([
        _tensor("z0", [0], 0, 0), _tensor("a", [4], 0, 16), _tensor("z1", [0, 3], 16, 16), _tensor("b", [4], 16, 32),
        _tensor("z2", [2, 0], 32, 32)]) + "}",
}


@pytest.mark.parametrize("case", list(_ACCEPTED))
def test_a_header_the_safetensors_library_reads_merges_and_verifies(tmp_path, case):
    """M6's checks refuse nothing the library reads; __metadata__ is read as before (null is none, a key
    twice keeps the last), and --verify, which reads the output with the same checks, passes."""
    paths = [crafted(tmp_path / f"ckpt-{i}.safetensors", _ACCEPTED[case], _F32) for i in range(2)]
    assert not library_refuses(paths[0])
    before = fingerprint(paths)
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", verify=True)
    assert report.verified
    if "twice" in case:
        assert report.steps == [2, 2]
    got = load_numpy(str(tmp_path / "out.safetensors"))
    with safe_open(paths[0], "np") as f:
        assert set(got) == set(f.keys()) and all(np.array_equal(got[k], f.get_tensor(k)) for k in f.keys())
    assert temporary_entries(tmp_path) == [] and fingerprint(paths) == before
