"""fastema.merge.merge_checkpoints over every input format and weight style: each averaged tensor
equals the float64 weighted sum to float32 rounding, the copied entries equal the copy_from
input's bytes, and the output's bits are the same across runs, formats, read modes and piece
sizes."""
import json
import os

import pytest
import torch
from merge_helpers import NAMES, assert_float32_close, checkpoints, leftovers, model_state, reference, write
from safetensors.torch import load_file
from support import faults

from fastema.merge import MergeError, _engine, merge_checkpoints

FORMATS = ("safetensors", "hf", "hf-sharded", "pt")
STYLES = ("uniform", "linear", "minus-sqrt", "minus-sqrt__reverse", "linear__scramble", "ema:150", "ema:0.99",
          "wsm:linear", "wsm:cosine", "wsm:1-sqrt", "0.1,0.2,0.7")
COPIED = ("block.0.mask", "block.0.attn._extra_state", "block.0.attn.weight_scale_inv", "tokens_seen")


def load(out) -> dict:
    out = str(out)
    if out.endswith(".safetensors"):
        return load_file(out)
    tensors = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, f)))
    return tensors


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", STYLES)
def test_every_format_and_style_equals_the_float64_reference(tmp_path, fmt, style):
    paths, states = checkpoints(tmp_path / "in", fmt)
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", weights=style)
    assert abs(sum(report.weights) - 1) < 1e-12 and report.steps == [100, 200, 300]
    got = load(tmp_path / "out.safetensors")
    for name in NAMES:
        assert got[name].dtype == states[0][name].dtype
        assert_float32_close(got[name], reference(states, report.weights, name), 3, got[name].dtype)
    for name in COPIED:                                     # copied from the last input, never averaged
        assert torch.equal(got[name], states[-1][name]), name
    assert sorted(report.copied) == sorted(COPIED) and sorted(report.averaged) == sorted(NAMES)


