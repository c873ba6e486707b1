"""``nestlearn``: train, eval, generate, info, demo, bench, experiment, report, convert, export.

Every command takes an optional named config (or YAML path) and ``section.key=value`` overrides.
User errors (:class:`~nestlearn.errors.NestlearnError`) print one line and exit with status 2;
a closed output pipe (``| head``) ends the command quietly with status 141 (128 + SIGPIPE).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from nestlearn import __version__
from nestlearn.cli import (
    bench,
    convert,
    demo,
    evaluate,
    experiment,
    export,
    generate,
    info,
    report,
    train,
)
from nestlearn.errors import NestlearnError, NestlearnWarning

COMMANDS = {
    "train": train,
    "eval": evaluate,
    "generate": generate,
    "info": info,
    "demo": demo,
    "bench": bench,
    "experiment": experiment,
    "report": report,
    "convert": convert,
    "export": export,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestlearn",
        description="Nested Learning / HOPE: train, evaluate and sample language models.",
    )
    parser.add_argument("--version", action="version", version=f"nestlearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Print a :class:`NestlearnWarning` as ``nestlearn CMD: warning: ...`` (no source line)."""
    previous = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, NestlearnWarning):
            return f"nestlearn {command}: warning: {message}\n"
        return previous(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`eval RUN --source X eval.max_tokens=0`): argparse leaves
    # such trailing key=value words unparsed, so they are appended here.
    args, rest = parser.parse_known_args(argv)
    unknown = [word for word in rest if word.startswith("-") or "=" not in word]
    if unknown or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        with one_line_warnings(args.command):
            status = int(COMMANDS[args.command].run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except NestlearnError as exc:
        print(f"nestlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nestlearn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`nestlearn generate RUN | head`): stop quietly, as a process killed
        # by SIGPIPE would.
        _discard_stdout()
        return 128 + 13


def _discard_stdout() -> None:
    """Point stdout at the null device, so that Python's flush at exit cannot raise
    BrokenPipeError again (the recipe of Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
