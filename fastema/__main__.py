"""``python -m fastema COMMAND [ARGS...]``: the commands of :mod:`fastema.cli` (``--help`` lists them)."""
import sys

from .cli import COMMANDS

__all__ = ["main"]

PROG = "python -m fastema"
MOVED = {"bench": "the benchmarks are not part of the installed package: they live in bench/ "
                  "of fastema's source repository; in a checkout, at its root, run "
                  "python -m bench.suite [--quick] (bench/README.md)"}
"""Commands that left the package, each with where it went."""
USAGE = f"usage: {PROG} [-h] [--version] COMMAND [ARGS...]"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "fastema's command-line tools.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this message and exit",
              "  --version   show fastema's version and exit",
              "", f"'{PROG} COMMAND --help' shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run ``argv`` (default ``sys.argv[1:]``) as ``python -m fastema ...``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"{USAGE}\n{PROG}: error: give a command: {', '.join(COMMANDS)} (see {PROG} --help)",
              file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"fastema {__version__}")
        return 0
    if argv[0] in MOVED:
        print(f"{PROG}: error: no command {argv[0]!r}: {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        print(f"{USAGE}\n{PROG}: error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
              f"(see {PROG} --help)", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(f"fastema.cli.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