def test_bits_are_equal_across_runs_formats_read_modes_and_pieces(tmp_path):
    outs = []
    for fmt in FORMATS:
        paths, _ = checkpoints(tmp_path / fmt, fmt)
        for read in ("mmap", "pread"):
            out = tmp_path / f"{fmt}-{read}.safetensors"
            merge_checkpoints(paths, out, weights="wsm:1-sqrt", read=read)
            outs.append(load(out))
    with _engine.tuned(mmap_piece=64, pread_piece=64):     # every tensor in many pieces
        for fmt in ("safetensors", "pt"):
            paths, _ = checkpoints(tmp_path / f"again-{fmt}", fmt)
            for read in ("mmap", "pread"):
                merge_checkpoints(paths, tmp_path / "pieces.safetensors", weights="wsm:1-sqrt", read=read,
                                  overwrite=True)
                outs.append(load(tmp_path / "pieces.safetensors"))
    for other in outs[1:]:
        assert other.keys() == outs[0].keys()
        for name in outs[0]:
            assert outs[0][name].view(-1).view(torch.uint8).equal(other[name].view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("read, copy", [("pread", True), ("pread", False), ("mmap", True)],
                         ids=["pread", "pread, process_vm_readv refused", "mmap"])
def test_torch_files_of_strided_views_and_step_tensors_merge_alike_in_every_read_mode(tmp_path, request, read,
                                                                                       copy):
    """A torch file's pieces under read="pread" are copied out of torch's map (process_vm_readv); a
    tensor saved as a strided view is made contiguous from a copy of the bytes it spans, and a step
    saved as a tensor is read from a copy too. Where the system refuses process_vm_readv, they are read
    in the map, as with read="mmap": the same values either way."""
    from fastema.merge import _source

    if not copy:
        faults.held(request, _source.copying_refused())
    faults.held(request, _engine.tuned(**{f"{read}_piece": 256}))   # a view's pieces, and its copy, in several
    base = torch.arange(12 * 40, dtype=torch.float32).reshape(12, 40)
    paths, states = [], []
    for i in range(2):
        state = {"t": (base + i).t()[3:, ::2], "b": torch.full((300,), float(i)).bfloat16(), "k": torch.arange(5) + i}
        assert not state["t"].is_contiguous()
        paths.append(str(tmp_path / f"ckpt-{i}.pt"))
        torch.save({"model": state, "step": torch.tensor(100 * (i + 1))}, paths[-1])
        states.append(state)
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", read=read)
    got = load(tmp_path / "out.safetensors")
    assert report.steps == [100, 200]
    assert torch.equal(got["t"], (states[0]["t"] + states[1]["t"]) / 2)
    assert torch.equal(got["b"], torch.full((300,), 0.5).bfloat16()) and torch.equal(got["k"], states[1]["k"])


def test_mixed_formats_merge_when_names_and_shapes_agree(tmp_path):
    states = [model_state(i) for i in range(3)]
    paths = [write(s, tmp_path, fmt, i) for i, (s, fmt) in enumerate(zip(states, ("pt", "hf", "safetensors")))]
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", weights="minus-sqrt")
    assert report.formats == ["torch", "huggingface", "safetensors"]
    got = load(tmp_path / "out.safetensors")
    for name in NAMES:
        assert_float32_close(got[name], reference(states, report.weights, name), 3, got[name].dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_output_dtype_and_float64_sums(tmp_path, dtype):
    paths, states = checkpoints(tmp_path / "in", "safetensors")
    for acc in ("float32", "float64"):
        out = tmp_path / f"{acc}.safetensors"
        report = merge_checkpoints(paths, out, dtype=dtype, accumulate=acc)
        got = load(out)
        for name in NAMES:
            assert got[name].dtype == getattr(torch, dtype)
            assert_float32_close(got[name], reference(states, report.weights, name), 3, got[name].dtype)
        assert got["tokens_seen"].dtype == torch.int64            # copies keep their dtype


def test_stochastic_rounding_is_reproducible_and_unbiased(tmp_path):
    states = [{"w": torch.full((20000,), 1.0 + i * 2.0 ** -9)} for i in range(2)]
    paths = [write(s, tmp_path, "safetensors", i) for i, s in enumerate(states)]
    a = merge_checkpoints(paths, tmp_path / "a.safetensors", dtype="bfloat16", stochastic_rounding=True, seed=3)
    merge_checkpoints(paths, tmp_path / "b.safetensors", dtype="bfloat16", stochastic_rounding=True, seed=3)
    merge_checkpoints(paths, tmp_path / "c.safetensors", dtype="bfloat16", stochastic_rounding=True, seed=4)
    merge_checkpoints(paths, tmp_path / "n.safetensors", dtype="bfloat16")
    ga, gb, gc = (load(tmp_path / f"{k}.safetensors")["w"] for k in "abc")
    assert torch.equal(ga, gb) and not torch.equal(ga, gc)
    exact = 1.0 + 2.0 ** -10                                # a quarter of bfloat16's step above 1 (2**-7 / 8)
    assert abs(ga.double().mean().item() - exact) < 2e-4      # unbiased, where nearest rounding loses it:
    assert load(tmp_path / "n.safetensors")["w"].double().mean().item() == 1.0
    assert a.weights == (0.5, 0.5)


def test_options_that_would_change_nothing_are_refused_before_anything_is_written(tmp_path):
    paths = [write({"w": torch.full((4,), float(i))}, tmp_path, "safetensors", i) for i in range(3)]
    for kwargs, says in (({"stochastic_rounding": True}, "no averaged tensor is written as bfloat16"),
                         ({"stochastic_rounding": True, "dtype": "float16"}, "pass dtype='bfloat16'"),
                         ({"max_error": 0.1}, "weights 'uniform' fit nothing"),
                         ({"max_error": 0.1, "weights": "ema:0.9", "steps": [1, 2, 3]}, "max_error bounds the fit"),
                         ({"seed": 7}, r"seed=7 seeds stochastic_rounding and __scramble weights, and this merge "
                                       r"has neither: drop it"),
                         ({"optimizer": True}, "optimizer=True keeps the optimizer state of torch inputs, and these "
                                               "inputs hold none: no optimizer tensor")):
        with pytest.raises(MergeError, match=says):
            merge_checkpoints(paths, tmp_path / "out.safetensors", **kwargs)
        assert not os.path.exists(tmp_path / "out.safetensors")
    states = [{"w": torch.ones(4, dtype=torch.bfloat16)}, {"w": torch.zeros(4, dtype=torch.bfloat16)}]
    os.makedirs(tmp_path / "b")
    bf16 = [write(s, tmp_path / "b", "safetensors", i) for i, s in enumerate(states)]
    merge_checkpoints(bf16, tmp_path / "b.safetensors", stochastic_rounding=True)   # bfloat16 kept: taken
    merge_checkpoints(paths, tmp_path / "s.safetensors", weights="minus-sqrt__scramble", seed=7)   # its shuffle
    torch_paths, _ = checkpoints(tmp_path / "pt", "pt")
    report = merge_checkpoints(torch_paths, tmp_path / "o.pt", optimizer=True)          # state to keep: taken
    assert "optimizer state" in report.copied.values()


def test_huggingface_folder_out_keeps_the_layout_and_small_files(tmp_path):
    paths, states = checkpoints(tmp_path / "in", "hf-sharded")
    report = merge_checkpoints(paths, tmp_path / "merged", weights="uniform", copy_from="first", verify=True)
    files = sorted(os.listdir(tmp_path / "merged"))
    assert files == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.json"]             # no optimizer.pt
    assert json.load(open(tmp_path / "merged" / "config.json"))["checkpoint"] == 0        # copy_from="first"
    index = json.load(open(tmp_path / "merged" / "model.safetensors.index.json"))
    assert index["weight_map"] == json.load(open(os.path.join(paths[0], "model.safetensors.index.json")))[
        "weight_map"]
    got = load(tmp_path / "merged")
    assert torch.equal(got["tokens_seen"], states[0]["tokens_seen"]) and report.verified
    for name in NAMES:
        assert_float32_close(got[name], reference(states, report.weights, name), 3, got[name].dtype)


def test_a_model_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    paths, models = [], []
    for i in range(2):
        torch.manual_seed(i)
        m = transformers.GPT2LMHeadModel(config)
        m.save_pretrained(tmp_path / f"checkpoint-{i + 1}")
        paths.append(tmp_path / f"checkpoint-{i + 1}")
        models.append(m)
    merge_checkpoints(paths, tmp_path / "merged")
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    for name, p in merged.state_dict().items():
        ref = (models[0].state_dict()[name].double() + models[1].state_dict()[name].double()) / 2
        if p.is_floating_point():
            assert torch.allclose(p.double(), ref, atol=1e-6), name
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()     # still tied


def test_tied_tensors_are_written_once(tmp_path):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        emb = torch.randn(11, 4)
        paths.append(tmp_path / f"{i}.pt")
        torch.save({"embed.weight": emb, "head.weight": emb, "bias": torch.randn(4)}, paths[-1])
    report = merge_checkpoints(paths, tmp_path / "out.safetensors")
    got = load(tmp_path / "out.safetensors")
    assert sorted(got) == ["bias", "embed.weight"] and report.tied == {"head.weight": "embed.weight"}


def test_only_and_exclude_choose_what_is_averaged(tmp_path):
    paths, states = checkpoints(tmp_path / "in", "safetensors")
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", only=r"^block\.", exclude=r"norm")
    got = load(tmp_path / "out.safetensors")
    assert sorted(report.averaged) == ["block.0.attn.weight", "block.0.mlp.bias"]
    assert torch.equal(got["embed.weight"], states[-1]["embed.weight"])               # copied, not averaged
    assert torch.equal(got["block.0.norm.weight"], states[-1]["block.0.norm.weight"])


def test_dry_run_writes_nothing_and_reports_the_weights(tmp_path, capsys):
    paths, _ = checkpoints(tmp_path / "in", "pt")
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", weights="ema:100", dry_run=True, log=print)
    assert report.dry_run and not os.path.exists(tmp_path / "out.safetensors")
    out = capsys.readouterr().out
    assert "ema:100" in out and "step 300" in out and f"{report.weights[-1]:.6f}" in out
    assert report.dropped == ["optimizer"]


def test_progress_bar_counts_bytes(tmp_path, capsys):
    pytest.importorskip("tqdm")
    paths, _ = checkpoints(tmp_path / "in", "safetensors")
    merge_checkpoints(paths, tmp_path / "out.safetensors", progress=True)
    assert "B/s" in capsys.readouterr().err


def test_values_beyond_a_narrower_output_dtype_are_refused_not_written_as_inf(tmp_path):
    states = [{"w": torch.tensor([1.0, 7e4, float("inf")])}, {"w": torch.tensor([1.0, 7e4, float("inf")])}]
    paths = [write(s, tmp_path, "safetensors", i) for i, s in enumerate(states)]
    with pytest.raises(MergeError, match=r"tensor 'w': merged values reach 70000, beyond the range of float16"):
        merge_checkpoints(paths, tmp_path / "out.safetensors", dtype="float16")
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []
    states[0]["w"][1] = states[1]["w"][1] = 6e4                      # inf in the inputs stays inf: no refusal
    (tmp_path / "ok").mkdir()
    paths = [write(s, tmp_path / "ok", "safetensors", i) for i, s in enumerate(states)]
    merge_checkpoints(paths, tmp_path / "ok.safetensors", dtype="float16")
    assert load(tmp_path / "ok.safetensors")["w"].tolist() == [1.0, 60000.0, float("inf")]
