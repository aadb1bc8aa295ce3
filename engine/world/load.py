"""Load a shipped world model by name (`mmfuse.world.shipped` names and checks the files)."""
from __future__ import annotations

from .shipped import shipped_path


def load(name: str, root=None):
    """A shipped model by name: "world-clip" -> `Encoder`, "world-vlm" -> `VisionLanguageModel`,
    "world-ngram" -> `NGramModel`, "world-imagine" -> `Imaginer` (`root`: a `mmfuse world train --out` folder instead)."""
    folder = shipped_path(name, root)
    if name == "world-clip":
        from ..encoders import load_encoder

        return load_encoder(folder)
    if name == "world-vlm":
        from ..vlm.engine import VisionLanguageModel

        return VisionLanguageModel.from_pretrained(folder)
    if name == "world-imagine":
        from .imagine import Imaginer

        return Imaginer.from_pretrained(folder)
    from ..ngram import NGramModel

    return NGramModel.load(folder / "answers.bin")
