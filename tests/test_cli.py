"""``python -m fastema``: the command list, usage errors, and the commands' options (L11, L14).

In this process through ``main(argv)``; one subprocess for the real entry point's exit status."""
import importlib.util
import subprocess
import sys

import pytest

from fastema.__main__ import main
from fastema.cli import COMMANDS, demo, merge, plot


def test_help_is_a_usage_line_and_a_plain_list_of_the_commands(capsys):
    # L14: --help printed the module's raw docstring, markup included, and no usage line
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fastema [-h] [--version] COMMAND [ARGS...]\n")
    for name, summary in COMMANDS.items():
        assert f"  {name}  " in out and summary in out
    assert not any(mark in out for mark in ("``", ":mod:", ":class:", ":func:"))
    assert "COMMAND --help" in out
    assert main(["-h"]) == 0 and capsys.readouterr().out == out


@pytest.mark.parametrize("argv,message", [
    ([], "give a command: demo, plot, posthoc, merge, warm"),
    (["nope"], "unknown command 'nope'; the commands are demo, plot, posthoc, merge, warm"),
])
def test_no_or_an_unknown_command_prints_the_usage_and_exits_2(capsys, argv, message):
    # L14: `python -m fastema` alone exited 2 printing nothing on stderr
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["usage: python -m fastema [-h] [--version] COMMAND [ARGS...]",
                                              f"python -m fastema: error: {message} (see python -m fastema --help)"]


