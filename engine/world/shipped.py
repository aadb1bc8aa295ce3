"""The models mmfuse ships (trained by `mmfuse world train`, copied into mmfuse/world/shipped/):
named without a path in Python (`shipped_path("world-vlm")`, `mmfuse.world.load.load("world-vlm")`) and on the command line
(`--model world-vlm`). A missing file is a MissingModelError naming it and the command that
regenerates it."""
from __future__ import annotations

from pathlib import Path

from ..errors import MissingModelError

ROOT = Path(__file__).with_name("shipped")
REGENERATE = "mmfuse world train --out DIR --install"   # writes DIR and copies the models here
# name: (folder under ROOT, files it must hold)
SHIPPED = {
    "world-clip": ("clip", ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json")),
    "world-vlm": ("vlm", ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                          "preprocessor_config.json")),
    "world-ngram": ("ngram", ("answers.bin", "tokenizer.json")),
    "world-imagine": ("imagine", ("config.json", "model.safetensors", "tokenizer.json", "vq.json", "vq.safetensors")),
}


def shipped_path(name: str, root=None) -> Path:
    """The folder of shipped model `name` (see SHIPPED), after checking its files are there."""
    if name not in SHIPPED:
        raise MissingModelError(f"{name!r} is not a shipped model (shipped: {', '.join(SHIPPED)})")
    sub, files = SHIPPED[name]
    folder = Path(root or ROOT) / sub
    for f in files:
        if not (folder / f).is_file():
            raise MissingModelError(f"shipped model {name!r}: file {folder / f} is missing from this installation; "
                                    f"regenerate it with `{REGENERATE}`")
    return folder


def resolve_model(model: str) -> str:
    """A --model value: a shipped name (when no such local path exists) becomes its folder."""
    if model in SHIPPED and not Path(model).exists():
        return str(shipped_path(model))
    return model

