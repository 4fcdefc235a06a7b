"""fastema.torch.engines against consumers written from vLLM's and SGLang's own sources, on the CPU.

Neither engine can be installed here, so each receiving side is copied (the least code that unpacks) from the
engine's source, with the file and commit read, and every form is checked through it bit for bit: names,
shapes, dtypes, values (as bits), order; bucket sizes; mixed dtypes; the refusals. Untested against the
engines themselves (the module's docstring says so).

- SGLang ``python/sglang/srt/weight_sync/tensor_bucket.py``: @0cbf0687be1b263c40f5e888741646398cd43809 (one
  ``uint8`` bucket of every dtype, offsets in bytes, ``supports_multi_dtypes = True``) and
  @07e900094b64b6141157badd0f14bb4742cb9825 (one bucket per dtype, offsets in elements); the engine side,
  ``ModelRunner._update_weights_from_flattened_bucket`` (``model_executor/model_runner.py``, the weight updater):
  the dict's ``"flattened_tensor"`` / ``"metadata"``, each entry's attributes read, ``reconstruct_tensors()``,
  then ``model.load_weights``; slime's ``update_weight_utils.py`` for the per-dtype grouping of a bucket.
- vLLM ``vllm/distributed/weight_transfer/base.py`` @02f250b03f38822ccdb63f27a3005d10ca81f385 (``ParamMeta``,
  ``WeightSource``), ``nccl_engine.py`` (``NCCLTrainerWeightTransferEngine.send_weights``: update info from
  ``source.metadata()``, then ``iter(source)``), ``packed_tensor.py`` @00a9ccfb4cefdaf0092392b0afba5721b33886e6
  (``pack_tensors``, ``packed_nccl_broadcast_consumer``'s chunking, ``unpack_tensor``).
"""
import abc
import dataclasses
import math
import pathlib
import pickle
import re
import sys
import types
from typing import NamedTuple

import pytest
import torch
from dist import run_ranks
from torch import nn

from fastema.torch import EMA, PostHocEMA, TargetNetwork, WindowAverage
from fastema.torch.engines import (
    DEFAULT_BUCKET_BYTES,
    FlattenedTensorMetadata,
    WeightSource,
    flattened_buckets,
    load_weights,
    named_tensor_buckets,
)

# ------------------------------------------------------------ SGLang's side, from its source


@dataclasses.dataclass
class SGLangMetadata:                  # tensor_bucket.py: FlattenedTensorMetadata, field for field
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def sglang_pack_bytes(named_tensors):
    """tensor_bucket.py@0cbf0687 FlattenedTensorBucket(named_tensors=...): flatten().view(uint8), cat."""
    metadata, flat, current = [], [], 0
    for name, tensor in named_tensors:
        flattened = tensor.flatten().view(torch.uint8)
        flat.append(flattened)
        metadata.append(SGLangMetadata(name, tensor.shape, tensor.dtype, current, current + flattened.numel(),
                                       flattened.numel()))
        current += flattened.numel()
    return torch.cat(flat, dim=0), metadata


def sglang_pack_elements(named_tensors):
    """tensor_bucket.py@07e90009 FlattenedTensorBucket(named_tensors=...): flatten(), cat (one dtype)."""
    metadata, flat, current = [], [], 0
    for name, tensor in named_tensors:
        flattened = tensor.flatten()
        flat.append(flattened)
        metadata.append(SGLangMetadata(name, tensor.shape, tensor.dtype, current, current + flattened.numel(),
                                       flattened.numel()))
        current += flattened.numel()
    return torch.cat(flat, dim=0), metadata