def test_the_entry_point_alone_exits_2_with_the_usage():
    r = subprocess.run([sys.executable, "-m", "fastema"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("usage: python -m fastema") and "error: give a command" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [demo, plot, merge], ids=["demo", "plot", "merge"])
def test_every_option_has_help_that_shows_its_default(command):
    # L14: demo's --steps, --decay and --seed had no help text; defaults were not shown
    actions = [a for a in command._parser()._actions if a.option_strings and a.dest != "help"]
    assert actions
    for a in actions:
        assert a.help and "(default: " in a.help, a.option_strings
        if a.default not in (None, False):
            assert "%(default)s" in a.help or str(a.default) in a.help, a.option_strings


@pytest.mark.parametrize("command", ["demo", "plot", "merge"])
def test_command_help_exits_0(capsys, command):
    # a command raised argparse's SystemExit where demo and plot return 0 (the test's assert inside
    # pytest.raises never ran); every command returns its exit status now
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m fastema {command}")


def test_the_benchmark_command_left_the_package_and_its_error_says_where_it_went(capsys):
    # issue 62: the benchmark command shipped in the wheel but ran only in a source checkout; the
    # suite is not part of the package now, and the old command names where it lives (what it names
    # runs: the benchmark tooling's own tests check that side)
    from fastema.__main__ import MOVED

    assert importlib.util.find_spec("fastema.cli.bench") is None
    for name, where in MOVED.items():
        assert name not in COMMANDS
        assert main([name, "--quick"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"python -m fastema: error: no command {name!r}: {where}\n"
        assert "not part of the installed package" in where and "source repository" in where


def test_a_directory_given_for_an_output_file_suggests_a_file_of_its_kind(tmp_path):
    # posthoc --out DIR (weights) was told to write 'DIR/out.png'
    from fastema.cli import writable

    with pytest.raises(ValueError, match=r"is a directory: give a file name in it, e\.g\. '.*ema\.safetensors'"):
        writable("--out", str(tmp_path), "ema.safetensors")
    with pytest.raises(ValueError, match=r"e\.g\. '.*out\.png'"):
        writable("--out", str(tmp_path))


@pytest.mark.parametrize("args,names", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["--steps", "abc"], "argument --steps: must be an integer >= 1, got 'abc'"),
    (["--decay", "2"], "argument --decay: must be a number in [0, 1], got '2'"),
    (["--decay", "nan"], "argument --decay: must be a number in [0, 1], got 'nan'"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 9223372036854775807]"),
    (["--out", "{tmp}/missing/x.png"], "--out '{tmp}/missing/x.png': its folder '{tmp}/missing' does not exist"),
    (["--out", "{tmp}"], "--out '{tmp}' is a directory"),
    (["--out", "{tmp}/x.txt"], "--out '{tmp}/x.txt': matplotlib cannot write .txt files"),
])
def test_demo_refuses_bad_arguments_in_one_line_before_training(tmp_path, capsys, monkeypatch, args, names):
    # L11: --steps 0 and --decay 2 gave tracebacks, and --out /missing/dir/x.png failed after training
    import torch

    def no_training(*a, **k):
        raise AssertionError("the demo started training")

    monkeypatch.setattr(torch, "manual_seed", no_training)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["demo", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("python -m fastema demo: error: ") and names.replace("{tmp}", str(tmp_path)) in err
    assert list(tmp_path.iterdir()) == []


def test_demo_without_matplotlib_says_what_to_install_before_training(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch, "manual_seed", lambda *a: pytest.fail("the demo started training"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    assert main(["demo", "--out", str(tmp_path / "d.png")]) == 1
    assert capsys.readouterr().err == ("python -m fastema demo: error: the demo's plot needs matplotlib: "
                                       "pip install 'fastema[plot]'\n")


@pytest.mark.parametrize("args,names", [
    (["--sma", "-1"], "argument --sma: must be an integer >= 0, got '-1'"),
    (["--decay", "1"], "argument --decay: must be a number in [0, 1), got '1'"),
    (["--span", "0.5"], "argument --span: must be a number >= 1, got '0.5'"),
    (["--halflife", "inf"], "argument --halflife: must be a number > 0, got 'inf'"),
    (["--decay", "0.5", "--span", "3"], "argument --span: not allowed with argument --decay"),
    (["--no-ema", "--sma", "0"], "--no-ema with --sma 0 leaves nothing to draw"),
    (["--out", "{tmp}"], "--out '{tmp}' is a directory"),
    (["--out", "{tmp}/no/x.png"], "its folder '{tmp}/no' does not exist"),
])
def test_plot_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, names):
    log = tmp_path / "log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["plot", str(log), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and names.replace("{tmp}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_plot_names_a_log_it_cannot_read(tmp_path, capsys, what):
    log = tmp_path / "nope.csv" if what == "missing" else tmp_path
    assert main(["plot", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m fastema plot: error: LOG {str(log)!r} ") and len(err.splitlines()) == 1


# ------------------------------------------------------------ merge: the flags are MergeOptions' fields


def test_every_merge_option_has_one_flag_with_the_options_own_help():
    """issue 51: cli/merge.py wrote each of the 18 options by hand a second time; now each flag is a field of
    MergeOptions, its help the option's text, its default the field's."""
    import dataclasses

    from fastema.merge import MergeOptions

    actions = {a.dest: a for a in merge._parser()._actions if a.option_strings and a.dest != "help"}
    assert set(actions) == set(MergeOptions.names())
    for f in dataclasses.fields(MergeOptions):
        a = actions[f.name]
        assert a.help == MergeOptions.text(f.name, flag=True) and a.default == f.default, f.name
        assert a.option_strings == [f.metadata["flag"].get("name", "--" + f.name.replace("_", "-"))], f.name
    assert actions["progress"].option_strings == ["--no-progress"] and actions["progress"].const is False


def test_merge_flags_reach_merge_checkpoints_as_its_keywords(capsys, tmp_path):
    from support.calls import watching

    from fastema.merge import MergeError, MergeOptions, merge_checkpoints

    calls = []

    def reached(args):                     # what the command called the merge with; then it stops there
        calls.append(args)
        raise MergeError("stopped where it began")

    out, a, b = (str(tmp_path / n) for n in ("out", "a", "b"))
    with watching(merge_checkpoints, on_call=reached):
        assert merge.main([out, a, b]) == 1
    kwargs, = calls
    assert (kwargs.pop("inputs"), kwargs.pop("out")) == ([a, b], out) and kwargs.pop("log") is print
    assert kwargs == {f: getattr(MergeOptions(), f) for f in MergeOptions.names()}     # the defaults, each once
    assert capsys.readouterr().err.strip().endswith("stopped where it began")
    calls.clear()
    with watching(merge_checkpoints, on_call=reached):
        assert merge.main([out, a, b, "--weights", "0.25,0.75", "--steps", "100,200", "--seed", "7",
                           "--copy-from", "first", "--only", "^block", "--no-progress", "--allow-negative",
                           "--max-error", "0.1", "--read", "mmap", "--accumulate", "float64",
                           "--dtype", "bfloat16"]) == 1
    kwargs = calls[0]
    assert MergeOptions(**{n: kwargs[n] for n in MergeOptions.names()}) == MergeOptions(
        weights="0.25,0.75", steps=(100.0, 200.0), seed=7, copy_from="first", only="^block", progress=False,
        allow_negative=True, max_error=0.1, read="mmap", accumulate="float64", dtype="bfloat16")


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "argument --seed: seed must be an int in [0, 4294967295], got -1"),
    (["--seed", "x"], "argument --seed: seed must be an int in [0, 4294967295], got 'x'"),
    (["--weights", "cosine"], "argument --weights: unknown weights 'cosine'; the styles are uniform"),
    (["--steps", "1,x"], "argument --steps: must be numbers separated by commas, got '1,x'"),
    (["--copy-from", "middle"], "argument --copy-from: copy_from must be 'last', 'first' or an input index"),
    (["--only", "("], "argument --only: only: '(' is not a regular expression"),
    (["--max-error", "-1"], "argument --max-error: max_error must be None (0.05) or a number >= 0, got -1.0"),
    (["--max-error", "nan"], "argument --max-error: max_error must be None (0.05) or a number >= 0, got 'nan'"),
    (["--read", "mmap2"], "argument --read: invalid choice: 'mmap2'"),
])
def test_a_bad_merge_flag_is_a_usage_error_naming_it_from_the_options_check(tmp_path, capsys, args, message):
    assert merge.main([str(tmp_path / "out.safetensors"), str(tmp_path / "a"), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []
