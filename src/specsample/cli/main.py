"""The `specsample` command line.

Each subcommand lives in its own module with one function, `register(subparsers)`, that adds its
subparser and sets `run` on it (`set_defaults(run=...)`): the handler, called with the parsed
arguments, returning the exit code. Adding a subcommand is adding its `register` to COMMANDS.

A handler reports a bad option value by raising `argparse.ArgumentTypeError("--option: expected
..., got ...")`; `main` prints it with the subcommand's usage and returns 2, as argparse does for
its own errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import specsample
from specsample.cli import audit, batch, explain, generate, serve

COMMANDS = (
    generate.register,
    explain.register,
    audit.register,
    serve.register,
    batch.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specsample",
        description=(
            "specsample: exact speculative sampling for large language models. A cheap drafter "
            "proposes tokens, the large target model checks them, and the tokens that come out "
            "are distributed exactly as if the target had sampled them alone."
        ),
        epilog="Run 'specsample COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {specsample.__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for register in COMMANDS:
        register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.set_defaults(_parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line on `argv` (default: sys.argv[1:]) and returns the exit code: 0 on
    success, 2 for a usage error. Never raises SystemExit, so it can be called in-process."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        try:
            return args.run(args)
        except argparse.ArgumentTypeError as error:
            args._parser.error(str(error))  # prints usage and the message, exits 2
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