def sglang_reconstruct_bytes(flattened_tensor, metadata):
    """tensor_bucket.py@0cbf0687 reconstruct_tensors()."""
    return [(m.name, flattened_tensor[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in metadata]


def sglang_reconstruct_elements(flattened_tensor, metadata):
    """tensor_bucket.py@07e90009 reconstruct_tensors()."""
    out = []
    for m in metadata:
        tensor = flattened_tensor[m.start_idx:m.end_idx].reshape(m.shape)
        if tensor.dtype != m.dtype:
            tensor = tensor.to(m.dtype)
        out.append((m.name, tensor))
    return out


def sglang_update_weights_from_flattened_bucket(model, bucket, multi_dtype=True):
    """ModelRunner._update_weights_from_flattened_bucket: the dict read by key, the metadata by attribute,
    the tensors rebuilt and handed to the model's load_weights. The dict crosses a process as a pickle."""
    bucket = pickle.loads(pickle.dumps(bucket))
    converted = [SGLangMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                end_idx=m.end_idx, numel=m.numel) for m in bucket["metadata"]]
    rebuild = sglang_reconstruct_bytes if multi_dtype else sglang_reconstruct_elements
    model.load_weights(rebuild(bucket["flattened_tensor"], converted))


# ------------------------------------------------------------ vLLM's side, from its source


@dataclasses.dataclass(frozen=True)
class ParamMeta:                       # base.py: ParamMeta
    name: str
    dtype: torch.dtype
    shape: tuple


class VllmWeightSource(abc.ABC):      # base.py: WeightSource
    @abc.abstractmethod
    def metadata(self): ...

    @abc.abstractmethod
    def __iter__(self): ...


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm.distributed.weight_transfer.base as importable modules holding the two classes above."""
    names = ["vllm", "vllm.distributed", "vllm.distributed.weight_transfer", "vllm.distributed.weight_transfer.base"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ParamMeta = ParamMeta
    sys.modules[names[-1]].WeightSource = VllmWeightSource
    return sys.modules[names[-1]]


def vllm_pack_tensors(iterator, buffer_size_bytes):
    """packed_tensor.py pack_tensors (post_iter_func = lambda item: item[1]), one chunk."""
    names, shapes, dtypes, sizes, tensors, total = [], [], [], [], [], 0
    for name, orig in iterator:
        tensor = orig.contiguous().view(torch.uint8).view(-1)
        tensors.append(tensor)
        names.append(name)
        shapes.append(list(orig.shape))
        dtypes.append(orig.dtype)
        sizes.append(tensor.numel())
        total += tensor.numel()
        if total > buffer_size_bytes:
            break
    return torch.cat(tensors, dim=0) if tensors else None


def vllm_send_and_receive(source, model, packed, buffer_size_bytes=64):
    """NCCLTrainerWeightTransferEngine.send_weights on the sender and NCCLWeightTransferEngine.receive_weights
    on a worker, the NCCL broadcast replaced by a hand-over of the sender's buffer into the receiver's."""
    meta = source.metadata()
    update_info = dict(names=[m.name for m in meta], dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                       shapes=[list(m.shape) for m in meta])
    sent = iter(source)
    if packed:                                         # packed_nccl_broadcast_producer / _consumer
        info = iter(zip(update_info["names"], update_info["dtype_names"], update_info["shapes"]))
        while True:
            chunk, sizes = [], 0
            for name, dtype_name, shape in info:
                dtype = getattr(torch, dtype_name)
                size = math.prod(shape) * dtype.itemsize
                chunk.append((name, shape, dtype, size))
                sizes += size
                if sizes > buffer_size_bytes:
                    break
            if not chunk:
                break
            packed_tensor = torch.empty(sizes, dtype=torch.uint8)
            packed_tensor.copy_(vllm_pack_tensors(sent, buffer_size_bytes))      # the broadcast
            pieces = packed_tensor.split([c[3] for c in chunk])                # unpack_tensor
            model.load_weights([(n, t.contiguous().view(d).view(*s)) for (n, s, d, _), t in zip(chunk, pieces)])
        assert next(sent, None) is None
    else:
        for name, dtype_name, shape in zip(update_info["names"], update_info["dtype_names"], update_info["shapes"]):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
            weight.copy_(next(sent)[1])                                          # the broadcast
            model.load_weights([(name, weight)])
    return update_info


# ------------------------------------------------------------ a stand-in average and a receiving model


class WeightMeta(NamedTuple):          # what fastema.torch's weights_metadata() returns
    name: str
    dtype: torch.dtype
    shape: tuple


class StandIn:
    """iter_weights / weights_metadata as the torch averages spell them, over a dict of tensors."""

    def __init__(self, tensors):
        self.tensors, self.calls = tensors, []

    def weights_metadata(self, row=0, *, dtype=None):
        return [WeightMeta(n, dtype if dtype is not None and t.is_floating_point() else t.dtype, tuple(t.shape))
                for n, t in self.tensors.items()]

    def iter_weights(self, row=0, *, dtype=None, bucket_bytes=DEFAULT_BUCKET_BYTES, to="all"):
        self.calls.append((row, dtype, bucket_bytes, to))
        for n, t in self.tensors.items():
            yield n, (t.to(dtype) if dtype is not None and t.is_floating_point() else t).clone()


class Receiver:
    """A model's load_weights: keeps a copy of each tensor it is given, in order, and returns the names."""

    def __init__(self):
        self.got, self.calls = {}, 0

    def load_weights(self, weights):
        self.calls += 1
        names = set()
        for name, tensor in weights:
            assert name not in self.got
            self.got[name] = tensor.clone()
            names.add(name)
        return names


def mixed():
    """Every kind of tensor a state dict holds: float32/bf16/fp16 weights, int64 and odd-sized bool/uint8
    buffers before wider tensors, a 0-d scalar, an empty tensor, a non-contiguous view, NaN bits."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 5, generator=g)
    nan = torch.randn(7, generator=g)
    nan[3] = float("nan")
    return {"embed.weight": torch.randn(4, 3, generator=g), "mask": torch.tensor([True, False, True]),
            "fc.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
            "bytes": torch.arange(5, dtype=torch.uint8), "fc.bias": torch.randn(5, generator=g).to(torch.float16),
            "steps": torch.tensor(123456789012, dtype=torch.int64),
            "empty": torch.empty(0, 4), "proj.weight": wide.t(), "norm.weight": nan,
            "head.weight": torch.randn(2, 2, 2, generator=g, dtype=torch.float64)}


def assert_same(got, want):
    """Same names in the same order, and each tensor the same shape, dtype and bits."""
    got, want = list(got), list(want)
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(bits(a), bits(b)), name


def bits(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8)


# ------------------------------------------------------------ SGLang: flattened buckets


@pytest.mark.parametrize("bucket_bytes", [1, 7, 16, 50, 100, 1 << 20])
def test_flattened_buckets_round_trip_bit_for_bit_through_sglang(bucket_bytes):
    tensors = mixed()
    model = Receiver()
    buckets = list(flattened_buckets(tensors.items(), bucket_bytes))
    for bucket in buckets:
        sglang_update_weights_from_flattened_bucket(model, bucket)
    assert_same(model.got.items(), tensors.items())
    assert model.calls == len(buckets)
    for bucket in buckets:
        flat, meta = bucket["flattened_tensor"], bucket["metadata"]
        assert flat.dtype == torch.uint8 and flat.dim() == 1
        # never above bucket_bytes, except one tensor larger than it, alone in a bucket of its own size
        assert flat.numel() <= bucket_bytes or (len(meta) == 1 and flat.numel() == meta[0].numel > bucket_bytes)
        for m in meta:
            assert m.numel == m.end_idx - m.start_idx and m.start_idx % m.dtype.itemsize == 0
        ends = [0] + [m.end_idx for m in meta]
        for m, end in zip(meta, ends):          # the alignment gaps are zeros
            assert not flat[end:m.start_idx].any()


def test_flattened_buckets_match_sglangs_own_packer_where_no_padding_is_needed():
    tensors = {k: v for k, v in mixed().items() if k not in ("mask", "bytes", "head.weight")}
    tensors["tail"] = torch.ones(3, dtype=torch.uint8)
    (ours,) = flattened_buckets(tensors.items(), 1 << 20)
    flat, meta = sglang_pack_bytes(list(tensors.items()))
    assert all(m.start_idx % m.dtype.itemsize == 0 for m in meta)       # SGLang's own layout needs no gap here
    assert torch.equal(ours["flattened_tensor"], flat)
    assert [dataclasses.astuple(m) for m in ours["metadata"]] == [dataclasses.astuple(m) for m in meta]


def test_per_dtype_buckets_match_older_sglang_and_slimes_grouping():
    tensors = mixed()
    for bucket_bytes in (1, 40, 1 << 20):
        model, runs = Receiver(), list(named_tensor_buckets(tensors.items(), bucket_bytes))
        items = list(flattened_buckets(tensors.items(), bucket_bytes, multi_dtype=False))
        want = []
        for run in runs:                                  # slime: group a bucket by dtype, first-come order
            by_dtype = {}
            for name, tensor in run:
                by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
            want += list(by_dtype.values())
        assert len(items) == len(want)
        for item, group in zip(items, want):
            flat, meta = sglang_pack_elements(group)
            assert flat.dtype == item["flattened_tensor"].dtype and torch.equal(
                flat.view(torch.uint8) if flat.dtype == torch.bool else flat.reshape(-1).contiguous().view(torch.uint8),
                item["flattened_tensor"].view(torch.uint8))
            assert [dataclasses.astuple(m) for m in item["metadata"]] == [dataclasses.astuple(m) for m in meta]
            assert item["flattened_tensor"].numel() * flat.element_size() <= bucket_bytes or len(meta) == 1
            sglang_update_weights_from_flattened_bucket(model, item, multi_dtype=False)
        assert sorted(model.got) == sorted(tensors)
        assert_same(((n, model.got[n]) for n in tensors), tensors.items())


def test_the_layout_and_the_metadata_class_follow_the_sglang_installed(monkeypatch):
    names = ["sglang", "sglang.srt", "sglang.srt.weight_sync", "sglang.srt.weight_sync.tensor_bucket"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules[names[-1]]
    module.FlattenedTensorBucket = type("FlattenedTensorBucket", (), {})             # @07e90009: no flag
    module.FlattenedTensorMetadata = SGLangMetadata
    items = list(flattened_buckets({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.int32)}.items()))
    assert [i["flattened_tensor"].dtype for i in items] == [torch.float32, torch.int32]
    assert all(type(m) is SGLangMetadata for i in items for m in i["metadata"])
    module.FlattenedTensorBucket.supports_multi_dtypes = True     # @0cbf0687, the flag as slime reads it
    assert next(flattened_buckets({"a": torch.ones(2)}))["flattened_tensor"].dtype == torch.uint8
    monkeypatch.setitem(sys.modules, names[-1], None)             # an SGLang older than weight_sync.tensor_bucket
    assert next(flattened_buckets({"a": torch.ones(2)}))["flattened_tensor"].dtype == torch.float32
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    (item,) = flattened_buckets({"a": torch.ones(2)}, metadata_type=SGLangMetadata)
    assert type(item["metadata"][0]) is SGLangMetadata
    (item,) = flattened_buckets({"a": torch.ones(2)})                 # no SGLang here: fastema's class, bytes
    assert type(item["metadata"][0]) is FlattenedTensorMetadata and item["flattened_tensor"].dtype == torch.uint8


def test_buckets_are_fresh_copies_and_streams_are_read_lazily():
    tensors = mixed()
    average = StandIn(tensors)
    stream = average.iter_weights()
    buckets = flattened_buckets(stream, 64)
    first = next(buckets)
    assert len(average.calls) == 1 and next(stream, None) is not None     # the rest not yet read
    before = first["flattened_tensor"].clone()
    for t in tensors.values():
        t.zero_() if t.dtype != torch.bool else t.fill_(False)
    assert torch.equal(first["flattened_tensor"], before)


def test_named_tensor_buckets_is_verls_bucketing():
    tensors = {f"t{i}": torch.zeros(n) for i, n in enumerate([1, 2, 3, 10, 1, 1])}   # 4, 8, 12, 40, 4, 4 bytes
    got = [[n for n, _ in b] for b in named_tensor_buckets(tensors, 16)]
    assert got == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert all(a is tensors[n] for b in named_tensor_buckets(tensors, 16) for n, a in b)    # no copy


# ------------------------------------------------------------ vLLM: WeightSource and load_weights


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_weight_source_round_trips_through_vllms_engine_one_by_one(dtype):
    tensors = mixed()
    average, model = StandIn(tensors), Receiver()
    source = WeightSource(average, 0, dtype=dtype, bucket_bytes=96, to=[0])
    info = vllm_send_and_receive(source, model, packed=False)
    assert_same(model.got.items(), StandIn(tensors).iter_weights(dtype=dtype))
    assert info["names"] == list(tensors) and average.calls == [(0, dtype, 96, [0])]
    assert info["dtype_names"][:3] == ["float32" if dtype is None else "bfloat16", "bool", "bfloat16"]


@pytest.mark.parametrize("buffer_size_bytes", [1, 64, 1 << 20])
def test_weight_source_round_trips_through_vllms_packed_engine(buffer_size_bytes):
    tensors = mixed()
    floats = [n for n, t in tensors.items() if t.is_floating_point()]
    average, model = StandIn(tensors), Receiver()
    source = WeightSource(average, dtype=torch.bfloat16, names=lambda n: n in floats)
    info = vllm_send_and_receive(source, model, packed=True, buffer_size_bytes=buffer_size_bytes)
    assert info["names"] == floats and set(info["dtype_names"]) == {"bfloat16"}
    assert_same(model.got.items(), ((n, t) for n, t in StandIn(tensors).iter_weights(dtype=torch.bfloat16)
                                    if n in floats))


def test_vllms_packed_path_cannot_take_a_wider_dtype_after_an_odd_byte_buffer():
    """vLLM's own limit (unpack_tensor views each slice of the uint8 buffer as its dtype), why WeightSource's
    names= and dtype= are there: the same stream goes through one by one."""
    tensors = {"mask": torch.tensor([True, False, True]), "w": torch.ones(2, dtype=torch.bfloat16)}
    with pytest.raises(RuntimeError, match="storage_offset"):
        vllm_send_and_receive(WeightSource(StandIn(tensors)), Receiver(), packed=True)
    model = Receiver()
    vllm_send_and_receive(WeightSource(StandIn(tensors)), model, packed=False)
    assert_same(model.got.items(), tensors.items())


def test_weight_source_is_vllms_when_vllm_is_importable(fake_vllm):
    source = WeightSource(StandIn(mixed()))
    assert isinstance(source, VllmWeightSource)
    meta = source.metadata()
    assert all(type(m) is ParamMeta and isinstance(m.shape, tuple) for m in meta)
    assert meta[0] == ParamMeta("embed.weight", torch.float32, (4, 3))


def test_weight_source_without_vllm_gives_the_averages_metadata_and_replays():
    average = StandIn(mixed())
    source = WeightSource(average)
    assert source.metadata() == average.weights_metadata()
    first, second = list(source), list(source)          # vLLM replays the source each round
    assert_same(first, second) and len(average.calls) == 2
    assert first[0][1] is not second[0][1]
    assert "StandIn" in repr(source)


def test_weight_source_refuses_a_stream_that_disagrees_with_its_metadata():
    class Drifted(StandIn):
        def iter_weights(self, row=0, **kw):
            for name, tensor in super().iter_weights(row, **kw):
                yield name, (tensor.double() if name == "fc.bias" else tensor)

    with pytest.raises(RuntimeError, match=r"tensor 5 .*'fc.bias'.*metadata\(\) said"):
        list(WeightSource(Drifted(mixed())))

    class Short(StandIn):
        def iter_weights(self, row=0, **kw):
            yield from list(super().iter_weights(row, **kw))[:-1]

    with pytest.raises(RuntimeError, match="yielded 9 tensors but its metadata lists 10"):
        list(WeightSource(Short(mixed())))

    class Outside(StandIn):                             # what iter_weights(to=) gives a rank not in to
        def iter_weights(self, row=0, **kw):
            return iter(())

    assert list(WeightSource(Outside(mixed()), to=[1, 2])) == []
    for to in ("all", 0, [0, 1], range(1)):             # this process is rank 0: it must receive
        with pytest.raises(RuntimeError, match="yielded 0 tensors but its metadata lists 10"):
            list(WeightSource(Outside(mixed()), to=to))


@pytest.mark.parametrize("bucket_bytes", [None, 1, 64, 1 << 20])
def test_load_weights_feeds_a_model_whole(bucket_bytes):
    tensors = mixed()
    model = Receiver()
    assert load_weights(model, StandIn(tensors).iter_weights(), bucket_bytes=bucket_bytes) == set(tensors)
    assert_same(model.got.items(), tensors.items())
    assert model.calls == (1 if bucket_bytes is None else len(list(named_tensor_buckets(tensors, bucket_bytes))))
    plain = types.SimpleNamespace(load_weights=lambda weights: [None for _ in weights])     # reports a list
    assert load_weights(plain, tensors) == {None}
    quiet = types.SimpleNamespace(load_weights=lambda weights: None if list(weights) else None)
    assert load_weights(quiet, tensors.items()) == set(tensors)


def test_load_weights_drains_a_stream_the_model_left_and_refuses_it():
    tensors = mixed()
    average = StandIn(tensors)
    stream = average.iter_weights()
    early = types.SimpleNamespace(load_weights=lambda weights: [next(iter(weights))[0]])
    with pytest.raises(ValueError, match=r"returned after 1 of the 10 tensors .*no rank hangs"):
        load_weights(early, stream)
    assert next(stream, None) is None


@pytest.mark.parametrize("bucket_bytes", [None, 64])
def test_a_loader_that_raises_or_a_drifted_stream_drains_the_stream_first(bucket_bytes):
    """A rank that stops on an error reads the rest of its stream first: on a sharded average the other
    ranks' streams gather with it (no hang), and the error is raised after."""
    class Broken:
        def load_weights(self, weights):
            next(iter(weights))
            raise KeyError("unknown name")                 # as vLLM's loaders raise on a name they lack

    stream = StandIn(mixed()).iter_weights()
    with pytest.raises(KeyError, match="unknown name"):
        load_weights(Broken(), stream, bucket_bytes=bucket_bytes)
    assert next(stream, None) is None

    read = []

    class Drifted(StandIn):
        def iter_weights(self, row=0, **kw):
            for name, tensor in super().iter_weights(row, **kw):
                read.append(name)
                yield name, (tensor.double() if name == "fc.bias" else tensor)

    with pytest.raises(RuntimeError, match="metadata"):
        list(WeightSource(Drifted(mixed())))
    assert read == list(mixed())                            # every tensor read before the error


# ------------------------------------------------------------ refusals


def test_empty_averages_and_collections_are_refused_by_name_and_empty_streams_give_nothing():
    with pytest.raises(ValueError, match=r"WeightSource: the StandIn holds no tensors"):
        WeightSource(StandIn({}))
    for run in (lambda: flattened_buckets([]), lambda: named_tensor_buckets({}), lambda: load_weights(Receiver(), {}),
                lambda: load_weights(Receiver(), [], bucket_bytes=8)):
        with pytest.raises(ValueError, match=r"the (list|dict) holds no \(name, tensor\) pairs.*iter_weights"):
            run()
    # a rank outside iter_weights(to=...) gets a stream that yields nothing, and must still consume it
    model = Receiver()
    assert list(flattened_buckets(iter(()))) == [] and list(named_tensor_buckets(iter(()))) == []
    assert load_weights(model, iter(())) == set() and load_weights(model, iter(()), bucket_bytes=8) == set()
    assert model.calls == 0


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "256", None])
def test_bad_bucket_sizes_are_refused_at_the_call(bad):
    tensors = mixed()
    for call in (lambda: flattened_buckets(tensors, bad), lambda: named_tensor_buckets(tensors, bad),
                 lambda: WeightSource(StandIn(tensors), bucket_bytes=bad)):
        with pytest.raises(ValueError, match=r"bucket_bytes must be a positive int .*256 << 20"):
            call()
    if bad is not None:
        with pytest.raises(ValueError, match="load_weights: bucket_bytes must be a positive int"):
            load_weights(Receiver(), tensors, bucket_bytes=bad)


class Shard(torch.Tensor):
    def full_tensor(self):
        return self


@pytest.mark.parametrize("weights, error, match", [
    (torch.ones(3), TypeError, "iterable of .name, tensor. pairs, got Tensor"),
    ("weights", TypeError, "got str"),
    (None, TypeError, "got NoneType"),
    ([torch.ones(2)], TypeError, "item 0 of the stream is Tensor, not a .name, tensor. pair"),
    ([(3, torch.ones(2))], TypeError, "has the name 3"),
    ([("", torch.ones(2))], TypeError, "has the name ''"),
    ([("w", [1.0])], TypeError, "'w' is list, not a torch.Tensor"),
    ([("w", torch.ones(2).as_subclass(Shard))], TypeError, "DTensor .*iter_weights"),
    ([("w", torch.ones(2)), ("w", torch.ones(2))], ValueError, "'w' comes twice"),
])
def test_bad_streams_are_refused_by_name(weights, error, match):
    for run in (lambda: list(flattened_buckets(weights)), lambda: list(named_tensor_buckets(weights)),
                lambda: load_weights(Receiver(), weights, bucket_bytes=64)):
        with pytest.raises(error, match=match):
            run()


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="multi_dtype must be True .*False .*None"):
        flattened_buckets(mixed(), multi_dtype="yes")
    with pytest.raises(TypeError, match="metadata_type must be a class taking name="):
        flattened_buckets(mixed(), metadata_type=3)
    with pytest.raises(TypeError, match=r"needs a fastema.torch average .*Linear without iter_weights and "
                                        r"weights_metadata\(\); .*ModuleSource"):
        WeightSource(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="dtype must be a torch.dtype .*got 'bf16'"):
        WeightSource(StandIn(mixed()), dtype="bf16")
    with pytest.raises(TypeError, match="names must be a predicate on a tensor's name"):
        WeightSource(StandIn(mixed()), names=["fc.weight"])
    with pytest.raises(ValueError, match="holds no tensors that names= keeps"):
        WeightSource(StandIn(mixed()), names=lambda n: False)
    with pytest.raises(TypeError, match="Linear has no load_weights.*SimpleNamespace"):
        load_weights(nn.Linear(2, 2), mixed())


# ------------------------------------------------------------ through fastema's own averages


def trained_ema():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = EMA(model, decay=[0.9, 0.5])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
    return model, ema, optimizer


def wire(state, dtype):
    return [(n, t.to(dtype) if dtype is not None and t.is_floating_point() else t) for n, t in state.items()]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_real_ema_through_every_form(dtype):
    model, ema, _ = trained_ema()
    want = wire(ema.full_state_dict(1), dtype)
    for packed_buckets in (flattened_buckets(ema.iter_weights(1, dtype=dtype), 40),
                           flattened_buckets(ema.iter_weights(1, dtype=dtype), 40, multi_dtype=False)):
        receiver = Receiver()
        for bucket in packed_buckets:
            sglang_update_weights_from_flattened_bucket(receiver, bucket,
                                                        bucket["flattened_tensor"].dtype == torch.uint8)
        assert_same(((n, receiver.got[n]) for n, _ in want), want)
    receiver = Receiver()
    vllm_send_and_receive(WeightSource(ema, 1, dtype=dtype, bucket_bytes=64), receiver, packed=False)
    assert_same(receiver.got.items(), want)
    floats = [n for n, t in want if t.is_floating_point()]
    receiver = Receiver()
    vllm_send_and_receive(WeightSource(ema, 1, dtype=torch.bfloat16, names=lambda n: n in floats, to=0),
                          receiver, packed=True, buffer_size_bytes=32)
    assert_same(receiver.got.items(), [(n, t) for n, t in wire(ema.full_state_dict(1), torch.bfloat16) if n in floats])
    receiver = Receiver()
    assert load_weights(receiver, ema.iter_weights(1, dtype=dtype), bucket_bytes=50) == {n for n, _ in want}
    assert_same(receiver.got.items(), want)


def test_a_real_weight_source_hands_out_tensors_no_later_update_or_swap_changes():
    model, ema, optimizer = trained_ema()
    source = WeightSource(ema, 0)
    assert [m.name for m in source.metadata()] == list(ema.full_state_dict(0))
    got = list(source)                                  # the stream's own tensors, not copies
    kept = [(n, t.clone()) for n, t in got]
    model(torch.randn(8, 3)).square().mean().backward()
    optimizer.step()
    ema.update()
    ema.swap()                                          # the average into the model, and back
    ema.swap()
    assert_same(got, kept)
    assert not torch.equal(dict(source)["0.weight"], kept[0][1])       # a new pass is of the new state


def test_a_real_target_network_and_window_average_as_weight_sources():
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    pair = TargetNetwork(online, target, tau=0.5)
    online.weight.data.add_(1.0)
    pair.update()
    receiver = Receiver()
    vllm_send_and_receive(WeightSource(pair), receiver, packed=False)
    assert_same(receiver.got.items(), target.state_dict().items())
    model = nn.Linear(3, 2)
    window = WindowAverage(model, window=2)
    window.update()
    receiver = Receiver()
    assert load_weights(receiver, window.iter_weights()) == {"weight", "bias"}
    assert_same(receiver.got.items(), window.full_state_dict().items())


