"""``python -m fastema COMMAND``.

Commands:
    demo    train a small model with an EMA of its weights (fastema.cli.demo)
    plot    draw raw, SMA and EMA curves of a logged metric to a PNG (fastema.cli.plot)
    bench   run the benchmark suite and write its report (fastema.cli.bench)
    posthoc synthesise a post-hoc EMA from PostHocEMA snapshots (fastema.cli.posthoc)
"""
import sys

__all__ = ["main"]

COMMANDS = {"demo": "demo", "plot": "plot", "bench": "bench", "posthoc": "posthoc"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(f"fastema.cli.{COMMANDS[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
