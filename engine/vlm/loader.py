"""Load a vision-language checkpoint folder: llava / llava_next in either published weight-name
layout, idefics3 / smolvlm in theirs.

Current (transformers >= 4.52): `model.vision_tower.`, `model.multi_modal_projector.`,
`model.language_model.`, `lm_head.`. Older (most published llava-hf folders):
`vision_tower.`, `multi_modal_projector.`, `language_model.model.`, `language_model.lm_head.`.
The tower's own names come with or without their `vision_model.` level. Tensors of the tower that
the selected feature layers never reach (later layers, post-norm, pooling head) are skipped.
llava_next adds `image_newline` beside the projector. Idefics3 / SmolVLM: `model.vision_model.`,
`model.connector.modality_projection.proj.`, `model.text_model.`, `lm_head.`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint, resolve_dtype
from ..jsonfile import read_config
from ..decoder.loader import DECODER_IGNORED, decoder_from_checkpoint
from ..encoders.weights import block_keys
from ..errors import CheckpointError
from ..weight_map import module_keys, read_state
from .config import Idefics3Config, vlm_config
from .idefics3 import Idefics3Model
from .llava import LlavaModel
from .llava_next import LlavaNextModel
from .multimodal import MultimodalModel

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


def tower_key_table(cfg, model: MultimodalModel, v: str) -> list:
    """Our tower's parameters <- the checkpoint's names under `v` (the blocks the model keeps; the
    post-LN where the model uses it)."""
    tower = model.tower
    table = [("tower.pos_embed", [v + "embeddings.position_embedding.weight"]),
             *block_keys("tower.blocks", v + "encoder.layers", len(tower.blocks), "clip")]
    if tower.cls is not None:
        table += [("tower.patch_embed.weight", [v + "embeddings.patch_embedding.weight"]),
                  ("tower.cls", [v + "embeddings.class_embedding"]),
                  *module_keys("tower.norm_pre", v + "pre_layrnorm")]
    else:
        table += module_keys("tower.patch_embed", v + "embeddings.patch_embedding")
    if tower.norm_post is not None:
        table += module_keys("tower.norm_post", v + "post_layernorm")
    return table


def load_vlm(folder, dtype="auto", device="cpu") -> MultimodalModel:
    """Build the model of a checkpoint folder (config.json + safetensors) by its model_type. dtype
    "auto": the checkpoint's own."""
    folder = Path(folder)
    hf = read_config(folder)
    cfg = vlm_config(hf, source=str(folder / "config.json"))
    dtype = resolve_dtype(dtype, hf)
    ck = Checkpoint(folder)
    if isinstance(cfg, Idefics3Config):
        return _load(Idefics3Model, cfg, ck, dtype, device, *IDEFICS3_LAYOUT)
    _, body, head, proj, v = detect_layout(ck)
    table = module_keys("projector.linear_1", proj + "linear_1", ("weight", "bias") if cfg.projector_bias else ("weight",))
    table += module_keys("projector.linear_2", proj + "linear_2", ("weight", "bias") if cfg.projector_bias else ("weight",))
    if cfg.grid_pinpoints is not None:
        table.append(("image_newline", [proj.replace("multi_modal_projector.", "image_newline")]))
    return _load(LlavaModel if cfg.grid_pinpoints is None else LlavaNextModel, cfg, ck, dtype, device, body, head, v,
                 table)


# (decoder body prefix, head prefix, tower prefix, connector key table) of Idefics3 / SmolVLM folders.
IDEFICS3_LAYOUT = ("model.text_model.", "lm_head.", "model.vision_model.",
                   [("proj.weight", ["model.connector.modality_projection.proj.weight"])])


def _load(build, cfg, ck: Checkpoint, dtype, device, body: str, head: str, v: str, table: list) -> MultimodalModel:
    """Fill `build(cfg)` from the checkpoint: tower keys under `v`, the family's own `table`, the decoder."""
    with torch.device("meta"):
        model = build(cfg)
    depth = len(model.tower.blocks)
    sd = read_state(ck, tower_key_table(cfg, model, v) + table,
                    {k: tuple(t.shape) for k, t in model.state_dict().items()}, dtype, device)
    decoder = decoder_from_checkpoint(ck, cfg.text, dtype=dtype, device=device, prefix=body, head_prefix=head)
    skipped = [k for k in ck.unused() if k.startswith(v) and (
        k.startswith((v + "post_layernorm.", v + "head."))
        or (k.startswith(v + "encoder.layers.") and int(k[len(v + "encoder.layers."):].split(".")[0]) >= depth))]
    ck.finish(ignore=tuple(skipped) + DECODER_IGNORED[cfg.text.family])
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("decoder.")]
    if missing or unexpected:
        raise CheckpointError(f"{ck.folder}: internal key mapping mismatch: missing {missing}, unexpected {unexpected}")
    model.decoder = decoder
    return model.eval()
