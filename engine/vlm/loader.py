"""Load a LLaVA checkpoint folder in either published weight-name layout.

Current (transformers >= 4.52): `model.vision_tower.`, `model.multi_modal_projector.`,
`model.language_model.`, `lm_head.`. Older (most published llava-hf folders):
`vision_tower.`, `multi_modal_projector.`, `language_model.model.`, `language_model.lm_head.`.
The tower's own names come with or without their `vision_model.` level. Tensors of the tower that
the selected feature layers never reach (later layers, post-norm, pooling head) are skipped.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint, read_config, resolve_dtype
from ..decoder.loader import DECODER_IGNORED, decoder_from_checkpoint
from ..encoders.weights import block_keys
from ..errors import CheckpointError
from ..weight_map import module_keys, read_state
from .config import VlmConfig
from .llava import LlavaModel

# (decoder body prefix, head prefix, projector prefix, tower prefixes) of each layout.
LAYOUTS = {
    "current": ("model.language_model.", "lm_head.", "model.multi_modal_projector.",
                ("model.vision_tower.vision_model.", "model.vision_tower.")),
    "old": ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.",
            ("vision_tower.vision_model.", "vision_tower.")),
}


def detect_layout(ck: Checkpoint) -> tuple:
    """(layout name, decoder prefix, head prefix, projector prefix, tower prefix) of a checkpoint."""
    for name, (body, head, proj, towers) in LAYOUTS.items():
        if body + "embed_tokens.weight" not in ck:
            continue
        for v in towers:
            if v + "embeddings.patch_embedding.weight" in ck:
                return name, body, head, proj, v
        raise CheckpointError(f"{ck.folder}: {name} layout ({body}...) but no vision tower under {' or '.join(towers)}")
    raise CheckpointError(f"{ck.folder}: no LLaVA weights: expected 'model.language_model.embed_tokens.weight' "
                          "(current layout) or 'language_model.model.embed_tokens.weight' (old layout)")


def tower_key_table(cfg: VlmConfig, depth: int, v: str) -> list:
    table = [("tower.pos_embed", [v + "embeddings.position_embedding.weight"]),
             *block_keys("tower.blocks", v + "encoder.layers", depth, "clip")]
    if cfg.class_token:
        table += [("tower.patch_embed.weight", [v + "embeddings.patch_embedding.weight"]),
                  ("tower.cls", [v + "embeddings.class_embedding"]),
                  *module_keys("tower.norm_pre", v + "pre_layrnorm")]
    else:
        table += module_keys("tower.patch_embed", v + "embeddings.patch_embedding")
    return table


def load_llava(folder, dtype="auto", device="cpu") -> LlavaModel:
    """Build a `LlavaModel` from a checkpoint folder (config.json + safetensors). dtype "auto": the
    checkpoint's own."""
    folder = Path(folder)
    hf = read_config(folder)
    cfg = VlmConfig.from_hf(hf, source=str(folder / "config.json"))
    dtype = resolve_dtype(dtype, hf)
    ck = Checkpoint(folder)
    _, body, head, proj, v = detect_layout(ck)
    with torch.device("meta"):
        model = LlavaModel(cfg)
    depth = len(model.tower.blocks)
    table = tower_key_table(cfg, depth, v) + module_keys("projector.linear_1", proj + "linear_1",
                                                         ("weight", "bias") if cfg.projector_bias else ("weight",))
    table += module_keys("projector.linear_2", proj + "linear_2", ("weight", "bias") if cfg.projector_bias else ("weight",))
    sd = read_state(ck, table, {k: tuple(t.shape) for k, t in model.state_dict().items()}, dtype, device)
    decoder = decoder_from_checkpoint(ck, cfg.text, dtype=dtype, device=device, prefix=body, head_prefix=head)
    skipped = [k for k in ck.unused() if k.startswith(v) and (
        k.startswith((v + "post_layernorm.", v + "head."))
        or (k.startswith(v + "encoder.layers.") and int(k[len(v + "encoder.layers."):].split(".")[0]) >= depth))]
    ck.finish(ignore=tuple(skipped) + DECODER_IGNORED[cfg.text.family])
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("decoder.")]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: internal key mapping mismatch: missing {missing}, unexpected {unexpected}")
    model.decoder = decoder
    return model.eval()
