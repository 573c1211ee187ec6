"""The ``epd`` command line. Each sub-command lives in ``epd_solver.commands.<name>``.

Expected failures end in one line on stderr (``epd COMMAND: error: ...``), never a traceback, with a
distinct exit status: 2 bad input (arguments, parameter files, existing outputs), 3 the file system
(read-only or missing folder, disk full, name too long, permission), 4 out of memory, 130 interrupted
(Ctrl-C) and 143 terminated (SIGTERM), both with the command that continues the run.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys
import threading

# (command, module) in the order shown by --help; a module that is absent is simply not listed.
COMMANDS = ["demo", "problems", "solvers", "sample", "distill", "bench", "train-model"]

EXIT_INPUT, EXIT_FILES, EXIT_MEMORY, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 3, 4, 130, 143

# How each command continues after an interrupt: the flag to add, and what it keeps.
RESUME = {
    "distill": ("--resume", "to continue from the last checkpoint"),
    "train-model": ("--resume", "to continue from the last checkpoint"),
    "sample": ("", "to continue (seeds already written are kept)"),
    "bench": ("--force", "to run it again (the teacher cache is kept)"),
    "demo": ("--force", "to run it again (the teacher cache is kept)"),
}


class Terminated(BaseException):
    """SIGTERM, raised so that ``finally`` blocks (temporary files) run as for Ctrl-C."""


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


def resume_hint(command: str, argv: list[str]) -> str:
    """One line: how to continue ``epd COMMAND ARGV`` after an interrupt."""
    flag, what = RESUME.get(command, ("", "to run it again"))
    args = list(argv)
    if flag and flag not in args:
        args.append(flag)
    return f"{what}, run: epd {shlex.join(args)}"


def check_device(args: argparse.Namespace) -> None:
    """A ``--device`` that torch cannot parse is a named error, before any work."""
    device = getattr(args, "device", None)
    if device in (None, "auto"):
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


def _error(command: str, message: str) -> None:
    text = " ".join(str(message).split())  # one line
    print(f"epd {command}: error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        check_device(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nepd {args.command}: interrupted; {resume_hint(args.command, argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"epd {args.command}: terminated; {resume_hint(args.command, argv)}", file=sys.stderr)
        return EXIT_TERMINATED
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as e:
        _error(args.command, e)
        return EXIT_INPUT
    except MemoryError:
        _error(args.command, "out of memory: lower --batch (or the number of seeds / samples)")
        return EXIT_MEMORY
    except OSError as e:  # read-only folder, disk full, name too long, permission denied, ...
        where = f": {e.filename}" if e.filename else ""
        _error(args.command, f"{e.strerror or e}{where}")
        return EXIT_FILES
    except RuntimeError as e:
        if "out of memory" in str(e).lower():  # torch.OutOfMemoryError and CPU allocator failures
            _error(args.command, f"out of memory: lower --batch ({str(e).splitlines()[0]})")
            return EXIT_MEMORY
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
