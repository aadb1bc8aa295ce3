"""The `mmfuse` command. Each subsystem adds its subcommands through a `register(subparsers)`
function in its own module, listed in COMMAND_MODULES, and imported only when the CLI runs."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import MMFuseError

COMMAND_MODULES = [
    "mmfuse.ngram.cli",
    "mmfuse.decoder.cli",
    "mmfuse.encoders.cli",
]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults (not None/False, not where the help text already gives one)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command shows its defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmfuse", description="mmfuse: n-gram LMs, Transformer decoders and CLIP-style "
                     "encoders from local checkpoint folders. Commands import torch only when they need it.")
    parser.add_argument("--version", action="version", version=f"mmfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
