"""SigLIP (Hugging Face `SiglipModel` checkpoints): CLIP (clip.py) with a ViT image tower without
a class token, pooled by a multi-head attention probe (vit.AttentionPool); a bidirectional text
tower pooled from the last token through a biased `head`; no image projection (the text is
projected to the image width); independent sigmoid scores from exp(logit_scale) * cos + logit_bias.

    model = SiglipModel.from_pretrained("path/to/siglip")
    img, txt = model(pixels, ids)                  # L2-normalised (B, E) each
    probs = model.scores(model.logits(img, txt))   # a sigmoid per (image, text) pair
"""
from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import int_field, screen_fields
from ..weight_map import named_keys
from .clip import ClipModel
from .config import sub_config, text_tower, vision_tower

_HEAD = "vision_model.head."
# SigLIP's own Hugging Face keys: our parameter -> theirs, and our module -> theirs (weight and bias).
SIGLIP_PARAMS = {"image_tower.pool.probe": _HEAD + "probe",
                 "image_tower.pool.in_proj.weight": _HEAD + "attention.in_proj_weight",
                 "image_tower.pool.in_proj.bias": _HEAD + "attention.in_proj_bias", "logit_bias": "logit_bias"}
SIGLIP_MODULES = {"image_tower.patch_embed": "vision_model.embeddings.patch_embedding",
                  "image_tower.pool.out_proj": _HEAD + "attention.out_proj", "image_tower.pool.norm": _HEAD + "layernorm",
                  "image_tower.pool.mlp.up": _HEAD + "mlp.fc1", "image_tower.pool.mlp.down": _HEAD + "mlp.fc2",
                  "text_proj": "text_model.head"}

# config.json fields SiglipModel reads at the top level; others are screened by hf_config.
_TOP_FIELDS = {"text_config", "vision_config", "initializer_factor"}


class SiglipModel(ClipModel):
    model_type = "siglip"
    class_token = False
    proj_bias = True
    has_bias = True
    logit_scale_shape = (1,)

    def scores(self, logits):
        """Per-image class probabilities: an independent sigmoid per (image, text) pair."""
        return logits.sigmoid()

    @classmethod
    def parse_config(cls, cfg, source):
        screen_fields(cfg, _TOP_FIELDS, source)
        vision = vision_tower(sub_config(cfg, "vision_config", source), f"{source} vision_config",
                              "gelu_pytorch_tanh", 1e-6, class_token=False)
        tcfg = sub_config(cfg, "text_config", source)
        text = text_tower(tcfg, f"{source} text_config", "gelu_pytorch_tanh", 1e-6, causal=False,
                          extra={"projection_size"})
        dim = int_field(tcfg, "projection_size", f"{source} text_config", default=text.d_model)
        if dim != vision.d_model:
            raise ConfigError(f"{source}: text projection_size={dim} differs from the image width {vision.d_model} "
                              "(SigLIP compares the pooled image features with the projected text directly)")
        return vision, text, dim

    @classmethod
    def key_table(cls, vision, text):
        return cls.layer_keys(vision, text) + named_keys(SIGLIP_PARAMS, SIGLIP_MODULES)

    def init_logits(self) -> None:
        self.logit_scale.data.fill_(2.302585)  # log(10), SigLIP's initial temperature
        self.logit_bias.data.fill_(-10.0)
