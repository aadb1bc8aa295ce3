"""SigLIP (Hugging Face `SiglipModel` checkpoints): ViT image tower without a class token, pooled by
a multi-head attention probe; bidirectional text tower pooled from the last token through a
biased `head`; independent sigmoid scores from exp(logit_scale) * cos + logit_bias."""
from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import int_field, screen_fields
from ..weight_map import module_keys
from .config import sub_config, text_tower, vision_tower
from .dual import DualEncoder

_TOP_FIELDS = {"text_config", "vision_config", "initializer_factor"}


class SiglipModel(DualEncoder):
    model_type = "siglip"
    class_token = False
    proj_bias = True
    has_bias = True
    logit_scale_shape = (1,)

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
        h = "vision_model.head."
        return [
            *cls.tower_keys(vision, text),
            *module_keys("image_tower.patch_embed", "vision_model.embeddings.patch_embedding"),
            ("image_tower.pool.probe", [h + "probe"]),
            ("image_tower.pool.in_proj.weight", [h + "attention.in_proj_weight"]),
            ("image_tower.pool.in_proj.bias", [h + "attention.in_proj_bias"]),
            *module_keys("image_tower.pool.out_proj", h + "attention.out_proj"),
            *module_keys("image_tower.pool.norm", h + "layernorm"),
            *module_keys("image_tower.pool.mlp.up", h + "mlp.fc1"),
            *module_keys("image_tower.pool.mlp.down", h + "mlp.fc2"),
            *module_keys("text_proj", "text_model.head"),
            ("logit_scale", ["logit_scale"]),
            ("logit_bias", ["logit_bias"]),
        ]

    def init_logits(self) -> None:
        self.logit_scale.data.fill_(2.302585)  # log(10), SigLIP's initial temperature
        self.logit_bias.data.fill_(-10.0)

    def scores(self, logits):
        return logits.sigmoid()
