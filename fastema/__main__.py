"""``python -m fastema COMMAND``: ``demo`` trains a small model with EMA (see fastema.demo)."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fastema demo [--steps N] [--decay D] [--seed S]")
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo

        return demo(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m fastema demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
