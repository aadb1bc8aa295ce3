"""The `mmfuse` command. Each subsystem adds its subcommands through a `register(subparsers)`
function in its own module, listed in COMMAND_MODULES, and imported only when the CLI runs."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MMFuseError

COMMAND_MODULES = [
    "mmfuse.ngram.cli",
    "mmfuse.decoder.cli",
    "mmfuse.encoders.cli",
    "mmfuse.vlm.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MMFuseError, ValueError, FileNotFoundError) as e:
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
