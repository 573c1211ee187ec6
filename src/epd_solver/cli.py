"""The ``epd`` command line. Each sub-command lives in ``epd_solver.commands.<name>``."""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module) in the order shown by --help; a module that is absent is simply not listed.
COMMANDS = ["demo", "problems", "solvers", "sample", "distill", "bench", "train-model"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="epd", description="Fast diffusion sampling with EPD-Solver and its "
                                     "baselines: sample, distil, benchmark.")
    parser.add_argument("--version", action="version", version=f"epd-solver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name.replace('-', '_')}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(name.replace("-", "_")):
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as e:
        print(f"epd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
