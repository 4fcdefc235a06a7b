"""``python -m fastema posthoc`` run in this process, for the post-hoc tests (tests/torch, tests/posthoc,
tests/faults): ``from posthoc_cli import run_cli, one_line``."""


def run_cli(capsys, *argv) -> tuple:
    """``python -m fastema posthoc ARGV`` in this process: (exit status, stdout, stderr)."""
    from fastema.cli import posthoc as cli

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as stop:                     # argparse usage errors
        rc = stop.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line(err: str, *names) -> str:
    """Assert that ``err`` is one line, no traceback, naming each of ``names``; returns the line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]