def _split_to_engines(rank, world):
    """An EMA split over 2 gloo ranks (shard_replicas): every form on every rank, rank 0 alone receiving."""
    from fastema.torch import ShardReplicas

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    ema = EMA(model, 0.9, shard_replicas=ShardReplicas(True, bucket=64))
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(0.01 * (k + 1))
        ema.update()
    want = wire(ema.full_state_dict(), torch.bfloat16)
    receiver = Receiver()
    vllm_send_and_receive(WeightSource(ema, dtype=torch.bfloat16, bucket_bytes=64, to=0), receiver, packed=False) \
        if rank == 0 else list(WeightSource(ema, dtype=torch.bfloat16, bucket_bytes=64, to=0))
    buckets = list(flattened_buckets(ema.iter_weights(dtype=torch.bfloat16, bucket_bytes=64, to=0), 64))
    loaded = load_weights(Receiver(), ema.iter_weights(dtype=torch.bfloat16, bucket_bytes=64, to=0))
    if rank == 0:
        assert_same(receiver.got.items(), want)
        flat = Receiver()
        for bucket in buckets:
            sglang_update_weights_from_flattened_bucket(flat, bucket)
        assert_same(flat.got.items(), want)
        assert loaded == {n for n, _ in want}
    else:
        assert not receiver.got and not buckets and loaded == set()
    return {"sent": torch.tensor(len(receiver.got))}


