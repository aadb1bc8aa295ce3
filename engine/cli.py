"""The `mmfuse` command. Each subsystem adds its subcommands through a `register(subparsers)`
function in its own module, listed in COMMAND_MODULES, and imported only when the CLI runs."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MMFuseError

COMMAND_MODULES = [
    "mmfuse.ngram.cli",
    "mmfuse.decoder_cli",
    "mmfuse.encoders.cli",
]

# Commands registered alone when named first, so they start without importing the others' torch.
STANDALONE_COMMANDS = {"ngram": "mmfuse.ngram.cli"}


def build_parser(argv=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    first = next((a for a in argv or () if not a.startswith("-")), None)
    for name in [STANDALONE_COMMANDS[first]] if first in STANDALONE_COMMANDS else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MMFuseError, ValueError, FileNotFoundError) as e:
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
