"""genai_config.json for an exported decoder, so that `onnxruntime_genai.Model(folder)` runs it:
model type, sizes, head counts, context length, token ids, input/output names, and search
defaults from generation_config.json (the fields onnxruntime-genai's model builder writes); and
for a vision-language export, the same with vision and embedding sections, as genai lays out its
multimodal models."""
from __future__ import annotations

import json
from pathlib import Path

from ..decoder.config import DecoderConfig
from ..jsonfile import read_json

# onnxruntime-genai model types whose decoder takes our layout (separate past/present key and value
# per layer, input_ids/inputs_embeds + attention_mask + position_ids).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "llama"}


def genai_config(model_dir: Path, cfg: DecoderConfig, model_type: str, shared_buffer: bool,
                 inputs_embeds: bool, filename: str) -> dict:
    gc = read_json(Path(model_dir) / "generation_config.json", required=False) or {}
    hf = read_json(Path(model_dir) / "config.json")
    eos = gc.get("eos_token_id", hf.get("eos_token_id"))
    if eos is None:  # genai needs an id in [0, vocab): 0, with min_length or max_length deciding the end
        eos = 0
    bos = gc.get("bos_token_id", cfg.bos_token_id)
    pad = gc.get("pad_token_id", hf.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    inputs = {"inputs_embeds" if inputs_embeds else "input_ids": "inputs_embeds" if inputs_embeds else "input_ids",
              "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    return {
        "model": {
            "bos_token_id": bos if bos is not None else -1,
            "context_length": cfg.max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.d_model,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": cfg.n_head,
                "num_hidden_layers": cfg.n_layer,
                "num_key_value_heads": cfg.n_kv_head,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES[model_type],
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gc.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": cfg.max_seq_len,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shared_buffer,
            "repetition_penalty": float(gc.get("repetition_penalty", 1.0)),
            "temperature": float(gc.get("temperature", 1.0)),
            "top_k": int(gc.get("top_k") or 50),
            "top_p": float(gc.get("top_p") or 1.0),
        },
    }


# onnxruntime-genai has no llava / idefics3 model type; its gemma3 pipeline is the generic
# vision (pixel_values -> image_features) -> embedding (input_ids, image_features -> inputs_embeds)
# -> decoder one that these exports fit (bench/README.md).
GENAI_VLM_TYPE = "gemma3"


def vlm_genai_config(decoder_config: dict, decoder_dir: str, vision_file: str, embedding_file: str) -> dict:
    """The top-level genai_config.json of a vision-language export: its decoder's, with the
    decoder's file under `decoder_dir` and the vision and embedding sections added."""
    cfg = json.loads(json.dumps(decoder_config))  # a deep copy
    m = cfg["model"]
    m["type"] = GENAI_VLM_TYPE
    m["decoder"]["filename"] = f"{decoder_dir}/{m['decoder']['filename']}"
    m["vision"] = {"filename": vision_file, "inputs": {"pixel_values": "pixel_values"},
                   "outputs": {"image_features": "image_features"}}
    m["embedding"] = {"filename": embedding_file, "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}}
    return cfg