def test_a_split_average_reaches_the_engines_from_rank_0_with_every_rank_in_step(tmp_path):
    results = run_ranks(_split_to_engines, tmp_path, 2, timeout=180)
    assert [int(r["sent"]) for r in results] == [4, 0]

def test_a_posthoc_synthesised_average_as_a_weight_source(tmp_path):
    """PostHocEMA takes sigma_rel where the others take row: WeightSource passes it on first."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=2, path=tmp_path)
    for _ in range(12):
        model.weight.data.add_(0.1)
        ema.update()
    want = wire(ema.synthesize(0.07), torch.bfloat16)
    receiver = Receiver()
    vllm_send_and_receive(WeightSource(ema, 0.07, dtype=torch.bfloat16), receiver, packed=True)
    assert_same(receiver.got.items(), want)
    receiver = Receiver()
    for bucket in flattened_buckets(ema.iter_weights(0.07, dtype=torch.bfloat16), 8):
        sglang_update_weights_from_flattened_bucket(receiver, bucket)
    assert_same(receiver.got.items(), want)
    # a profile synthesis refuses is refused when the source is made (its metadata allocates the
    # engine's receivers), not when it is read: it was built, and failed only when iterated
    for bad, said in ((5, "sigma_rel must be a number in"), ("abc", "sigma_rel must be a number in")):
        with pytest.raises(ValueError, match=said):
            WeightSource(ema, bad)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ema.weights_metadata(gamma=-1.0)

def test_the_guides_hugging_face_recipe_runs_as_written(capsys):
    """The streamed copy into a transformers model (docs/guides/rl_teachers.md)."""
    pytest.importorskip("transformers")
    text = (pathlib.Path(__file__).parents[2] / "docs" / "guides" / "rl_teachers.md").read_text()
    block = re.search(r"## Into a Hugging Face model.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "rl_teachers.md: into a Hugging Face model", "exec"), {})
    assert capsys.readouterr().out.strip() == "True"
