"""The compiled-code store (``kernels/_store``, issue 60): one entry format, the shipped sets and the
node store, and which set and image a device takes under which driver.

- An entry reads back as written, and one that is damaged (its code, its header) or holds another
  variant, image or identity is refused, never used.
- A shipped set written by ``write_set`` reads back entry by entry, and one built from other
  kernel sources is refused as stale.
- The choice (a table, the drivers and devices users have): a CUDA 12 driver never takes the
  CUDA 13 set; a CUDA 13 driver prefers it and takes the CUDA 12 cubins where it has none
  (sm_70, sm_75); a device takes its major architecture's cubin with the highest minor at most its
  own, else the PTX; Blackwell's CUDA 12 cubins need a CUDA 12.8 driver.
- The node store makes an entry once, reads it back, and makes a damaged one again.
- One digest: the old four are gone.
"""
import pathlib
import re
import subprocess

import pytest

from fastema.kernels._store import entry as E
from fastema.kernels._store import identity as I
from fastema.kernels._store import store as S

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUBIN = b"\x7fELF" + bytes(range(256)) * 4


def _entry(key="k[int64]", image="sm_90", code=CUBIN, identity="id", bounds=(256, 4)):
    return E.Entry(key, image, "cubin", "_Z6kernel", code, {"registers": 40, "spill_stores": 0}, identity,
                   bounds)


def test_an_entry_reads_back_as_written():
    e = _entry()
    assert E.loads(E.dumps(e), "k[int64]", "sm_90", "id") == e
    assert E.loads(E.dumps(e._replace(bounds=None))).bounds is None


@pytest.mark.parametrize("damage,said", [
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: d[:-10], "checksum"),
    (lambda d: d.replace(b'"size"', b'"sizo"'), "header"),
    (lambda d: b"x" + d, "not a fastema"),
])
def test_a_damaged_entry_is_refused(damage, said):
    with pytest.raises(ValueError, match=said):
        E.loads(damage(E.dumps(_entry())))


@pytest.mark.parametrize("field,value", [("key", "other[int64]"), ("image", "sm_80"), ("identity", "old")])
def test_an_entry_of_another_variant_image_or_identity_is_refused(field, value):
    asked = {"key": "k[int64]", "image": "sm_90", "identity": "id", field: value}
    with pytest.raises(ValueError, match=f"holds {field}"):
        E.loads(E.dumps(_entry()), **asked)


def test_figures_are_parsed_once_from_ptxas_or_nvjitlink_logs():
    log = ("ptxas info    : Function properties for k\n    48 bytes stack frame, 8 bytes spill stores, 4 bytes "
           "spill loads\nptxas info    : Used 64 registers, 444 bytes smem\nptxas info    : Function "
           "properties for f\n    0 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n")
    assert E.figures(log) == {"registers": 64, "spill_stores": 24, "spill_loads": 16, "stack": 48, "smem": 444}
    assert E.figures("") == dict.fromkeys(("registers", "spill_stores", "spill_loads", "stack", "smem"), 0)
    assert E.spills(E.figures(log)) and not E.spills(E.figures(""))


def test_a_written_set_reads_back_and_a_stale_one_is_refused(tmp_path):
    identity = S.code_identity("tools 1")
    entries = [_entry(f"k{i}[int64]", image, CUBIN + bytes([i]), identity) for i in range(3)
               for image in ("sm_75", "sm_90")]
    index = S.write_set(str(tmp_path), "cu12", entries, {"identity": identity, "driver": 12000,
                                                        "images": {"sm_75": {}, "sm_90": {}}})
    assert index["variants"]["k1[int64]"]["sm_90"][2] == [256, 4]
    shipped = S.Shipped(str(tmp_path), "cu12")
    assert shipped.get("k1[int64]", "sm_90") == entries[3]
    assert shipped.get("k9[int64]", "sm_90") is None
    text = (tmp_path / "cu12" / "index.json").read_text()
    (tmp_path / "cu12" / "index.json").write_text(text.replace(I.cuda_sources(), "0" * 64))
    with pytest.raises(ValueError, match="other kernel sources"):
        S.Shipped(str(tmp_path), "cu12").index


