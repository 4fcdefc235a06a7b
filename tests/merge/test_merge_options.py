"""MergeOptions: every option of a merge checked once, before any input is opened, with a message
naming it, its value and what it takes; merge_checkpoints' keywords are its fields, and its
docstring their text; _write takes the options whole."""
import dataclasses
import inspect

import numpy as np
import pytest
from merge_helpers import checkpoints, fingerprint, temporary_entries
from support.calls import watching

from fastema.merge import MergeError, MergeOptions, _core, merge_checkpoints


@pytest.mark.parametrize("name, value, match", [
    ("weights", "cosine", r"unknown weights 'cosine'; the styles are uniform, linear"),
    ("weights", "minus-sqrt__up", r"the modifiers are __reverse and __scramble"),
    ("weights", "ema:-3", r"ema: takes a number > 0"),
    ("weights", [1, "x"], r"weights must be a style name or a list of numbers"),
    ("weights", 3, r"weights must be a style name or a list of numbers, got 3"),
    ("dtype", "int8", r"dtype must be one of same, float32, bfloat16, float16, got 'int8'"),
    ("copy_from", "middle", r"copy_from must be 'last', 'first' or an input index .*got 'middle'"),
    ("copy_from", 1.0, r"copy_from must be .*got 1\.0"),
    ("copy_from", True, r"copy_from must be .*got True"),
    ("only", "(", r"only: '\(' is not a regular expression"),
    ("exclude", "[a-", r"exclude: '\[a-' is not a regular expression"),
    ("only", 3, r"only must be None or a regular expression \(a str\), got 3"),
    ("steps", "100,200", r"steps must be None or a list of numbers, one per input"),
    ("steps", [1, "2"], r"steps must be None or a list of numbers"),
    ("steps", [True, 2], r"steps must be None or a list of numbers"),
    ("allow_negative", "yes", r"allow_negative must be True or False, got 'yes'"),
    ("stochastic_rounding", 1, r"stochastic_rounding must be True or False, got 1"),
    ("seed", -1, r"seed must be an int in \[0, 4294967295\], got -1"),
    ("seed", 2**32, r"seed must be an int in \[0, 4294967295\], got 4294967296"),
    ("seed", 1.5, r"seed must be an int in \[0, 4294967295\], got 1\.5"),
    ("seed", False, r"seed must be an int"),
    ("accumulate", "float16", r"accumulate must be 'float32' or 'float64', got 'float16'"),
    ("optimizer", None, r"optimizer must be True or False, got None"),
    ("verify", "no", r"verify must be True or False"),
    ("dry_run", 0, r"dry_run must be True or False"),
    ("overwrite", "yes", r"overwrite must be True or False"),
    ("progress", "auto", r"progress must be True, False or None \(when stderr is a terminal\), got 'auto'"),
    ("read", "mmap2", r"read must be 'pread' or 'mmap', got 'mmap2'"),
    ("max_error", -0.1, r"max_error must be None \(0\.05\) or a number >= 0, got -0\.1"),
    ("max_error", float("nan"), r"max_error must be None \(0\.05\) or a number >= 0, got nan"),
    ("max_error", "0.1", r"max_error must be None \(0\.05\) or a number >= 0, got '0\.1'"),
])
def test_each_option_is_refused_by_name_before_any_input_is_opened(tmp_path, name, value, match):
    with pytest.raises(MergeError, match=match):
        MergeOptions(**{name: value})
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    before = fingerprint(paths)
    opened = []
    with watching(_core.open_input, on_call=opened.append), pytest.raises(MergeError, match=match):
        merge_checkpoints(paths, tmp_path / "out.safetensors", **{name: value})
    assert opened == [] and not (tmp_path / "out.safetensors").exists() and temporary_entries(tmp_path) == []
    assert fingerprint(paths) == before


@pytest.mark.parametrize("name, value, kept", [
    ("weights", [0.25, 0.75], (0.25, 0.75)),
    ("weights", np.array([1.0, 3.0]), (1.0, 3.0)),
    ("weights", "ema:1000", "ema:1000"),
    ("steps", [100, None, 300], (100, None, 300)),
    ("steps", np.array([1, 2]), (1, 2)),
    ("copy_from", -1, -1),
    ("copy_from", np.int64(1), 1),
    ("copy_from", " 2 ", " 2 "),
    ("seed", np.uint32(7), 7),
    ("max_error", 1, 1.0),
    ("progress", False, False),
])
def test_accepted_options_are_kept_plain_and_frozen(name, value, kept):
    options = MergeOptions(**{name: value})
    assert getattr(options, name) == kept
    got = getattr(options, name)
    assert type(got) is type(kept)
    if isinstance(kept, tuple):
        assert [type(v) for v in got] == [type(v) for v in kept]          # plain Python numbers, not NumPy's
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options, name, value)


def test_a_copy_from_index_past_the_inputs_is_refused_once_they_are_counted(tmp_path):
    paths, _ = checkpoints(tmp_path / "in", "safetensors", count=2)
    with pytest.raises(MergeError, match=r"copy_from 5 names no input: there are 2; give 'last', 'first' or an "
                                         r"index in \[0, 2\)"):
        merge_checkpoints(paths, tmp_path / "out.safetensors", copy_from=5)
    report = merge_checkpoints(paths, tmp_path / "out.safetensors", copy_from="-2", dry_run=True)
    assert report.copy_from == 0


def test_merge_checkpoints_keywords_are_the_options_with_their_defaults():
    """The public signature stays as it was, and says the same as MergeOptions: one default per option."""
    params = inspect.signature(merge_checkpoints).parameters
    assert list(params)[:4] == ["inputs", "out", "weights", "dtype"]
    assert set(params) - {"inputs", "out", "log"} == set(MergeOptions.names())
    for f in dataclasses.fields(MergeOptions):
        assert params[f.name].default == f.default, f.name
        assert f.metadata["text"] and callable(f.metadata["check"]), f.name
        assert MergeOptions.text(f.name) in " ".join(merge_checkpoints.__doc__.split()), f.name
    assert "<<options>>" not in merge_checkpoints.__doc__


def test_the_option_texts_name_other_options_in_each_spelling():
    assert "``only`` / ``exclude``" in MergeOptions.text("copy_from")
    assert "--only / --exclude" in MergeOptions.text("copy_from", flag=True)
    assert MergeOptions.text("overwrite").startswith("replace an existing ``out``")
    assert MergeOptions.text("overwrite", flag=True).startswith("replace an existing OUT")
    assert MergeOptions.text("seed", flag=True).endswith("(default: %(default)s)")
    assert MergeOptions.text("max_error", flag=True).endswith("(default: 0.05)")
    assert "{" not in " ".join(MergeOptions.text(n) + MergeOptions.text(n, flag=True) for n in MergeOptions.names())


def test_write_takes_the_options_whole():
    """issue 51: _write took 13 positional parameters, the options threaded one by one."""
    params = inspect.signature(_core._write).parameters
    assert len(params) <= 8 and list(params)[-1] == "options"
    assert params["options"].annotation in (MergeOptions, "MergeOptions")
