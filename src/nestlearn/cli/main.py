"""``nestlearn``: train, eval, generate, info, demo, bench, experiment, report, convert.

Every command takes an optional named config (or YAML path) and ``section.key=value`` overrides.
User errors (:class:`~nestlearn.errors.NestlearnError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nestlearn import __version__
from nestlearn.cli import (
    bench,
    convert,
    demo,
    evaluate,
    experiment,
    generate,
    info,
    report,
    train,
)
from nestlearn.errors import NestlearnError

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
        return int(COMMANDS[args.command].run(args) or 0)
    except NestlearnError as exc:
        print(f"nestlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nestlearn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