def _sets():
    from fastema._launch.shipped.store import SETS

    return {name: {"driver": spec["driver"], "images": {i: {"driver": d} for i, d in spec["images"].items()}}
            for name, spec in SETS.items()}


DEVICES = ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))
CHOSEN = {   # driver: the set/image of each device of DEVICES
    12000: "cu12/sm_70 cu12/sm_75 cu12/sm_80 cu12/sm_86 cu12/sm_89 cu12/sm_90 cu12/compute_70 cu12/compute_70",
    12040: "cu12/sm_70 cu12/sm_75 cu12/sm_80 cu12/sm_86 cu12/sm_89 cu12/sm_90 cu12/compute_70 cu12/compute_70",
    12080: "cu12/sm_70 cu12/sm_75 cu12/sm_80 cu12/sm_86 cu12/sm_89 cu12/sm_90 cu12/sm_100 cu12/sm_120",
    13000: "cu12/sm_70 cu12/sm_75 cu13/sm_80 cu13/sm_80 cu13/sm_80 cu13/sm_90 cu13/sm_100 cu13/sm_120",
}


@pytest.mark.parametrize("version", sorted(CHOSEN))
def test_the_set_and_image_each_driver_and_device_take(version):
    got = []
    for cc in DEVICES:
        (chosen,) = S.choose(_sets(), version, cc)
        got.append("/".join(chosen))
    assert got == CHOSEN[version].split()


def test_what_no_set_serves():
    sets = _sets()
    assert S.choose(sets, 13000, (11, 0)) == [("cu13", "compute_80")]       # Thor: the PTX
    assert S.choose(sets, 13000, (10, 3)) == [("cu13", "sm_100")] and S.choose(sets, 12090, (12, 1)) == [
        ("cu12", "sm_120")]
    assert S.choose(sets, 12000, (6, 1)) == [] and S.choose(sets, 11080, (9, 0)) == []
    assert S.choose({"cu13": sets["cu13"]}, 13000, (7, 5)) == []            # sm_75 from the CUDA 12 set only


def test_the_node_store_makes_an_entry_once_and_a_damaged_one_again(tmp_path):
    node, made, damaged = S.Node(str(tmp_path)), [], []

    def make():
        made.append(1)
        return _entry()

    args = ("k[int64]", "sm_90", "id", (256, 4))
    assert node.fetch(*args, make, lambda p, e: damaged.append(e)) == (_entry(), None)
    assert node.fetch(*args, make, lambda p, e: damaged.append(e)) == (_entry(), None) and len(made) == 1
    path = pathlib.Path(node.path(*args))
    path.write_bytes(path.read_bytes()[:-5])
    assert node.fetch(*args, make, lambda p, e: damaged.append(str(e)))[0] == _entry()
    assert len(made) == 2 and damaged == ["its code fails its checksum"]
    assert node.path(*args) != node.path("k[int64]", "sm_90", "id", (256, 3))     # other bounds: another entry


def test_one_digest_of_the_compiled_code():
    """layout.md §5.2: one digest function (kernels/_store/identity.py) where there were four."""
    folders = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                     and p.name not in ("tests", "docs", "build", "dist"))    # the library and its tooling
    found = subprocess.run(["grep", "-rnE", "--include=*.py", r"def (digest|sources_digest|_stamp|source_stamp)\b",
                            *folders], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    assert [line.split(":")[0] for line in found] == ["kernels/_store/identity.py"], found
    assert I.digest("ab", "c") != I.digest("a", "bc") and len(I.digest(b"")) == 64
    assert re.fullmatch(r"[0-9a-f]{32}", I.digest("x", size=32))


def test_the_cpu_kernels_sources_are_the_identitys():
    from fastema.kernels import _cache, _cuda_jit

    assert tuple(m.__name__.rpartition(".")[2] for m in _cache.DEPENDENCIES) == I.CPU_SOURCES
    skeletons = {"cuda", "_cuda_scan", "_cuda_stream", "_cuda_copy"}
    cuda = {m.__name__.rpartition(".")[2] for m in _cuda_jit.DEPENDENCIES} | skeletons
    assert cuda == set(I.CUDA_SOURCES)
