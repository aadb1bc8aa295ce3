"""The `mmfuse` command. Each subsystem adds its subcommands through a `register(subparsers)`
function in its own module, listed in COMMAND_MODULES, and imported only when the CLI runs.

Errors never print a traceback: an mmfuse error (bad input, checkpoint, config, output) or
another ValueError/OSError prints one line `mmfuse CMD: error: ...` and exits 2; running out of
memory exits 1 with one line; any other exception is a bug reported in one line with a hint to
rerun with `--traceback` (or MMFUSE_TRACEBACK=1), exit 1; Ctrl-C exits 130 quietly."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from . import __version__, envs
from .errors import MMFuseError

COMMAND_MODULES = [
    "mmfuse.ngram.cli",
    "mmfuse.decoder.cli",
    "mmfuse.encoders.cli",
    "mmfuse.vlm.cli",
    "mmfuse.export.cli",
    "mmfuse.world.cli",
]
TRACEBACK_ENV = "MMFUSE_TRACEBACK"  # set to 1 to print tracebacks of internal errors


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
    parser.add_argument("--traceback", action="store_true",
                        help=f"print the traceback of an internal error (or set {TRACEBACK_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _out_of_memory(e: BaseException) -> bool:
    """MemoryError, or the RuntimeError of a failed torch allocation."""
    msg = str(e).lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in msg or "out of memory" in msg or "failed to allocate" in msg))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"mmfuse {args.command}"
    show = args.traceback
    try:
        show = show or envs.MMFUSE_TRACEBACK  # a bad value is a SettingError, reported in one line
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mmfuse ... | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")
        return 1
    except (MMFuseError, ValueError, OSError) as e:
        if show:
            traceback.print_exc()
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if show:
            traceback.print_exc()
        if _out_of_memory(e):
            print(f"{name}: error: out of memory ({_one_line(e)})", file=sys.stderr)
            return 1
        hint = "" if show else f" (rerun with --traceback or {TRACEBACK_ENV}=1 to see the traceback)"
        print(f"{name}: internal error: {type(e).__name__}: {_one_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
