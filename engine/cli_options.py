"""What the model commands share: `--model`/`--dtype`/`--device`/`--download`, `--json` and `-q`,
checking output paths before any work, and progress bars. Imports no torch (the CLI's --help and
the n-gram commands stay fast); the checks that need torch import it when they run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import OutputError

DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]
COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".lz4", ".zip")


def add_model_options(p, required: bool = True) -> None:
    """--model DIR, --dtype, --device, --download."""
    p.add_argument("--model", required=required, help="local Hugging Face checkpoint folder")
    p.add_argument("--download", action="store_true",
                   help="if --model is a Hub id (owner/name), fetch it with huggingface_hub (opt-in; never implicit)")
    add_device_options(p)


def add_device_options(p) -> None:
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype; auto: the checkpoint's own (config.json dtype/torch_dtype)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")


def add_output_options(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")


def prepare_model_args(args) -> None:
    """Validate --device and resolve --model (downloading only with --download) before any work."""
    from .checkpoint import HUB_ID, fetch_from_hub
    from .device import check_device

    check_device(args.device, "--device")
    model = getattr(args, "model", None)
    if model and getattr(args, "download", False) and not Path(model).exists() and HUB_ID.fullmatch(model):
        args.model = str(fetch_from_hub(model))
    elif model:
        from .world.shipped import resolve_model

        args.model = resolve_model(model)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def progress(iterable=None, total=None, desc: str = "", quiet: bool = False, unit: str = "it", **options):
    """A tqdm bar on stderr, silent with -q or when stderr is not a terminal (`options` go to tqdm,
    e.g. unit_scale)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not progress_shown(quiet), leave=False, **options)


def progress_shown(quiet: bool = False) -> bool:
    """Whether `progress` draws a bar: not with -q, nor when stderr is not a terminal (callers that
    would only update a hidden bar skip importing tqdm)."""
    return not quiet and sys.stderr.isatty()


def check_output(path: str, option: str, suffix: str = "") -> Path:
    """The file that will really be written for `option PATH` (with `suffix` appended when missing,
    as np.save does), checked before the work starts: a writable existing folder, not a folder
    itself, and not a compressed name (we write plain files)."""
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"{option} {path}: is a folder, expected a file name")
    if suffix and out.suffix != suffix:
        if out.suffix in COMPRESSED:
            raise OutputError(f"{option} {path}: compressed output ({out.suffix}) is not supported; "
                              f"give a plain {suffix} name")
        out = out.with_name(out.name + suffix)
    if out.suffix in COMPRESSED:
        raise OutputError(f"{option} {path}: compressed output ({out.suffix}) is not supported; give a plain name")
    if out.is_dir():
        raise OutputError(f"{option} {out}: is a folder, expected a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{option} {out}: cannot write here: {parent} is not a folder")
    if not parent.is_dir():
        raise OutputError(f"{option} {out}: cannot write here: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{option} {out}: cannot write here: folder {parent} is not writable")
    return out
