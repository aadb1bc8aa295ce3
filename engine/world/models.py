"""The world's model folders: shapes of the shipped models, their tokenizers, chat template and
preprocessing files, and saving a trained LLaVA as a folder that mmfuse and transformers'
LlavaForConditionalGeneration load.

Every folder is a normal Hugging Face checkpoint folder (config.json, model.safetensors,
tokenizer.json, ...), loaded by the ordinary mmfuse entry points (`load_encoder`,
`VisionLanguageModel.from_pretrained`, `Engine.from_pretrained`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from ..decoder.weights import llama_table
from ..encoders.clip import clip_config
from ..encoders.synthetic import write_word_tokenizer
from ..files import atomic_path, write_json
from ..weight_map import module_keys, prefixed, save_weights
from .language import VOCABULARY
from .scene import IMAGE_SIZE

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
USER, ASSISTANT = "USER:", "ASSISTANT:"
CLIP_CONTEXT = 40     # tokens: the longest caption (4 objects, 35 words) + BOS + EOS fits
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
                "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


@dataclass
class WorldSizes:
    """Widths and depths of the shipped models (small: they train on a 2-core CPU in minutes)."""
    patch: int = 16                # ViT patch side: 16 patches per 64 x 64 image, 4 per grid cell
    vision_width: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64           # CLIP text tower
    text_layers: int = 2
    embed_dim: int = 64            # CLIP joint space
    lm_width: int = 128            # VLM decoder
    lm_layers: int = 2
    lm_heads: int = 4
    lm_ff: int = 384
    lm_context: int = 256


def write_clip_assets(folder) -> int:
    """CLIP tokenizer (word level over the world's vocabulary) and preprocessing; returns the vocab size."""
    folder = Path(folder)
    vocab = write_word_tokenizer(folder, VOCABULARY.words, CLIP_CONTEXT)
    write_json(folder / "preprocessor_config.json", PREPROCESSOR)
    return vocab


def world_clip_config(vocab: int, s: WorldSizes) -> dict:
    return clip_config(embed_dim=s.embed_dim, image_size=IMAGE_SIZE, patch_size=s.patch, vision_width=s.vision_width,
                       vision_layers=s.vision_layers, vision_heads=s.vision_heads, text_width=s.text_width,
                       text_layers=s.text_layers, text_heads=4, vocab_size=vocab, context_length=CLIP_CONTEXT,
                       eos_token_id=vocab - 1, pad_token_id=0)


def chat_tokenizer(extra=()) -> Tokenizer:
    """A word-level tokenizer over the world's words, the chat markers and `extra` tokens, with
    <pad>, <s>, </s>, <image> special (ids 0-3). Words are split on whitespace only."""
    vocab = {PAD: 0, BOS: 1, EOS: 2, IMAGE: 3, "[UNK]": 4}
    for w in (USER, ASSISTANT, *VOCABULARY.words, *extra):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([PAD, BOS, EOS, IMAGE])
    return tok


def write_chat_assets(folder, tok: Tokenizer, chat_template: bool = True) -> None:
    """tokenizer.json, tokenizer_config.json (+ chat template) and special tokens of a decoder folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
           "unk_token": "[UNK]", "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    if chat_template:
        cfg["chat_template"] = CHAT_TEMPLATE
    write_json(folder / "tokenizer_config.json", cfg)
    write_json(folder / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})


def llava_hf_config(clip_cfg: dict, text_cfg, image_token_id: int) -> dict:
    """config.json of a LLaVA whose tower is the CLIP vision tower of `clip_cfg`, last layer, class token dropped."""
    vision = dict(clip_cfg["vision_config"])
    text = text_cfg.to_hf()
    text.pop("architectures")
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "vision_config": vision,
            "text_config": text, "image_token_index": image_token_id, "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "image_seq_length": (IMAGE_SIZE // vision["patch_size"]) ** 2,
            "torch_dtype": "float32"}


def save_llava(model, folder, hf_config: dict) -> Path:
    """Write a trained `LlavaModel` in the current LLaVA layout (model.vision_tower.vision_model.,
    model.multi_modal_projector., model.language_model., lm_head.)."""
    from ..vlm.loader import tower_key_table

    table = tower_key_table(model.cfg, model, "model.vision_tower.vision_model.")
    for lin in ("linear_1", "linear_2"):
        table += module_keys(f"projector.{lin}", f"model.multi_modal_projector.{lin}")
    table += prefixed(llama_table(model.cfg.text, body="model.language_model.", head="lm_head."), "decoder.")
    folder = save_weights(model, folder, table, hf_config)
    write_json(folder / "preprocessor_config.json", PREPROCESSOR)
    return folder
